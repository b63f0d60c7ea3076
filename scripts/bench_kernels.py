"""Attention-kernel micro-benchmark against a roofline measured on the same device, in the same process.

On the GPU machine (H100/H200, sm_90), from the repository root:

    python scripts/bench_kernels.py --json bench_kernels.json          # full sweep (a few minutes)
    python scripts/bench_kernels.py --quick --json quick.json          # a few shapes (< 1 min)
    python scripts/bench_kernels.py --kernels paged --iters 50 --warmup 5

On a CPU (or any non-sm_90) backend only the jnp references and the XLA peers run, at tiny
sizes; the GPU kernels and GPU-only peers are listed as skipped, with the reason.

What is measured
- Rooflines: HBM copy bandwidth (`x + 1` on a large float32 array under jit: bytes read +
  written over the median time) and dense matmul TFLOP/s (`jnp.dot` of two N x N arrays of
  --dtype with float32 accumulation, 2 N^3 FLOPs over the median time).
- Every implementation is jitted; the compile time (lower + compile) is reported apart from the
  run times. Each run ends in `block_until_ready`; after --warmup runs, --iters runs give the
  median, p10 and p90.
- Prefill (`--kernels flash`): causal GQA attention, q [batch, seq, q_heads, head_dim];
  FLOPs = 4 * batch * q_heads * seq^2 * head_dim / 2 (the two matmuls, half of them causal);
  "% roofline" is the TFLOP/s over the measured matmul TFLOP/s. Peers: our Mosaic GPU kernel
  (`pallas_kernels.flash_attention`), our jnp reference (XLA), `jax.nn.dot_product_attention`
  with implementation "xla" and "cudnn", JAX's Pallas Mosaic GPU attention
  (`jax.experimental.pallas.ops.gpu.attention_mgpu`), tokamax when installed.
- Decode (`--kernels paged`): one query token per slot against a paged KV pool
  [pages, page_size, kv_heads, head_dim], every slot `context` tokens long, pages scattered at
  random through the pool. Bytes = K/V actually read (sum over slots of length * kv_heads *
  head_dim * 2 * itemsize) + q read + output written; "% roofline" is the GB/s over the
  measured copy bandwidth. Peers: our Mosaic GPU kernel (`pallas_kernels.paged_attention`), our
  jnp reference, JAX's Pallas paged attention (Triton, deprecated: only if it imports), a
  Mosaic GPU paged attention from JAX if the installed version has one, tokamax when installed.
- Each row also records `max_abs_err` against our reference on the same inputs (when the
  reference ran for that shape).

The JSON (--json) holds the device, JAX version, rooflines, every row (status "ok", "skipped"
or "error" with the reason) and the errors per implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bench_common import write_json
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.paged_attention import paged_attention_reference

KERNELS = ("flash", "paged")
DTYPES = ("bfloat16", "float16")
REFERENCE = "jnp reference (XLA)"


# --------------------------------------------------------------------------------------------
# FLOP / byte formulas
# --------------------------------------------------------------------------------------------

def attention_flops(batch: int, seq: int, q_heads: int, head_dim: int, causal: bool = True) -> int:
    """FLOPs of the two attention matmuls (Q K^T and P V, 2 FLOPs per multiply-add each):
    4 * batch * q_heads * seq^2 * head_dim, halved when causal (the convention of FlashAttention
    and of JAX's attention_mgpu benchmark)."""
    flops = 4 * batch * q_heads * seq * seq * head_dim
    return flops // 2 if causal else flops


def paged_decode_bytes(lengths: Sequence[int], q_heads: int, kv_heads: int, head_dim: int,
                       itemsize: int) -> int:
    """HBM bytes a paged decode step must move: the K and V rows of every visible token
    (sum(lengths) * kv_heads * head_dim * 2 * itemsize), plus q read and the output written
    (2 * slots * q_heads * head_dim * itemsize)."""
    kv = int(sum(int(n) for n in lengths)) * kv_heads * head_dim * 2 * itemsize
    return kv + 2 * len(lengths) * q_heads * head_dim * itemsize


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def copy_bytes(nbytes: int) -> int:
    """A device copy reads and writes every byte."""
    return 2 * nbytes


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def _short(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    if not str(e).strip() and e.__traceback__ is not None:  # bare assert: say where
        import traceback
        last = traceback.extract_tb(e.__traceback__)[-1]
        msg += f" at {Path(last.filename).name}:{last.lineno}"
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first if len(first) <= limit else first[:limit] + "..."


def time_jitted(fn: Callable, args: Sequence[Any], *, iters: int, warmup: int) -> dict:
    """jit `fn`, compile it for `args` (timed apart), run it `warmup` then `iters` times, each
    run blocked on. Returns the compile time, median/p10/p90 ms and the last output."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t) * 1e3)
    p10, med, p90 = np.percentile(np.asarray(times), [10, 50, 90])
    return dict(compile_s=compile_s, median_ms=float(med), p10_ms=float(p10), p90_ms=float(p90),
                runs=len(times), out=out)


# --------------------------------------------------------------------------------------------
# Device / rooflines
# --------------------------------------------------------------------------------------------

def is_sm90(device=None) -> bool:
    device = jax.devices()[0] if device is None else device
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def skip_reasons(device=None) -> dict[str, str | None]:
    """For each Impl.needs level, None if it can run on `device`, else why not."""
    device = jax.devices()[0] if device is None else device
    reasons: dict[str, str | None] = {"any": None, "gpu": None, "sm90": None}
    if device.platform != "gpu":
        reasons["gpu"] = f"needs a CUDA GPU; backend is {device.platform}"
        reasons["sm90"] = f"needs a CUDA GPU (sm_90); backend is {device.platform}"
    elif str(getattr(device, "compute_capability", "")) != "9.0":
        reasons["sm90"] = (f"needs sm_90 (Hopper); this GPU is compute capability "
                           f"{getattr(device, 'compute_capability', None)}")
    return reasons


def gpu_skip_reason(device=None) -> str | None:
    """None if the Mosaic GPU (sm_90) kernels can run here, else why not."""
    return skip_reasons(device)["sm90"]


def measure_rooflines(*, dtype, small: bool, iters: int, warmup: int) -> dict:
    """HBM copy GB/s and dense matmul TFLOP/s, both median over `iters` runs."""
    out = {}
    n_copy = (16 << 20) if small else (512 << 20)  # float32 elements: 64 MiB / 2 GiB
    x = jnp.ones((n_copy,), jnp.float32)
    try:
        t = time_jitted(lambda a: a + jnp.float32(1), (x,), iters=max(iters, 5), warmup=max(warmup, 1))
        nbytes = copy_bytes(x.size * x.dtype.itemsize)
        out["copy"] = dict(array_bytes=int(x.size * 4), bytes_moved=nbytes, median_ms=t["median_ms"],
                           p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], compile_s=t["compile_s"],
                           gb_per_s=nbytes / (t["median_ms"] * 1e-3) / 1e9)
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        out["copy"] = dict(error=_short(e))
    del x
    n = 512 if small else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    try:
        t = time_jitted(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32), (a, b),
                        iters=max(iters, 5), warmup=max(warmup, 1))
        flops = matmul_flops(n, n, n)
        out["matmul"] = dict(n=n, dtype=jnp.dtype(dtype).name, flops=flops, median_ms=t["median_ms"],
                             p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], compile_s=t["compile_s"],
                             tflops=flops / (t["median_ms"] * 1e-3) / 1e12)
    except Exception as e:  # noqa: BLE001
        out["matmul"] = dict(error=_short(e))
    del a, b
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# Shapes and inputs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlashShape:
    batch: int
    seq: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    causal: bool = True

    @property
    def label(self) -> str:
        return f"b{self.batch} s{self.seq} h{self.q_heads}/{self.kv_heads} d{self.head_dim}"

    @property
    def flops(self) -> int:
        return attention_flops(self.batch, self.seq, self.q_heads, self.head_dim, self.causal)

    def score_bytes(self) -> int:
        """The f32 [batch, q_heads, seq, seq] scores an unfused implementation materializes."""
        return 4 * self.batch * self.q_heads * self.seq * self.seq


@dataclasses.dataclass(frozen=True)
class PagedShape:
    slots: int
    context: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16

    @property
    def label(self) -> str:
        return f"slots{self.slots} ctx{self.context} h{self.q_heads}/{self.kv_heads} d{self.head_dim} p{self.page_size}"

    @property
    def pages_per_seq(self) -> int:
        return -(-self.context // self.page_size)

    @property
    def num_pages(self) -> int:
        return self.slots * self.pages_per_seq + 1  # page 0: the null page

    def lengths(self) -> list[int]:
        return [self.context] * self.slots

    def bytes(self, itemsize: int) -> int:
        return paged_decode_bytes(self.lengths(), self.q_heads, self.kv_heads, self.head_dim, itemsize)


def flash_shapes(*, small: bool, quick: bool) -> list[FlashShape]:
    if small:  # CPU: tiny, references and XLA only
        return [FlashShape(1, 128, 8, 2, 64)]
    if quick:
        return [FlashShape(1, 2048, head_dim=128), FlashShape(4, 2048, head_dim=64)]
    return [FlashShape(b, s, head_dim=d) for d in (64, 128) for s in (512, 2048, 8192) for b in (1, 4)]


def paged_shapes(*, small: bool, quick: bool) -> list[PagedShape]:
    if small:
        return [PagedShape(2, 128, 8, 2, 64)]
    if quick:
        return [PagedShape(8, 2048), PagedShape(64, 2048)]
    return [PagedShape(s, c) for c in (512, 2048, 8192) for s in (1, 8, 64, 256)]


def flash_arg_specs(shape: FlashShape, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
    q = jax.ShapeDtypeStruct((shape.batch, shape.seq, shape.q_heads, shape.head_dim), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((shape.batch, shape.seq, shape.kv_heads, shape.head_dim), jnp.dtype(dtype))
    return q, kv, kv


def paged_arg_specs(shape: PagedShape, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
    q = jax.ShapeDtypeStruct((shape.slots, shape.q_heads, shape.head_dim), jnp.dtype(dtype))
    pages = jax.ShapeDtypeStruct((shape.num_pages, shape.page_size, shape.kv_heads, shape.head_dim),
                                 jnp.dtype(dtype))
    table = jax.ShapeDtypeStruct((shape.slots, shape.pages_per_seq), jnp.int32)
    lengths = jax.ShapeDtypeStruct((shape.slots,), jnp.int32)
    return q, pages, pages, table, lengths


def make_flash_inputs(shape: FlashShape, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
                 for k, s in zip(keys, flash_arg_specs(shape, dtype)))


def make_paged_inputs(shape: PagedShape, dtype, seed: int = 0):
    specs = paged_arg_specs(shape, dtype)
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k_pages, v_pages = (jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
                           for k, s in zip(keys, specs[:3]))
    rng = np.random.default_rng(seed)  # pages scattered through the pool, as after real traffic
    table = (rng.permutation(shape.num_pages - 1) + 1).astype(np.int32).reshape(shape.slots, shape.pages_per_seq)
    return q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(shape.lengths(), jnp.int32)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Impl:
    """One implementation of a kernel. `fn` takes the prepared arguments; `prepare` (untimed)
    turns the standard arguments into that implementation's layout. `unavailable` (set when
    it cannot even be built, e.g. an import failed) and `needs` ("any": runs on CPU too, "gpu":
    any CUDA GPU, "sm90": Hopper) decide whether it runs."""

    name: str
    fn: Callable | None
    needs: str = "sm90"
    prepare: Callable | None = None
    unavailable: str | None = None
    note: str = ""


def _try_import(module: str):
    """(module, None) or (None, reason); import warnings (deprecations) are kept in the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - ImportError, or anything a broken module raises
            return None, ("not installed" if isinstance(e, ModuleNotFoundError) and module.split(".")[0] == "tokamax"
                          else _short(e))
    dep = [str(w.message).splitlines()[0] for w in caught
           if issubclass(w.category, DeprecationWarning) or "deprecat" in str(w.message).lower()]
    return mod, ("; ".join(dep) if dep else None)


def flash_impls(shape: FlashShape, dtype, *, include_peers: bool = True) -> list[Impl]:
    """Every prefill implementation, as functions of (q, k, v). Building them never needs a GPU
    (so the Mosaic paths can be cross-lowered for CUDA on a CPU machine)."""
    causal = shape.causal
    impls = [Impl(REFERENCE, lambda q, k, v: flash_attention_reference(q, k, v, causal=causal), needs="any")]

    def ours(q, k, v):
        from pallas_kernels.flash_attention import flash_attention
        return flash_attention(q, k, v, causal=causal)

    impls.append(Impl("jaxinfer pallas mosaic-gpu", ours, note="pallas_kernels.flash_attention"))
    if not include_peers:
        return impls

    impls.append(Impl("jax.nn dpa xla", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla"), needs="any"))
    impls.append(Impl("jax.nn dpa cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"), needs="gpu"))

    mgpu, why = _try_import("jax.experimental.pallas.ops.gpu.attention_mgpu")
    if mgpu is None:
        impls.append(Impl("jax attention_mgpu", None, unavailable=why))
    else:
        block_kv = 128 if shape.seq % 128 == 0 else 64

        def jax_mgpu(q, k, v):
            config = mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal)
            return mgpu.attention(q, k, v, config)

        impls.append(Impl("jax attention_mgpu", jax_mgpu, note=f"block_q=64 block_kv={block_kv}"))

    tk, why = _try_import("tokamax")
    if tk is None:
        impls.append(Impl("tokamax", None, unavailable=why))
    elif not hasattr(tk, "dot_product_attention"):
        impls.append(Impl("tokamax", None, unavailable="tokamax has no dot_product_attention"))
    else:
        impls.append(Impl("tokamax", lambda q, k, v: tk.dot_product_attention(q, k, v, is_causal=causal),
                          note="tokamax.dot_product_attention (default implementation)"))
    return impls


def paged_impls(shape: PagedShape, dtype, *, include_peers: bool = True) -> list[Impl]:
    """Every decode implementation, as functions of (q, k_pages, v_pages, page_table, lengths)."""
    impls = [Impl(REFERENCE, paged_attention_reference, needs="any")]

    def ours(q, k_pages, v_pages, table, lengths):
        from pallas_kernels.paged_attention import paged_attention
        return paged_attention(q, k_pages, v_pages, table, lengths)

    impls.append(Impl("jaxinfer pallas mosaic-gpu", ours, note="pallas_kernels.paged_attention"))
    if not include_peers:
        return impls

    # JAX's Triton paged attention: pool layout [kv_heads, pages, page_size, head_dim].
    tri, why = _try_import("jax.experimental.pallas.ops.gpu.paged_attention")
    name = "jax paged_attention triton (deprecated)"
    if tri is None:
        impls.append(Impl(name, None, unavailable=why))
    else:
        def to_triton(q, k_pages, v_pages, table, lengths):
            return (q, jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3)), table, lengths)

        k_splits = math.gcd(16, shape.pages_per_seq)  # the kernel needs pages_per_seq % k_splits == 0

        def triton(q, k_pages, v_pages, table, lengths):
            return tri.paged_attention(q, k_pages, v_pages, table, lengths, k_splits=k_splits)

        impls.append(Impl(name, triton, prepare=jax.jit(to_triton), needs="gpu",
                          note=f"k_splits={k_splits}; pool re-laid out [kv_heads, pages, page_size, head_dim] outside timing"
                               + (f"; {why}" if why else "")))

    # A Mosaic GPU paged attention shipped with JAX (none in 0.10.2; probed by name).
    found = None
    for mod_name in ("jax.experimental.pallas.ops.gpu.paged_attention_mgpu",
                     "jax.experimental.pallas.ops.gpu.decode_attention_mgpu"):
        mod, _ = _try_import(mod_name)
        if mod is not None and hasattr(mod, "paged_attention"):
            found = (mod_name, mod)
            break
    if found is None:
        impls.append(Impl("jax paged_attention mosaic-gpu", None,
                          unavailable=f"no Mosaic GPU paged attention in jax {jax.__version__}"))
    else:
        impls.append(Impl("jax paged_attention mosaic-gpu", None,
                          unavailable=f"{found[0]} exists but its API is not wired into this benchmark"))

    tk, why = _try_import("tokamax")
    if tk is None:
        impls.append(Impl("tokamax", None, unavailable=why))
    else:
        impls.append(Impl("tokamax", None, unavailable="tokamax paged decode attention not wired in "
                                                       "(no known public paged API)"))
    return impls


def build_kernel_call(kernel: str, shape, dtype, impl: str = "jaxinfer pallas mosaic-gpu"):
    """(fn, arg_specs): the exact function the benchmark jits and times for `impl` on `shape`,
    and ShapeDtypeStructs of its (standard-layout) arguments, so that, without a GPU,
    `jax.jit(fn).trace(*arg_specs).lower(lowering_platforms=("cuda",))` runs the real Mosaic GPU
    lowering of the benchmarked call."""
    if kernel == "flash":
        impls, specs = flash_impls(shape, dtype), flash_arg_specs(shape, dtype)
    elif kernel == "paged":
        impls, specs = paged_impls(shape, dtype), paged_arg_specs(shape, dtype)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    by_name = {i.name: i for i in impls}
    if impl not in by_name or by_name[impl].fn is None:
        raise ValueError(f"{kernel}: no runnable implementation {impl!r} "
                         f"({by_name[impl].unavailable if impl in by_name else 'unknown name'})")
    if by_name[impl].prepare is not None:
        raise ValueError(f"{impl!r} takes its own layout (prepare step); lower it with its prepared arguments")
    return by_name[impl].fn, specs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

# Unfused implementations materialize f32 scores [batch, heads, seq, seq]; beyond this they are
# skipped rather than risk running the GPU out of memory mid-sweep.
_MAX_SCORE_BYTES = 16 << 30
_UNFUSED = (REFERENCE, "jax.nn dpa xla")


def _max_abs_err(out, ref) -> float | None:
    if out is None or ref is None:
        return None
    try:
        return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    except Exception:  # noqa: BLE001 - shape mismatch etc.
        return None


def run_rows(kernel: str, shapes, impls_for, make_inputs, work, work_key: str, roofline: float | None,
             *, dtype, iters: int, warmup: int, progress: bool) -> list[dict]:
    """Time every implementation on every shape. `work(shape)` is FLOPs or bytes; `work_key`
    names the rate ("tflops" / "gb_per_s"); `roofline` the measured peak in the same unit."""
    rows = []
    scale = 1e12 if work_key == "tflops" else 1e9
    skip = skip_reasons()
    jobs = [(shape, impls_for(shape)) for shape in shapes]
    bar = tqdm(total=sum(len(i) for _, i in jobs), desc=kernel, unit="run", disable=not progress, file=sys.stderr)
    for shape, impls in jobs:
        args = None
        ref_out = None
        for impl in impls:
            row = dict(kernel=kernel, shape=shape.label, shape_params=dataclasses.asdict(shape), impl=impl.name,
                       dtype=jnp.dtype(dtype).name, status="ok", reason=None, note=impl.note or None)
            bar.update(1)
            if impl.unavailable is not None and impl.fn is None:
                row.update(status="skipped", reason=impl.unavailable)
            elif skip.get(impl.needs) is not None:
                row.update(status="skipped", reason=skip[impl.needs])
            elif (kernel == "flash" and impl.name in _UNFUSED and shape.score_bytes() > _MAX_SCORE_BYTES):
                row.update(status="skipped", reason=f"would materialize {shape.score_bytes() / 2**30:.0f} GiB "
                                                    f"of f32 scores (limit {_MAX_SCORE_BYTES / 2**30:.0f} GiB)")
            if row["status"] != "ok":
                rows.append(row)
                continue
            if args is None:
                args = make_inputs(shape, dtype)
            try:
                call_args = impl.prepare(*args) if impl.prepare else args
                t = time_jitted(impl.fn, call_args, iters=iters, warmup=warmup)
                del call_args
            except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
                row.update(status="error", reason=_short(e))
                rows.append(row)
                gc.collect()
                continue
            out = t.pop("out")
            if impl.name == REFERENCE:
                ref_out = out
                row["max_abs_err"] = 0.0
            else:
                row["max_abs_err"] = _max_abs_err(out, ref_out)
            del out
            w = work(shape)
            rate = w / (t["median_ms"] * 1e-3) / scale
            row.update(t, work=w, **{work_key: rate},
                       pct_roofline=(100.0 * rate / roofline) if roofline else None)
            rows.append(row)
        del args, ref_out
        gc.collect()
    bar.close()
    return rows


def print_table(rows: list[dict], rooflines: dict) -> None:
    copy, mm = rooflines.get("copy", {}), rooflines.get("matmul", {})
    print("rooflines: copy "
          + (f"{copy['gb_per_s']:.1f} GB/s ({copy['array_bytes'] / 2**20:.0f} MiB array)" if "gb_per_s" in copy
             else f"error: {copy.get('error')}")
          + "; matmul "
          + (f"{mm['tflops']:.2f} TFLOP/s ({mm['dtype']} {mm['n']}^3)" if "tflops" in mm
             else f"error: {mm.get('error')}"))
    head = f"{'kernel':<7}{'shape':<34}{'impl':<42}{'median ms':>11}{'p10-p90 ms':>18}{'rate':>16}{'% roof':>8}{'compile s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        prefix = f"{r['kernel']:<7}{r['shape']:<34}{r['impl']:<42}"
        if r["status"] != "ok":
            print(prefix + f"  {r['status']}: {r['reason']}")
            continue
        rate = (f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r['gb_per_s']:.1f} GB/s")
        pct = f"{r['pct_roofline']:.1f}" if r.get("pct_roofline") is not None else "-"
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        print(prefix + f"{r['median_ms']:>11.3f}{spread:>18}{rate:>16}{pct:>8}{r['compile_s']:>10.2f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="flash,paged",
                    help=f"comma-separated subset of {','.join(KERNELS)} (default: both)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="input dtype (default: bfloat16)")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (tiny ones on a non-GPU backend)")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per measurement (default: 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs after compilation (default: 3)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        ap.error(f"--kernels: unknown {bad or kernels}; choose from {','.join(KERNELS)}")
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")

    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    gpu_reason = gpu_skip_reason(device)
    small = device.platform != "gpu"  # CPU etc.: tiny sizes whatever --quick says
    if gpu_reason is not None:
        print(f"NOTE: {gpu_reason}: the Mosaic GPU kernels and GPU-only peers are skipped; only the jnp "
              f"references and XLA peers run{', at tiny sizes' if small else ''}.", flush=True)

    rooflines = measure_rooflines(dtype=dtype, small=small, iters=args.iters,
                                  warmup=args.warmup)
    rows: list[dict] = []
    progress = not args.no_progress
    if "flash" in kernels:
        rows += run_rows("flash", flash_shapes(small=small, quick=args.quick),
                         lambda s: flash_impls(s, dtype), make_flash_inputs, lambda s: s.flops, "tflops",
                         rooflines.get("matmul", {}).get("tflops"), dtype=dtype,
                         iters=args.iters, warmup=args.warmup, progress=progress)
    if "paged" in kernels:
        rows += run_rows("paged", paged_shapes(small=small, quick=args.quick),
                         lambda s: paged_impls(s, dtype), make_paged_inputs,
                         lambda s: s.bytes(dtype.itemsize), "gb_per_s",
                         rooflines.get("copy", {}).get("gb_per_s"), dtype=dtype,
                         iters=args.iters, warmup=args.warmup, progress=progress)

    errors: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            msgs = errors.setdefault(f"{r['kernel']}/{r['impl']}", [])
            msg = f"{r['status']}: {r['reason']}"
            if msg not in msgs:
                msgs.append(msg)
    out = dict(device=dict(kind=getattr(device, "device_kind", str(device)), platform=device.platform,
                           compute_capability=str(getattr(device, "compute_capability", None)),
                           count=jax.device_count()),
               jax_version=jax.__version__, jaxlib_version=getattr(importlib.import_module("jaxlib"), "__version__", None),
               python=platform.python_version(), machine=platform.platform(), dtype=dtype.name,
               quick=args.quick, small=small, iters=args.iters, warmup=args.warmup,
               gpu_kernels=("run" if gpu_reason is None else f"skipped: {gpu_reason}"),
               rooflines=rooflines, rows=rows, errors=errors)

    print(f"device: {out['device']['kind']} ({device.platform}); jax {jax.__version__}; dtype {dtype.name}; "
          f"{args.iters} runs after {args.warmup} warm-up")
    print_table(rows, rooflines)
    if args.json:
        write_json(args.json, out, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
