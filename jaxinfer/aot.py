"""Compiled steps, kept: each program the engine runs is traced and compiled once, ever.

`StepCache` holds ahead-of-time compiled executables (`jax.jit(f).lower(...).compile()`) keyed
by the step, its static arguments and its bucket, in memory and, serialized, on disk
(`jax.experimental.serialize_executable`), so a second process loads them in ~0.1 s each
instead of tracing (~0.3 s) and compiling (~1-3 s) them again. A disk entry's name hashes
everything the executable depends on: the step's name and static arguments, the abstract
signature of its array arguments (shapes, dtypes, the PyTree structure with its static fields),
the jax / jaxlib versions, the backend and devices, XLA_FLAGS, and the source of jaxinfer and
pallas_kernels; an entry that fails to load is recompiled and rewritten. Compilation can run on
worker threads (`submit`): XLA compiles outside the GIL, so on a 2-core machine two programs
compile at once.

`enable_persistent_cache()` also turns on JAX's own persistent compilation cache in the same
directory, for everything else (eager ops, `jaxinfer.forward`).

The directory: $JAXINFER_CACHE_DIR, else $XDG_CACHE_HOME/jaxinfer, else ~/.cache/jaxinfer;
JAXINFER_CACHE_DIR=0 (or empty) turns both caches off (memory only).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import pickle
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jaxlib
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)
CACHE_ENV = "JAXINFER_CACHE_DIR"
_FORMAT = 1  # bump when the entry layout changes


def cache_dir() -> Path | None:
    """The cache directory (created), or None when caching to disk is off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip() in ("", "0", "off", "none"):
        return None
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "jaxinfer"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home must not stop inference
        log.warning("jaxinfer: cache directory %s unusable (%s); compiling without a disk cache", path, e)
        return None
    return path


_enabled = False


def enable_persistent_cache() -> None:
    """Turn on JAX's persistent compilation cache in cache_dir()/xla, unless the user configured
    one already (their setting wins) or caching is off. Idempotent."""
    global _enabled
    if _enabled:
        return
    _enabled = True
    directory = cache_dir()
    if directory is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory / "xla"))
    # Small CPU programs compile in well under JAX's default 1 s threshold: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@functools.cache
def _environment_key() -> bytes:
    """What every executable depends on besides its own arguments."""
    h = hashlib.sha256()
    devices = jax.devices()
    h.update(repr((_FORMAT, jax.__version__, jaxlib.__version__, devices[0].platform,
                   getattr(devices[0], "device_kind", ""), len(devices), os.environ.get("XLA_FLAGS", ""))).encode())
    root = Path(__file__).resolve().parents[1]
    for pkg in ("jaxinfer", "pallas_kernels"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.digest()


def signature_key(*trees) -> str:
    """A short hash of the abstract signature of `trees` (e.g. a Model and a pool dtype), for
    the `key` of StepCache.call: computed once by the caller, not per call."""
    return hashlib.sha256(_signature(trees)).hexdigest()[:16]


# Whether the compilation under way on this thread was served by JAX's persistent cache.
_local = threading.local()


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits" and getattr(_local, "compiling", False):
        _local.jax_cache_hit = True


jax.monitoring.register_event_listener(_on_event)


class _Abstract:
    """A PyTree's structure and its leaves' shapes, standing in for it in `submit` (a tree rebuilt
    with ShapeDtypeStruct leaves would run its dataclasses' __init__ type checks on them)."""

    def __init__(self, tree):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_mesh_sharding(x)) for x in leaves]


def _abstract(tree):
    return _Abstract(tree)


def _sharding_key(x):
    """A leaf's placement in a signature: its spec and the mesh's axes and device ids (two
    replicas' meshes differ only in their devices)."""
    s = _mesh_sharding(x)
    if s is None:
        return None
    return (str(s.spec), s.mesh.axis_names, tuple(s.mesh.devices.shape), tuple(d.id for d in s.mesh.devices.flat))


def _mesh_sharding(x):
    """A leaf's NamedSharding (a sharded model or state, jaxinfer/sharding.py), else None: the
    executable is compiled for it, and it is part of the signature."""
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.NamedSharding) else None


def _flat_signature(treedefs: list, leaves: list) -> bytes:
    """Tree structures (static fields included, through pickling the treedefs) and every leaf's
    shape, dtype and mesh placement."""
    shapes = [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)), _sharding_key(x))
              for x in leaves]
    try:
        structure = pickle.dumps(treedefs)
    except TypeError:  # a static field holds devices (a sharded Model's mesh): its repr names them
        structure = repr(treedefs).encode()
    return structure + repr(shapes).encode()


def _signature(args: tuple) -> bytes:
    """The abstract signature of some arguments, as `_flat_signature` of each one."""
    flat = [jax.tree.flatten(a) for a in args]
    return _flat_signature([t for _, t in flat], [x for ls, _ in flat for x in ls])


class StepCache:
    """Compiled executables of the engine's steps; see the module docstring.

    `call(name, fn, args, static_argnums, donate_argnums, key)` runs `fn(*args)` (`fn` a plain
    step function, not jitted) through the executable for (name, the static arguments, key):
    `key` must determine the abstract signature of the other arguments (the engine passes its
    model and state signature and its bucket; see `signature_key`), so a call costs a dict
    lookup, one flatten of the arguments and the executable's own C++ dispatch. The first use
    per key compiles (or loads from disk). One cache serves the process (`steps()`).

    Executables take the arguments' flat leaves: lowering a function of PyTrees rebuilds the
    PyTrees from placeholders through their dataclasses' __init__, which runtime type checkers
    (jaxtyping's import hook in the test suite) reject."""

    def __init__(self, directory: Path | None = None, workers: int = 1):
        self.directory = None if directory is None else directory / "steps"
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mem: dict[tuple, Any] = {}
        self._pending: dict[tuple, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._workers = [threading.Thread(target=self._work, name=f"jaxinfer-compile-{i}") for i in range(workers)]
        self._started = False
        self.stats = {"compiled": 0, "loaded": 0, "compile_seconds": 0.0}
        self.compiled_by_step: dict[str, int] = {}  # step name -> programs compiled (not loaded)

    @staticmethod
    def _flat(args: tuple, static_argnums: tuple[int, ...]):
        static = {i: args[i] for i in static_argnums}
        positions = [i for i in range(len(args)) if i not in static]
        flat = [(a.treedef, a.leaves) if isinstance(a, _Abstract) else jax.tree.flatten(a)[::-1]
                for a in (args[i] for i in positions)]
        return static, positions, flat

    def _path(self, name: str, static: dict, flat: list) -> Path | None:
        """The disk entry of a program: everything it depends on, hashed."""
        if self.directory is None:
            return None
        if any(_mesh_sharding(x) is not None for _, ls in flat for x in ls):
            return None  # sharded programs (their collectives, several processes) stay in memory
        digest = hashlib.sha256(_environment_key() + repr((name, tuple(static.items()))).encode()
                                + _flat_signature([t for t, _ in flat], [x for _, ls in flat for x in ls])).hexdigest()
        return self.directory / f"{name}-{digest[:32]}.bin"

    def _entry(self, name: str, fn: Callable, args: tuple, static_argnums: tuple[int, ...],
               donate_argnums: tuple[int, ...]) -> Any:
        """Load or compile the executable; `args` may hold `_Abstract` stand-ins."""
        static, positions, flat = self._flat(args, static_argnums)
        treedefs = [t for t, _ in flat]
        leaves = [x for _, ls in flat for x in ls]
        path = self._path(name, static, flat)
        if path is not None and path.exists():
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                # On the first device, as compiled (the default, every local device, would make a
                # one-device program expect one shard per device on a multi-device host).
                compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                     execution_devices=jax.devices()[:1])
                self.stats["loaded"] += 1
                return compiled
            except Exception as e:  # stale or corrupt: compile again and overwrite
                log.warning("jaxinfer: cache entry %s unusable (%s: %s); recompiling", path.name, type(e).__name__, e)

        sizes = [len(ls) for _, ls in flat]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]

        def flat_fn(*xs):
            full = dict(static)
            full.update((i, jax.tree.unflatten(t, xs[a:a + n])) for i, t, a, n in zip(positions, treedefs, starts, sizes))
            return fn(*(full[i] for i in range(len(args))))

        flat_fn.__name__ = flat_fn.__qualname__ = name  # the XLA module is jit_<step name>

        donated = tuple(j for k, i in enumerate(positions) if i in donate_argnums
                        for j in range(starts[k], starts[k] + sizes[k]))
        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_mesh_sharding(x)) for x in leaves]
        t = time.perf_counter()
        _local.jax_cache_hit = False
        _local.compiling = True
        try:
            compiled = jax.jit(flat_fn, donate_argnums=donated).lower(*avals).compile()
        finally:
            _local.compiling = False
        with self._lock:
            self.stats["compiled"] += 1
            self.stats["compile_seconds"] += time.perf_counter() - t
            self.compiled_by_step[name] = self.compiled_by_step.get(name, 0) + 1
        # An executable JAX's persistent cache handed back serializes without its code (loading
        # it fails with "Function ... not found"): keep only real compilations. (That cache
        # serves this program to later processes anyway, after tracing it.)
        if path is not None and not _local.jax_cache_hit:
            try:
                data = pickle.dumps(serialize_executable.serialize(compiled))
                with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                    f.write(data)
                os.replace(f.name, path)  # atomic: a reader sees the old entry or the whole new one
            except Exception as e:  # an unserializable program still runs, it is just not kept
                log.warning("jaxinfer: could not store %s in the cache (%s: %s)", name, type(e).__name__, e)
        return compiled

    def _get(self, k: tuple, name: str, fn: Callable, args: tuple, static_argnums, donate_argnums) -> Any:
        compiled = self._mem.get(k)
        if compiled is not None:
            return compiled
        with self._lock:
            future = self._pending.get(k)
        # Queued but not started: compile here rather than wait behind the rest of the queue.
        if future is not None and not future.cancel():
            compiled = future.result()
        else:
            compiled = self._entry(name, fn, args, static_argnums, donate_argnums)
        self._mem[k] = compiled
        return compiled

    def call(self, name: str, fn: Callable, args: tuple, static_argnums: tuple[int, ...],
             donate_argnums: tuple[int, ...] = (), key: Any = None):
        k = (name, tuple(args[i] for i in static_argnums), key)
        compiled = self._mem.get(k) or self._get(k, name, fn, args, static_argnums, donate_argnums)
        return compiled(*jax.tree.leaves([a for i, a in enumerate(args) if i not in static_argnums]))

    def submit(self, name: str, fn: Callable, args: tuple, static_argnums: tuple[int, ...],
               donate_argnums: tuple[int, ...] = (), key: Any = None, only_cached: bool = False):
        """Compile (or load) in the background; with `only_cached`, only load, and only when the
        disk holds the program. The arguments are reduced to their shapes now, so the caller may
        go on (and donate them) at once. Returns the future, or None when nothing was queued."""
        k = (name, tuple(args[i] for i in static_argnums), key)
        with self._lock:
            if k in self._mem or k in self._pending:
                return None
            abstract = tuple(a if i in static_argnums else _abstract(a) for i, a in enumerate(args))
            if only_cached:
                path = self._path(name, *self._flat(abstract, static_argnums)[::2])
                if path is None or not path.exists():
                    return None
            future = concurrent.futures.Future()
            self._pending[k] = future
            self._queue.put((future, (name, fn, abstract, static_argnums, donate_argnums)))
            if not self._started:
                self._started = True
                for w in self._workers:
                    w.start()

        def done(f, k=k):
            if not f.cancelled() and f.exception() is None:
                self._mem[k] = f.result()
            with self._lock:
                self._pending.pop(k, None)

        future.add_done_callback(done)
        return future

    def _work(self) -> None:
        """Worker loop. Not a daemon (a daemon thread inside XLA's compiler when the interpreter
        exits aborts the process): it stops taking work once the main thread has finished, so an
        exiting program waits at most for the compilation under way; the rest is cancelled."""
        while threading.main_thread().is_alive():
            try:
                future, job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._entry(*job))
                except BaseException as e:  # delivered to whoever waits for it
                    future.set_exception(e)
        while True:
            try:
                future, _ = self._queue.get_nowait()
            except queue.Empty:
                return
            future.cancel()

    def wait(self) -> None:
        """Block until every submitted compilation has finished (raising the first error)."""
        with self._lock:
            futures = list(self._pending.values())
        for f in futures:
            if not f.cancelled():
                f.result()

    def __len__(self) -> int:
        return len(self._mem)


_steps: StepCache | None = None


def steps() -> StepCache:
    """The process's StepCache (its disk directory fixed at first use)."""
    global _steps
    if _steps is None:
        enable_persistent_cache()
        _steps = StepCache(cache_dir())
    return _steps


def clear_memory() -> None:
    """Drop the in-memory executables (jax.clear_caches() does not reach them); the disk cache
    stays. Long test processes call it to bound the memory maps XLA keeps per executable."""
    global _steps
    if _steps is not None:
        _steps.wait()
        _steps = None
