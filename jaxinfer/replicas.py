"""Data parallelism: `dp` independent engine replicas behind one engine interface.

`Engine(model, ..., mesh=mesh)` with a mesh whose "data" axis has dp > 1 returns a
`ReplicatedEngine`: one `Engine` per row of the mesh (a (1, tp) sub-mesh: its own devices,
slots, pages, prefix cache and scheduler), each running the model tensor-parallel over its tp
devices. A replica's weights are the shards of the one model that sit on its devices (the
model is laid out replicated over "data", so building the replicas copies nothing).

Requests go to the replica with the fewest requests in flight (ties: the lowest index), so
the load spreads and the assignment is a pure function of the call sequence: every process of
a multi-host run (which all run this same program) assigns alike. Request ids stay unique
across replicas (replica r hands out r, r + dp, r + 2 dp, ...), so `abort`, `output` and
`forget` find the replica from the id. One `step()` steps every replica with work; a
replica's output is exactly a one-replica engine's (same model, same requests in the same
order within the replica).

Not yet with dp > 1: speculative decoding, `snapshot` / `restore`, `update_params`, the HTTP
server (each needs one engine's state; they raise).
"""

from __future__ import annotations

import collections

import jax
from jax.sharding import Mesh, NamedSharding

from jaxinfer.engine import Engine, Stream, _Consumer, _deferred_sigint, prompt_list
from jaxinfer.errors import InvalidRequestError
from jaxinfer.model import Model
from jaxinfer.request import Request, RequestOutput, StreamDelta
from jaxinfer.sharding import DATA, MODEL, check_mesh, dp_size

_SUMMED = ("pages_total", "pages_used", "pages_free", "pages_cached", "pages_cached_free", "prompt_tokens",
           "prefix_cache_hit_tokens", "prefill_tokens", "preemptions", "running", "waiting", "kv_pool_bytes")


def replica_mesh(mesh: Mesh, r: int) -> Mesh:
    """Row r of a ("data", "model") mesh as a (1, tp) mesh."""
    return Mesh(mesh.devices[r:r + 1], (DATA, MODEL))


def _restrict(x, sub: Mesh):
    """A mesh-wide array as the array of its shards on `sub`'s devices (no copy)."""
    sharding = NamedSharding(sub, x.sharding.spec)
    shards = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [shards[d] for d in sharding.addressable_devices_indices_map(x.shape)])


class ReplicatedEngine:
    """dp engine replicas behind the Engine API (generate, stream, add_request / step, abort,
    output(s), forget, stats); see the module docstring. Build it with `Engine(..., mesh=mesh)`."""

    def __init__(self, model: Model, *args, mesh: Mesh, **kwargs):
        check_mesh(mesh)
        if not isinstance(model, Model):
            raise TypeError(f"Engine(model=...) must be a jaxinfer Model, got {type(model).__name__}")
        if kwargs.get("speculative") is not None:
            raise ValueError("speculative decoding is not supported on a mesh yet; use Engine(mesh=None)")
        if model.mesh is None:
            model = model.on_mesh(mesh)
        elif model.mesh != mesh:
            raise ValueError(f"Engine(mesh=): the model is laid out on another mesh ({dict(model.mesh.shape)})")
        self.mesh = mesh
        self.dp = dp_size(mesh)
        self.replicas: list[Engine] = []
        for r in range(self.dp):
            sub = replica_mesh(mesh, r)
            sub_model = model.replace(params=jax.tree.map(lambda x: _restrict(x, sub), model.params), mesh=sub)
            engine = Engine(sub_model, *args, mesh=sub, **kwargs)
            engine._next_id, engine._id_stride = r, self.dp
            self.replicas.append(engine)
        first = self.replicas[0]
        self.model, self.cfg, self.tokenizer = model, first.cfg, first.tokenizer
        self._closed: collections.deque[_Consumer] = collections.deque()

    def _owner(self, request_id: int) -> Engine | None:
        return self.replicas[request_id % self.dp] if isinstance(request_id, int) and request_id >= 0 else None

    def _make_all(self, prompts, params) -> list[Request]:
        """Validate every request and give each a replica (least loaded first); nothing queued."""
        prompts, plist = prompt_list(prompts, params)
        load = [len(e._live) for e in self.replicas]
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            r = min(range(self.dp), key=lambda j: (load[j], j))
            try:
                reqs.append(self.replicas[r]._make(p, sp))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"request {i}: {e}") from None
            load[r] += 1
        return reqs

    def _queue(self, reqs: list[Request], consumer: _Consumer | None) -> None:
        with _deferred_sigint():
            for r in reqs:
                self._owner(r.rid)._queue([r], consumer)

    def _advance(self) -> None:
        while self._closed:
            self._release(self._closed.popleft())
        for e in self.replicas:
            if e.has_unfinished():
                e._advance()

    def _release(self, consumer: _Consumer) -> None:
        consumer.released = True
        consumer.queue.clear()
        for r in consumer.requests:
            if not r.out.finished:
                self.abort(r.rid)

    # ------------------------------------------------------------------ the Engine API
    def generate(self, prompts, params=None) -> list[RequestOutput]:
        """As Engine.generate: outputs in prompt order; the replicas step together."""
        reqs = self._make_all(prompts, params)
        consumer = _Consumer(reqs)
        with _deferred_sigint() as held:
            self._queue(reqs, consumer)
            try:
                while not all(r.out.finished for r in reqs):
                    held.poll()
                    self._advance()
                    consumer.queue.clear()
            finally:
                self._release(consumer)
        return [r.out for r in reqs]

    def stream(self, prompts, params=None) -> Stream:
        """As Engine.stream."""
        reqs = self._make_all(prompts, params)
        consumer = _Consumer(reqs)
        self._queue(reqs, consumer)
        return Stream(self, consumer)

    def add_request(self, prompt, params=None) -> int:
        """As Engine.add_request: queued on the least loaded replica."""
        r = min(range(self.dp), key=lambda j: (len(self.replicas[j]._live), j))
        return self.replicas[r].add_request(prompt, params)

    def step(self) -> list[StreamDelta]:
        """One step of every replica that has work; the `add_request` deltas of all."""
        out: list[StreamDelta] = []
        while self._closed:
            self._release(self._closed.popleft())
        for e in self.replicas:
            if e.has_unfinished():
                out.extend(e.step())
        return out

    def abort(self, request_id: int) -> bool:
        e = self._owner(request_id)
        return False if e is None else e.abort(request_id)

    def output(self, request_id: int) -> RequestOutput | None:
        e = self._owner(request_id)
        return None if e is None else e.output(request_id)

    def outputs(self) -> list[RequestOutput]:
        return sorted((o for e in self.replicas for o in e.outputs()), key=lambda o: o.request_id)

    def forget(self, request_id: int) -> None:
        e = self._owner(request_id)
        if e is not None:
            e.forget(request_id)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.replicas)

    def run_until_idle(self) -> None:
        while self.has_unfinished():
            self.step()

    def bucket_plan(self) -> dict[str, list]:
        return self.replicas[0].bucket_plan()

    def stats(self) -> dict:
        """The replicas' counters summed (pages, tokens, requests), the KV format of one, and
        each replica's own under "replicas"."""
        per = [e.stats() for e in self.replicas]
        out = {k: sum(s[k] for s in per) for k in _SUMMED}
        out["prefix_cache_hit_rate"] = out["prefix_cache_hit_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
        out.update(kv_dtype=per[0]["kv_dtype"], kv_bytes_per_token=per[0]["kv_bytes_per_token"], dp=self.dp,
                   replicas=per)
        return out

    def _unsupported(self, what: str):
        raise NotImplementedError(f"{what} is not supported with data-parallel replicas (dp = {self.dp}) yet; "
                                  "use one replica per engine")

    def snapshot(self, path):
        self._unsupported("snapshot")

    def update_params(self, params, on_update: str = "recompute"):
        self._unsupported("update_params")


Engine._replicated_cls = ReplicatedEngine  # Engine(..., mesh with dp > 1) builds one
