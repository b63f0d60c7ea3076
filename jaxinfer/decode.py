"""Decode: one token for every running slot (`decode`), or a burst of them in one device call
(`decode_steps`), as pure functions over the EngineState (re-exported by jaxinfer/steps.py).

A burst does only the work its tokens need:
- `slots=B` decodes the first B slots only (the engine keeps the running requests there), so
  an engine with 32 slots and 5 requests computes 5-ish rows, not 32;
- `span=T` bounds attention to the first T positions (a bucket over the live lengths, not
  max_seq_len); on the "xla" attention path (CPU) each layer's K/V for those positions are
  gathered once per burst into a dense view that every step reads and appends to in place;
- the burst is a `lax.while_loop` that stops as soon as no slot is running.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxinfer import allocator, grammar
from jaxinfer.attention import decode_attention, decode_view, uses_views, view_attention, view_write, write_layer_kv
from jaxinfer.dims import AnyArray
from jaxinfer.model import Model, decoder, lm_head
from jaxinfer.sampling import process_logits, sample, token_logprobs
from jaxinfer.state import (
    FINISH_ABORT, FINISH_DEAD_END, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, NULL_PAGE, SLOT_FIELDS, EngineConfig, EngineState,
)


@flax.struct.dataclass
class DecodeResult:
    # [slots] from decode; [steps, slots] from decode_steps (slots = its `slots` argument).
    token: Int[AnyArray, "*steps slots"]
    emitted: Bool[AnyArray, "*steps slots"]  # True where `token` is a new token of a running request
    # Raw-model logprobs of `token` and the top max_logprobs (zeros unless a running slot asked).
    logprob: Float[AnyArray, "*steps slots"]
    top_ids: Int[AnyArray, "*steps slots max_logprobs"]
    top_logprobs: Float[AnyArray, "*steps slots max_logprobs"]


def _finish(state: EngineState, running, token, cfg: EngineConfig):
    """Stop/length detection after `token` was sampled for running slots (length and
    num_generated already updated). Returns (finished, finish_reason)."""
    is_stop = jnp.any(token[:, None] == state.stop_ids, axis=-1)
    # The sampled token still needs a cache position to be fed back: stop when none is left.
    out_of_room = (state.num_generated >= state.max_tokens) | (state.length + 1 >= cfg.max_seq_len)
    reason = jnp.where(is_stop, FINISH_STOP, jnp.where(out_of_room, FINISH_LENGTH, FINISH_NONE))
    newly = running & (reason != FINISH_NONE)
    return state.finished | newly, jnp.where(newly, reason, state.finish_reason)


def _forward(cfg: EngineConfig, model: Model, state: EngineState, running, views, span: int):
    """decode_forward's body: attention reads positions < span; with `views` (one per layer) it
    reads and appends to them instead of the pages."""
    s, ps = state.length.shape[0], cfg.page_size
    pos = state.length
    rows = jnp.arange(s)
    page_idx = jnp.minimum(pos // ps, cfg.pages_per_seq - 1)
    need = running & (state.page_table[rows, page_idx] == NULL_PAGE)

    def alloc(a):
        return allocator.allocate(a, need.astype(jnp.int32), 1)

    def no_alloc(a):
        return a, jnp.zeros((s, 1), jnp.int32), jnp.ones((s,), bool)

    a, new_pages, granted = jax.lax.cond(jnp.any(need), alloc, no_alloc, state.alloc)
    starved = need & ~granted
    running = running & ~starved
    page_table = state.page_table.at[rows, page_idx].set(
        jnp.where(need & granted, new_pages[:, 0], state.page_table[rows, page_idx])
    )
    write_page = jnp.where(running, page_table[rows, page_idx], NULL_PAGE)
    write_off = pos % ps
    attn_len = jnp.where(running, pos + 1, 0)
    view_pos = jnp.where(running, pos, span)  # views: idle slots point past the end and are dropped
    read_table = page_table[:, : span // ps]

    def attend(i, q, k, v, cache, spec):  # spec: the layer's window / soft-cap / scale
        pool, views = cache[:5], cache[5]
        # int8: K smoothed; 8-bit pools: quantized as written; k, v become what reads will see.
        q, k, v, (kp, vp, ks, vs, kc) = write_layer_kv(pool, i, write_page[:, None], write_off[:, None], q, k, v)
        if views is None:
            o = decode_attention(q[:, 0], kp, vp, i, read_table, attn_len, backend=cfg.attention_backend,
                                 k_scales=ks, v_scales=vs, **spec.kwargs())
        else:  # unstacked layers: i is a Python int, so views[i] is a buffer of its own
            view = view_write(views[i], k[:, 0], v[:, 0], view_pos)
            o = view_attention(q[:, 0], view, attn_len, **spec.kwargs())
            views = views[:i] + (view,) + views[i + 1:]
        return o[:, None], (kp, vp, ks, vs, kc, views)

    h, (k_pages, v_pages, k_scales, v_scales, _, views) = decoder(
        model, state.last_token[:, None], pos[:, None], attend,
        (state.k_pages, state.v_pages, state.k_scales, state.v_scales, state.k_channel, views))
    a = allocator.write_tokens(a, write_page, write_off, state.last_token)
    if cfg.prefix_caching:
        parent = jnp.where(page_idx > 0, page_table[rows, jnp.maximum(page_idx - 1, 0)], NULL_PAGE)
        a = allocator.register(a, write_page, parent, running & (write_off == ps - 1))
    st = state.replace(
        k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales, alloc=a, page_table=page_table,
        length=jnp.where(running, pos + 1, pos),
        finished=state.finished | starved,
        finish_reason=jnp.where(starved, FINISH_ABORT, state.finish_reason),
    )
    return st, lm_head(model, h[:, 0]), running, views


def decode_forward(cfg: EngineConfig, model: Model, state: EngineState,
                   mask: Bool[Array, "slots"] | None = None) -> tuple[EngineState, Float[Array, "slots vocab"], Bool[Array, "slots"]]:
    """Feed every running slot's pending `last_token` (only the slots in `mask`, if given):
    allocate its page if the position opens one, write its K/V, attend over the slot's pages,
    and return the next-token logits. No sampling.

    Design: the token goes to position `length`; a page is allocated (vectorised over slots)
    when that page-table entry is still the null page. A slot that cannot get a page finishes
    with reason "abort" instead of corrupting anything (the Engine preempts before that can
    happen). K/V are written before attention so the query sees itself; other slots write to
    the null page and attend to nothing. A page completed by this write is registered in the
    prefix cache. Returns the new state (length advanced), logits [slots, vocab] float32 and
    the mask of slots that ran. Useful on its own for scoring / teacher forcing.
    """
    running = state.running if mask is None else state.running & mask
    st, logits, running, _ = _forward(cfg, model, state, running, None, cfg.pages_per_seq * cfg.page_size)
    return st, logits, running


def _step(cfg: EngineConfig, model: Model, state: EngineState, running, views, span: int):
    st, logits, running, views = _forward(cfg, model, state, running, views, span)
    processed = process_logits(logits, st.num_generated, st.min_tokens, st.stop_ids, st.seen, st.counts,
                               st.repetition_penalty, st.presence_penalty, st.frequency_penalty)
    # Structured output: after the penalties, before temperature / top-k / top-p (vLLM's order).
    processed, dead = grammar.constrain(processed, running & (st.grammar >= 0), st.grammar, st.grammar_state,
                                        st.stop_ids, st.grammar_class, st.grammar_next, st.grammar_flags)
    running = running & ~dead  # a dead end emits nothing and finishes below
    token = sample(processed, st.temperature, st.top_k, st.top_p, st.min_p, st.rng, st.num_generated)
    logprob, top_ids, top_logprobs = token_logprobs(logits, token, cfg.max_logprobs,
                                                    jnp.any(running & (st.logprobs >= 0)))
    # One scatter per slot; idle slots point out of bounds (column vocab) and are dropped.
    rows, col = jnp.arange(token.shape[0]), jnp.where(running, token, logits.shape[-1])
    st = st.replace(
        last_token=jnp.where(running, token, st.last_token),
        num_generated=st.num_generated + running,
        seen=st.seen.at[rows, col].set(True, mode="drop"),
        counts=st.counts.at[rows, col].add(1, mode="drop"),
        grammar_state=grammar.advance(token, running, st.grammar, st.grammar_state, st.grammar_class, st.grammar_next),
    )
    finished, reason = _finish(st, running, token, cfg)
    st = st.replace(finished=finished | dead, finish_reason=jnp.where(dead, FINISH_DEAD_END, reason))
    return st, views, DecodeResult(token=token, emitted=running, logprob=logprob, top_ids=top_ids,
                                   top_logprobs=top_logprobs)


def decode(cfg: EngineConfig, model: Model, state: EngineState,
           mask: Bool[Array, "slots"] | None = None) -> tuple[EngineState, DecodeResult]:
    """One token for every running slot (in `mask`): `decode_forward`, logits processing
    (min_tokens, penalties), structured-output mask, sample, logprobs, penalty-history update,
    stop/length detection. A slot waiting for its host-side constraint mask does not run."""
    running = state.running if mask is None else state.running & mask
    running = running & ~grammar.stalled(state.grammar, state.grammar_state, state.grammar_flags)
    st, _, out = _step(cfg, model, state, running, None, cfg.pages_per_seq * cfg.page_size)
    return st, out


def take_slots(state: EngineState, n: int) -> EngineState:
    """The state restricted to its first n slots (the pool and the allocator stay whole)."""
    if n == state.length.shape[0]:
        return state
    return state.replace(**{f: getattr(state, f)[:n] for f in SLOT_FIELDS})


def put_slots(state: EngineState, sub: EngineState) -> EngineState:
    """`state` with `take_slots`'s result written back into its first slots."""
    n = sub.length.shape[0]
    if n == state.length.shape[0]:
        return sub
    rows = {f: getattr(state, f).at[:n].set(getattr(sub, f)) for f in SLOT_FIELDS}
    return sub.replace(**rows)


def decode_steps(cfg: EngineConfig, model: Model, state: EngineState, num_steps: int,
                 slots: int | None = None, span: int | None = None) -> tuple[EngineState, DecodeResult]:
    """Up to `num_steps` decode steps on device, one host sync for all; DecodeResult arrays are
    [num_steps, slots] (`emitted` False for steps not run).

    Design: only the first `slots` slots (default all) are decoded; slots beyond must not be
    running (the engine keeps its requests in the lowest slots). Attention reads positions
    < `span` only (default max_seq_len): a slot whose next position would not fit is not
    advanced in this call (it keeps its state; a call with a larger span continues it), so a
    too-small span costs progress, never correctness. On the "xla" attention path with an
    unstacked model (`Model.unstacked`) the K/V of those positions are gathered once into
    per-layer dense views, which each step reads and appends to; otherwise each step reads the
    pages. The loop is a `lax.while_loop` that ends early once no slot is running.
    """
    b = cfg.max_slots if slots is None else slots
    t = cfg.pages_per_seq * cfg.page_size if span is None else span
    if not 1 <= b <= cfg.max_slots or t % cfg.page_size or not cfg.page_size <= t <= cfg.pages_per_seq * cfg.page_size:
        raise ValueError(f"decode_steps: slots={slots} must be in [1, {cfg.max_slots}] and span={span} a multiple "
                         f"of page_size {cfg.page_size} in [{cfg.page_size}, {cfg.pages_per_seq * cfg.page_size}]")
    sub = take_slots(state, b)
    views = None
    if uses_views(cfg.attention_backend) and isinstance(model.params["layers"], tuple):
        views = decode_view(sub.k_pages, sub.v_pages, sub.page_table, sub.length, t, sub.k_scales, sub.v_scales)
    k = cfg.max_logprobs
    outs = DecodeResult(
        token=jnp.zeros((num_steps, b), jnp.int32), emitted=jnp.zeros((num_steps, b), bool),
        logprob=jnp.zeros((num_steps, b), jnp.float32), top_ids=jnp.zeros((num_steps, b, k), jnp.int32),
        top_logprobs=jnp.zeros((num_steps, b, k), jnp.float32),
    )

    def fits(st):  # (a slot waiting for its host-side constraint mask sits the burst out)
        return st.running & (st.length < t) & ~grammar.stalled(st.grammar, st.grammar_state, st.grammar_flags)

    def cond(carry):
        i, st, _, _ = carry
        return (i < num_steps) & jnp.any(fits(st))

    def body(carry):
        i, st, views, outs = carry
        st, views, out = _step(cfg, model, st, fits(st), views, t)
        outs = jax.tree.map(lambda buf, x: buf.at[i].set(x), outs, out)
        return i + 1, st, views, outs

    _, sub, _, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), sub, views, outs))
    return put_slots(state, sub), outs


# Jitted entry points. The state is donated: its buffers are reused for the result.
decode_forward_jit = jax.jit(decode_forward, static_argnums=0, donate_argnums=2)
decode_jit = jax.jit(decode, static_argnums=0, donate_argnums=2)
decode_steps_jit = jax.jit(decode_steps, static_argnums=(0, 3, 4, 5), donate_argnums=2)
