"""The three pure steps: `insert`, `decode` (and `decode_steps`, several per host sync), `evict`.

Each takes (EngineConfig [static], Model, EngineState, ...) and returns a new EngineState plus
small per-slot outputs. No globals, no host callbacks: they compose with the caller's own
`jit`, `lax.scan` or `lax.while_loop`. The jitted entry points donate the state, so the KV
pool is updated in place.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxinfer import allocator
from jaxinfer.attention import decode_attention, prefill_attention
from jaxinfer.model import Model, decoder, lm_head
from jaxinfer.dims import AnyArray
from jaxinfer.sampling import process_logits, sample, token_logprobs
from jaxinfer.state import (
    FINISH_ABORT, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, NULL_PAGE, EngineConfig, EngineState,
)


@flax.struct.dataclass
class Requests:
    """A padded batch of requests for `insert`. Rows with length 0 are empty (ignored)."""

    tokens: Int[AnyArray, "batch seq"]
    length: Int[AnyArray, "batch"]
    request_id: Int[AnyArray, "batch"]
    max_tokens: Int[AnyArray, "batch"]
    temperature: Float[AnyArray, "batch"]
    top_k: Int[AnyArray, "batch"]
    top_p: Float[AnyArray, "batch"]
    min_p: Float[AnyArray, "batch"]
    rng: UInt32[AnyArray, "batch 2"]
    stop_ids: Int[AnyArray, "batch max_stops"]
    min_tokens: Int[AnyArray, "batch"]
    repetition_penalty: Float[AnyArray, "batch"]
    presence_penalty: Float[AnyArray, "batch"]
    frequency_penalty: Float[AnyArray, "batch"]
    logprobs: Int[AnyArray, "batch"]  # top-k logprobs per generated token; -1 = none
    prompt_logprobs: Int[AnyArray, "batch"]  # top-k logprobs per prompt token; -1 = none


def make_requests(cfg: EngineConfig, prompts, params, request_ids, batch: int, seq: int) -> Requests:
    """Host side: pack prompts (lists of ints) and SamplingParams into a numpy `Requests` batch
    of shape [batch, seq] (a bucket). Stop ids must already include EOS and fit max_stop_ids."""
    tokens = np.zeros((batch, seq), np.int32)
    f32 = lambda v: np.full((batch,), v, np.float32)  # noqa: E731
    i32 = lambda v: np.full((batch,), v, np.int32)  # noqa: E731
    r = dict(tokens=tokens, length=i32(0), request_id=i32(-1), max_tokens=i32(1), temperature=f32(0),
             top_k=i32(0), top_p=f32(1), min_p=f32(0), rng=np.zeros((batch, 2), np.uint32),
             stop_ids=np.full((batch, cfg.max_stop_ids), -1, np.int32), min_tokens=i32(0),
             repetition_penalty=f32(1), presence_penalty=f32(0), frequency_penalty=f32(0),
             logprobs=i32(-1), prompt_logprobs=i32(-1))
    for row, (prompt, sp, rid) in enumerate(zip(prompts, params, request_ids)):
        tokens[row, : len(prompt)] = prompt
        r["length"][row], r["request_id"][row], r["max_tokens"][row] = len(prompt), rid, sp.max_tokens
        r["temperature"][row], r["top_k"][row] = sp.temperature, sp.top_k
        r["top_p"][row], r["min_p"][row] = sp.top_p, sp.min_p
        # Threefry key data for a 32-bit seed, as jax.random.key(seed) makes it, without a device op.
        seed = sp.seed if sp.seed is not None else int(np.random.default_rng().integers(2**32))
        r["rng"][row] = (0, seed)
        r["stop_ids"][row, : len(sp.stop_token_ids)] = sp.stop_token_ids
        r["min_tokens"][row], r["repetition_penalty"][row] = sp.min_tokens, sp.repetition_penalty
        r["presence_penalty"][row], r["frequency_penalty"][row] = sp.presence_penalty, sp.frequency_penalty
        r["logprobs"][row] = -1 if sp.logprobs is None else min(sp.logprobs, cfg.max_logprobs)
        r["prompt_logprobs"][row] = -1 if sp.prompt_logprobs is None else min(sp.prompt_logprobs, cfg.max_logprobs)
    return Requests(**r)


@flax.struct.dataclass
class InsertResult:
    accepted: Bool[AnyArray, "batch"]  # False: no free slot or not enough free pages (row untouched)
    slot: Int[AnyArray, "batch"]  # slot the request went to (max_slots when not accepted)
    token: Int[AnyArray, "batch"]  # first generated token
    finished: Bool[AnyArray, "batch"]
    # Raw-model logprobs (log_softmax before penalties/temperature; zeros unless some accepted
    # row asked): the first token's, and the top max_logprobs ids and logprobs.
    logprob: Float[AnyArray, "batch"]
    top_ids: Int[AnyArray, "batch max_logprobs"]
    top_logprobs: Float[AnyArray, "batch max_logprobs"]
    # Prompt token i's logprob given tokens < i, and the top-k at that position (index 0, which
    # has no prefix, is 0); zeros unless some accepted row asked for prompt_logprobs.
    prompt_logprob: Float[AnyArray, "batch seq"]
    prompt_top_ids: Int[AnyArray, "batch seq max_logprobs"]
    prompt_top_logprobs: Float[AnyArray, "batch seq max_logprobs"]


def _finish(state: EngineState, running, token, cfg: EngineConfig):
    """Stop/length detection after `token` was sampled for running slots (length and
    num_generated already updated). Returns (finished, finish_reason)."""
    is_stop = jnp.any(token[:, None] == state.stop_ids, axis=-1)
    # The sampled token still needs a cache position to be fed back: stop when none is left.
    out_of_room = (state.num_generated >= state.max_tokens) | (state.length + 1 >= cfg.max_seq_len)
    reason = jnp.where(is_stop, FINISH_STOP, jnp.where(out_of_room, FINISH_LENGTH, FINISH_NONE))
    newly = running & (reason != FINISH_NONE)
    return state.finished | newly, jnp.where(newly, reason, state.finish_reason)


def insert(cfg: EngineConfig, model: Model, state: EngineState, req: Requests) -> tuple[EngineState, InsertResult]:
    """Prefill a batch of requests into free slots and sample each one's first token.

    Design: slot and page assignment are computed with cumulative sums (request r goes to the
    r-th free slot and takes the next ceil(len / page_size) free pages); a request is accepted
    only if it and all before it fit, so rejection is a clean no-op for that row. The prompt's
    K/V is scattered into the new pages layer by layer; padded positions and rejected rows
    write to the null page.
    """
    s, ps = cfg.max_slots, cfg.page_size
    b, t = req.tokens.shape
    valid = req.length > 0
    free_slot = ~state.active
    rank = jnp.cumsum(valid) - 1
    slots_ok = valid & (rank < jnp.sum(free_slot))
    need = jnp.where(slots_ok, -(-req.length // ps), 0)
    pages, granted, refcount = allocator.allocate(state.page_refcount, need, cfg.pages_per_seq)
    accepted = slots_ok & granted
    free_ids = jnp.nonzero(free_slot, size=s, fill_value=s)[0]
    slot = jnp.where(accepted, free_ids[jnp.clip(rank, 0, s - 1)], s)

    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    in_prompt = accepted[:, None] & (pos < req.length[:, None])
    write_page = jnp.where(in_prompt, jnp.take_along_axis(pages, jnp.minimum(pos // ps, pages.shape[1] - 1), 1), NULL_PAGE)
    write_off = pos % ps
    window = model.config.sliding_window

    def attend(i, q, k, v, kv):
        kp, vp = kv
        kp = kp.at[i, write_page, write_off].set(k.astype(kp.dtype))
        vp = vp.at[i, write_page, write_off].set(v.astype(vp.dtype))
        o = prefill_attention(q, k, v, lengths=req.length, sliding_window=window, backend=cfg.attention_backend)
        return o, (kp, vp)

    h, (k_pages, v_pages) = decoder(model, req.tokens, pos, attend, (state.k_pages, state.v_pages))
    last = jnp.take_along_axis(h, jnp.maximum(req.length - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = lm_head(model, last)
    v = logits.shape[-1]
    rows = jnp.arange(b)[:, None]
    # Penalty history of the new requests: the prompt's tokens are seen; no output counts yet.
    seen = jnp.zeros((b, v), bool).at[rows, jnp.where(in_prompt, req.tokens, v)].set(True, mode="drop")
    no_counts = jnp.zeros((b, v), jnp.int32)
    processed = process_logits(logits, jnp.zeros((b,), jnp.int32), req.min_tokens, req.stop_ids, seen, no_counts,
                               req.repetition_penalty, req.presence_penalty, req.frequency_penalty)
    token = sample(processed, req.temperature, req.top_k, req.top_p, req.min_p, req.rng, jnp.zeros((b,), jnp.int32))
    k = cfg.max_logprobs
    logprob, top_ids, top_logprobs = token_logprobs(logits, token, k, jnp.any(accepted & (req.logprobs >= 0)))
    seen = seen.at[rows[:, 0], token].set(True)
    counts = no_counts.at[rows[:, 0], token].set(1)

    def prompt_scores(_):
        # Full-prompt logits only on this branch: position i's logits score token i + 1.
        return token_logprobs(lm_head(model, h[:, :-1]), req.tokens[:, 1:], k, jnp.bool_(True))

    def no_scores(_):
        return (jnp.zeros((b, t - 1), jnp.float32), jnp.zeros((b, t - 1, k), jnp.int32),
                jnp.zeros((b, t - 1, k), jnp.float32))

    p_lp, p_ids, p_top = jax.lax.cond(jnp.any(accepted & (req.prompt_logprobs >= 0)), prompt_scores, no_scores, None)
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1)  # noqa: E731  align to token i
    p_lp, p_ids, p_top = shift(p_lp), shift(p_ids), shift(p_top)

    # Scatter the accepted rows into their slots; rejected rows target slot s and are dropped.
    def put(field, value):
        return field.at[slot].set(value.astype(field.dtype), mode="drop")

    st = state.replace(
        k_pages=k_pages, v_pages=v_pages, page_refcount=refcount,
        page_table=put(state.page_table, pages),
        active=put(state.active, accepted), finished=put(state.finished, jnp.zeros_like(accepted)),
        finish_reason=put(state.finish_reason, jnp.zeros_like(req.length)),
        request_id=put(state.request_id, req.request_id), length=put(state.length, req.length),
        last_token=put(state.last_token, token), num_generated=put(state.num_generated, jnp.ones_like(token)),
        max_tokens=put(state.max_tokens, req.max_tokens), temperature=put(state.temperature, req.temperature),
        top_k=put(state.top_k, req.top_k), top_p=put(state.top_p, req.top_p), min_p=put(state.min_p, req.min_p),
        rng=put(state.rng, req.rng), stop_ids=put(state.stop_ids, req.stop_ids),
        min_tokens=put(state.min_tokens, req.min_tokens),
        repetition_penalty=put(state.repetition_penalty, req.repetition_penalty),
        presence_penalty=put(state.presence_penalty, req.presence_penalty),
        frequency_penalty=put(state.frequency_penalty, req.frequency_penalty),
        logprobs=put(state.logprobs, req.logprobs), seen=put(state.seen, seen), counts=put(state.counts, counts),
    )
    new = jnp.zeros((s,), bool).at[slot].set(True, mode="drop")
    finished, reason = _finish(st, new, st.last_token, cfg)
    st = st.replace(finished=finished, finish_reason=reason)
    done = jnp.take(finished, jnp.minimum(slot, s - 1)) & accepted
    return st, InsertResult(accepted=accepted, slot=slot, token=token, finished=done, logprob=logprob,
                            top_ids=top_ids, top_logprobs=top_logprobs, prompt_logprob=p_lp,
                            prompt_top_ids=p_ids, prompt_top_logprobs=p_top)


@flax.struct.dataclass
class DecodeResult:
    # [slots] from decode; [steps, slots] from decode_steps (lax.scan stacks them).
    token: Int[AnyArray, "*steps slots"]
    emitted: Bool[AnyArray, "*steps slots"]  # True where `token` is a new token of a running request
    # Raw-model logprobs of `token` and the top max_logprobs (zeros unless a running slot asked).
    logprob: Float[AnyArray, "*steps slots"]
    top_ids: Int[AnyArray, "*steps slots max_logprobs"]
    top_logprobs: Float[AnyArray, "*steps slots max_logprobs"]


def decode_forward(cfg: EngineConfig, model: Model, state: EngineState) -> tuple[EngineState, Float[Array, "slots vocab"], Bool[Array, "slots"]]:
    """Feed every running slot's pending `last_token`: allocate its page if needed, write its
    K/V, attend over the slot's pages, and return the next-token logits. No sampling.

    Design: the token goes to position `length`; if that position opens a new page, one is
    allocated (vectorised over slots). A slot that cannot get a page finishes with reason
    "abort" instead of corrupting anything. K/V are written before attention so the query sees
    itself; non-running slots write to the null page and attend to nothing. Returns the new
    state (length advanced), logits [slots, vocab] float32 and the mask of slots that ran.
    Useful on its own for scoring / teacher forcing: set `last_token` and call it.
    """
    s, ps = cfg.max_slots, cfg.page_size
    running = state.running
    pos = state.length
    page_idx = jnp.minimum(pos // ps, cfg.pages_per_seq - 1)
    need = (running & (pos % ps == 0)).astype(jnp.int32)
    new_pages, granted, refcount = allocator.allocate(state.page_refcount, need, 1)
    starved = (need > 0) & ~granted
    running = running & ~starved
    rows = jnp.arange(s)
    page_table = state.page_table.at[rows, page_idx].set(
        jnp.where((need > 0) & granted, new_pages[:, 0], state.page_table[rows, page_idx])
    )
    write_page = jnp.where(running, page_table[rows, page_idx], NULL_PAGE)[:, None]
    write_off = (pos % ps)[:, None]
    attn_len = jnp.where(running, pos + 1, 0)
    window = model.config.sliding_window

    def attend(i, q, k, v, kv):
        kp, vp = kv
        kp = kp.at[i, write_page, write_off].set(k.astype(kp.dtype))
        vp = vp.at[i, write_page, write_off].set(v.astype(vp.dtype))
        o = decode_attention(q[:, 0], kp[i], vp[i], page_table, attn_len, sliding_window=window,
                             backend=cfg.attention_backend)
        return o[:, None], (kp, vp)

    h, (k_pages, v_pages) = decoder(model, state.last_token[:, None], pos[:, None], attend,
                                    (state.k_pages, state.v_pages))
    st = state.replace(
        k_pages=k_pages, v_pages=v_pages, page_refcount=refcount, page_table=page_table,
        length=jnp.where(running, pos + 1, pos),
        finished=state.finished | starved,
        finish_reason=jnp.where(starved, FINISH_ABORT, state.finish_reason),
    )
    return st, lm_head(model, h[:, 0]), running


def decode(cfg: EngineConfig, model: Model, state: EngineState) -> tuple[EngineState, DecodeResult]:
    """One token for every running slot: `decode_forward`, logits processing (min_tokens,
    penalties), sample, logprobs, penalty-history update, stop/length detection."""
    st, logits, running = decode_forward(cfg, model, state)
    processed = process_logits(logits, st.num_generated, st.min_tokens, st.stop_ids, st.seen, st.counts,
                               st.repetition_penalty, st.presence_penalty, st.frequency_penalty)
    token = sample(processed, st.temperature, st.top_k, st.top_p, st.min_p, st.rng, st.num_generated)
    logprob, top_ids, top_logprobs = token_logprobs(logits, token, cfg.max_logprobs,
                                                    jnp.any(running & (st.logprobs >= 0)))
    # One scatter per slot; idle slots point out of bounds (column vocab) and are dropped.
    rows, col = jnp.arange(cfg.max_slots), jnp.where(running, token, logits.shape[-1])
    st = st.replace(
        last_token=jnp.where(running, token, st.last_token),
        num_generated=st.num_generated + running,
        seen=st.seen.at[rows, col].set(True, mode="drop"),
        counts=st.counts.at[rows, col].add(1, mode="drop"),
    )
    finished, reason = _finish(st, running, token, cfg)
    st = st.replace(finished=finished, finish_reason=reason)
    return st, DecodeResult(token=token, emitted=running, logprob=logprob, top_ids=top_ids,
                            top_logprobs=top_logprobs)


def decode_steps(cfg: EngineConfig, model: Model, state: EngineState, num_steps: int):
    """`num_steps` decode steps on device (one host sync for all): tokens/emitted [steps, slots]."""
    def body(st, _):
        st, out = decode(cfg, model, st)
        return st, out

    return jax.lax.scan(body, state, None, length=num_steps)


def evict(cfg: EngineConfig, state: EngineState, mask: Bool[Array, "slots"] | None = None) -> EngineState:
    """Free the slots in `mask` (default: every finished slot): drop their page references and
    clear their table rows. Pages whose count reaches 0 are free for the next allocation."""
    if mask is None:
        mask = state.active & state.finished
    mask = mask & state.active
    refcount = allocator.release(state.page_refcount, state.page_table, mask)
    return state.replace(
        page_refcount=refcount,
        page_table=jnp.where(mask[:, None], NULL_PAGE, state.page_table),
        active=state.active & ~mask,
        finished=state.finished & ~mask,
        finish_reason=jnp.where(mask, FINISH_NONE, state.finish_reason),
        request_id=jnp.where(mask, -1, state.request_id),
        length=jnp.where(mask, 0, state.length),
        num_generated=jnp.where(mask, 0, state.num_generated),
        # Back to the defaults, so the penalty / logprob lax.conds take their cheap branch
        # once the requests that used them are gone.
        min_tokens=jnp.where(mask, 0, state.min_tokens),
        repetition_penalty=jnp.where(mask, 1.0, state.repetition_penalty),
        presence_penalty=jnp.where(mask, 0.0, state.presence_penalty),
        frequency_penalty=jnp.where(mask, 0.0, state.frequency_penalty),
        logprobs=jnp.where(mask, -1, state.logprobs),
    )


# Jitted entry points. The state (argument 2) is donated: its buffers are reused for the result.
insert_jit = jax.jit(insert, static_argnums=0, donate_argnums=2)
decode_forward_jit = jax.jit(decode_forward, static_argnums=0, donate_argnums=2)
decode_jit = jax.jit(decode, static_argnums=0, donate_argnums=2)
decode_steps_jit = jax.jit(decode_steps, static_argnums=(0, 3), donate_argnums=2)
evict_jit = jax.jit(evict, static_argnums=0, donate_argnums=1)
