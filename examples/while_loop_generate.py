"""A whole generate loop inside ONE `jax.jit`, with `lax.while_loop`: no host loop, no Engine.

This is how to embed jaxinfer in research code: the steps in `jaxinfer.steps` (`insert`,
`decode`, `evict`) are pure functions of (config, model, state, ...), so they can be traced into
your own jitted function like any other JAX code. Here they drive continuous batching over a
queue of pre-tokenized prompts, entirely on device:

    while requests are queued or slots are busy:
        evict the finished slots (recording why they finished)
        if a slot is free: insert the next queued request(s)   (prefill + first token)
        decode one token for every running slot
        write each new token into out[request_id, token_index]

Assumptions, kept simple on purpose:
- `queue.request_id[i] == i`: the request id is the row of the output buffer.
- every request's `max_tokens` <= the buffer width `max_tokens`.
- every prompt fits the empty pool on its own (then the loop always makes progress: a slot that
  runs out of pages mid-decode finishes with "abort" and frees its pages).

Run it from the repository root (with jaxinfer installed, or PYTHONPATH=.):
    python examples/while_loop_generate.py
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling import SamplingParams
from jaxinfer.state import FINISH_REASONS, EngineConfig, init_state
from jaxinfer.steps import Requests, decode, evict, insert, make_requests


def make_queue(cfg: EngineConfig, model, prompts: list[list[int]], params) -> Requests:
    """Host side: pack every prompt into one Requests batch padded to a single prefill bucket.
    `params` is one SamplingParams for all prompts or one per prompt. Stop ids get the model's
    EOS ids added unless ignore_eos (as the Engine does); request i gets id i; a missing seed
    becomes i."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    eos = tuple(model.config.eos_token_ids)
    params = [dataclasses.replace(p, seed=i if p.seed is None else p.seed, stop_token_ids=tuple(
                  dict.fromkeys([*(() if p.ignore_eos else eos), *p.stop_token_ids])))
              for i, p in enumerate(params)]
    bucket = cfg.prefill_bucket(max(len(p) for p in prompts))
    return make_requests(cfg, prompts, params, list(range(len(prompts))), batch=len(prompts), seq=bucket)


@functools.partial(jax.jit, static_argnums=(0, 3))
def generate_in_jit(cfg: EngineConfig, model, queue: Requests, max_tokens: int):
    """Runs every request in `queue` to completion inside one jitted while_loop.

    Returns (tokens [N, max_tokens] with -1 after each request's last token,
             finish_reason [N] FINISH_* codes, the final EngineState).
    """
    n = queue.length.shape[0]
    offer = cfg.max_prefill_batch  # queued requests offered to `insert` per iteration

    def admit(carry):
        """Insert the next `offer` queued requests; insert accepts a prefix of them (as many as
        there are free slots and pages), so the queue pointer just advances by that count."""
        state, next_req, tokens = carry
        rows = next_req + jnp.arange(offer)
        batch = jax.tree.map(lambda x: x[jnp.minimum(rows, n - 1)], queue)
        batch = batch.replace(length=jnp.where(rows < n, batch.length, 0))  # length 0 = empty row
        state, res = insert(cfg, model, state, batch)
        rid = jnp.where(res.accepted, batch.request_id, n)  # n is out of bounds: dropped
        tokens = tokens.at[rid, 0].set(res.token, mode="drop")
        return state, next_req + jnp.sum(res.accepted), tokens

    def body(carry):
        state, next_req, tokens, reason = carry

        # 1. Evict finished slots, first recording their finish reasons by request id.
        done = state.active & state.finished
        reason = reason.at[jnp.where(done, state.request_id, n)].set(state.finish_reason, mode="drop")
        state = evict(cfg, state)

        # 2. Admit queued requests, only when a slot is free (prefill is the expensive part).
        can_admit = (next_req < n) & jnp.any(~state.active)
        state, next_req, tokens = jax.lax.cond(can_admit, admit, lambda c: c, (state, next_req, tokens))

        # 3. One decode step; token index num_generated - 1 of each emitting slot's request.
        state, out = decode(cfg, model, state)
        rid = jnp.where(out.emitted, state.request_id, n)
        tokens = tokens.at[rid, state.num_generated - 1].set(out.token, mode="drop")
        return state, next_req, tokens, reason

    def cond(carry):
        state, next_req, _, _ = carry
        return (next_req < n) | jnp.any(state.active)

    init = (
        init_state(cfg, model.config, model.dtype),
        jnp.int32(0),
        jnp.full((n, max_tokens), -1, jnp.int32),
        jnp.zeros((n,), jnp.int32),
    )
    state, _, tokens, reason = jax.lax.while_loop(cond, body, init)
    return tokens, reason, state


def main() -> None:
    from jaxinfer.presets import get_preset
    from jaxinfer.weights import dummy_model

    model = dummy_model(get_preset("tiny"))
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=64, max_seq_len=64, max_prefill_batch=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 30, size=10)]
    params = SamplingParams(max_tokens=12, temperature=0.0)

    queue = make_queue(cfg, model, prompts, params)
    tokens, reason, state = generate_in_jit(cfg, model, queue, params.max_tokens)
    tokens, reason = np.asarray(tokens), np.asarray(reason)
    for i, prompt in enumerate(prompts):
        out = tokens[i][tokens[i] >= 0].tolist()
        print(f"request {i}: prompt {len(prompt):2d} tokens -> {out} ({FINISH_REASONS[int(reason[i])]})")
    print("pages in use at the end:", int(np.sum(np.asarray(state.page_refcount)[1:])))


if __name__ == "__main__":
    main()
