"""Speculative decoding as a pure step: propose k tokens per slot, verify them with one target
forward over [last_token, p_1..p_k], keep the longest acceptable prefix plus one token of the
target's own. `spec_decode_steps` is a drop-in for `decode_steps` (same DecodeResult layout:
[decode_steps, slots], each slot's tokens in order), so the engine's hand-out, streaming, stop
strings and logprobs work unchanged.

Proposers, on device, no host sync:
- "ngram" (prompt lookup): a slot's history (prompt + output) is read back from the allocator's
  per-position token record through the page table; the longest suffix of n in [ngram_min,
  ngram_max] tokens that occurred earlier proposes the tokens that followed its latest earlier
  occurrence. No extra state.
- "draft": a smaller model with the same vocabulary proposes k greedy tokens, one draft decode
  step each, over its own K/V pool (`DraftState`) kept in the target's pages (same page table,
  allocator and prefix cache): `draft_prefill` writes the prompt's draft K/V beside every
  target prefill chunk, and each round writes the draft K/V of the tokens it feeds. A quantized
  copy of the target (`jaxinfer.quantize`) is a valid draft. Draft K/V that is stale (a forked
  sample's copied page, a restored snapshot) only lowers the acceptance rate: every proposal
  is verified, so the output never depends on the draft.

Verification writes K/V for positions [L, L + n_prop] (L = length; the pages are allocated as
decode allocates them) and attends like a prefill chunk, so each position sees exactly the
tokens before it. Acceptance, position by position with the penalty history advanced by the
tokens before it (so p is exactly what plain decoding would sample from there):
- greedy: accept p_{j+1} iff it is the argmax of the processed logits; the first mismatch (or
  the position after the last proposal) emits the argmax;
- sampled: p = the processed, temperature-scaled, top-k/top-p/min-p-filtered distribution of
  plain sampling. The proposal is a point mass q, so accept with probability
  min(1, p(x)/q(x)) = p(x); on rejection draw from the residual max(0, p - q) normalised (p
  without x); after the last proposal draw from p. The output is then distributed exactly as
  the target's. Random numbers come from the request's key folded with the token's index, so a
  seeded request is reproducible.
A stop token, max_tokens or max_seq_len ends the slot at that token. Rejected positions keep
whatever K/V they got but lie beyond `length`: every read is masked by position, they are
overwritten by later writes, and a page is registered in the prefix cache only when all of it
is accepted. Positions written stay in [length at burst start, + decode_steps) and below
prompt + max_tokens, the same bound decode has, so the scheduler's page accounting holds.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxinfer import allocator
from jaxinfer.attention import chunk_attention, decode_attention, write_layer_kv
from jaxinfer.decode import DecodeResult, put_slots, take_slots
from jaxinfer.dims import AnyArray
from jaxinfer.model import Model, decoder, lm_head
from jaxinfer.sampling import filtered_probs, process_logits, token_logprobs
from jaxinfer.state import FINISH_ABORT, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, NULL_PAGE, EngineConfig, EngineState

METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Static: part of the compiled step's key. num_tokens = k proposals per slot per round. For
    method "draft" the draft model itself goes to `Engine(draft_model=...)` (arrays are not
    static configuration)."""

    method: str = "ngram"
    num_tokens: int = 3
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SpeculativeConfig.method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_tokens", "ngram_max", "ngram_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SpeculativeConfig.{name} must be an integer >= 1, got {v!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"SpeculativeConfig.ngram_min ({self.ngram_min}) > ngram_max ({self.ngram_max})")


@flax.struct.dataclass
class SpecStats:
    proposed: Int[AnyArray, "slots"]  # proposals verified in the burst
    accepted: Int[AnyArray, "slots"]  # of which accepted
    rounds: Int[AnyArray, "slots"]  # verification forwards the slot took part in


def history(state: EngineState, cfg: EngineConfig) -> Int[Array, "slots seq"]:
    """Each slot's tokens by position: the pool's record below `length`, last_token at
    `length`, -1 beyond."""
    s = state.length.shape[0]
    toks = state.alloc.tokens[state.page_table].reshape(s, -1)
    pos = jnp.arange(toks.shape[1])[None, :]
    hist = jnp.where(pos < state.length[:, None], toks, -1)
    return hist.at[jnp.arange(s), jnp.minimum(state.length, toks.shape[1] - 1)].set(state.last_token)


def ngram_propose(spec: SpeculativeConfig, hist: Int[Array, "slots seq"], length: Int[Array, "slots"]
                  ) -> tuple[Int[Array, "slots k"], Int[Array, "slots"]]:
    """(proposals, how many are real) per slot: after the latest earlier occurrence of the
    history's last n tokens, for the largest n in [ngram_min, ngram_max] that occurs."""
    s, t = hist.shape
    k = spec.num_tokens
    rows, j = jnp.arange(s)[:, None], jnp.arange(t)[None, :]
    best = jnp.full((s,), -1)
    for n in range(spec.ngram_min, spec.ngram_max + 1):  # larger n later: it overrides
        match = (j >= n - 1) & (j < length[:, None]) & (length[:, None] >= n - 1)
        for i in range(n):  # window ending at j vs the suffix ending at length
            a = hist[rows, jnp.clip(j - (n - 1 - i), 0, t - 1)]
            b = hist[jnp.arange(s), jnp.clip(length - (n - 1 - i), 0, t - 1)][:, None]
            match &= a == b
        latest = jnp.max(jnp.where(match, j, -1), axis=1)
        best = jnp.where(latest >= 0, latest, best)
    idx = jnp.clip(best[:, None] + 1 + jnp.arange(k)[None, :], 0, t - 1)
    proposals = jnp.maximum(hist[jnp.arange(s)[:, None], idx], 0)
    count = jnp.where(best >= 0, jnp.minimum(k, length - best), 0)
    return proposals.astype(jnp.int32), count.astype(jnp.int32)


@flax.struct.dataclass
class DraftState:
    """The draft model's K/V, in the target's pages: page p of the draft pool holds the draft's
    K/V of the same tokens as page p of the target pool (same page table, allocator, prefix
    cache). Only its own quality depends on it being complete: proposals are always verified."""

    k_pages: Float[Array, "layers pages page_size kv_heads head_dim"]
    v_pages: Float[Array, "layers pages page_size kv_heads head_dim"]


def init_draft_state(cfg: EngineConfig, draft_config, dtype) -> DraftState:
    shape = (draft_config.num_layers, cfg.num_pages, cfg.page_size, draft_config.num_kv_heads, draft_config.head_dim)
    return DraftState(jax.device_put(np.zeros(shape, dtype)), jax.device_put(np.zeros(shape, dtype)))


def draft_prefill(cfg: EngineConfig, draft: Model, ds: DraftState, chunk, page_table: Int[Array, "slots pages_per_seq"],
                  length: Int[Array, "slots"], prefill_len: Int[Array, "slots"], active: Bool[Array, "slots"],
                  finished: Bool[Array, "slots"]) -> DraftState:
    """The draft's half of `prefill`: the same chunk at the same positions, its K/V into the
    draft pool. Called with the target's state before the target's prefill of that chunk."""
    s, ps = cfg.max_slots, cfg.page_size
    b, t = chunk.tokens.shape
    sc = jnp.clip(chunk.slot, 0, s - 1)
    prefilling = active & ~finished & (length < prefill_len)
    valid = (chunk.slot < s) & (chunk.n > 0) & prefilling[sc]
    start = jnp.where(valid, length[sc], 0)
    n = jnp.where(valid, jnp.minimum(chunk.n, prefill_len[sc] - start), 0)
    table = jnp.where(valid[:, None], page_table[sc], NULL_PAGE)
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    in_chunk = jnp.arange(t)[None, :] < n[:, None]
    write_page = jnp.where(in_chunk, jnp.take_along_axis(table, jnp.minimum(pos // ps, table.shape[1] - 1), 1), NULL_PAGE)
    write_off = pos % ps

    def attend(i, q, kk, vv, kv, layer_spec):
        kp, vp = kv
        kp = kp.at[i, write_page, write_off].set(kk.astype(kp.dtype))
        vp = vp.at[i, write_page, write_off].set(vv.astype(vp.dtype))
        o = chunk_attention(q, kk, vv, kp, vp, i, table, start, n, backend=cfg.attention_backend, **layer_spec.kwargs())
        return o, (kp, vp)

    _, (kp, vp) = decoder(draft, chunk.tokens, pos, attend, (ds.k_pages, ds.v_pages))
    return DraftState(kp, vp)


def draft_propose(cfg: EngineConfig, spec: SpeculativeConfig, draft: Model, ds: DraftState, st: EngineState,
                  page_table, n_prop, running) -> tuple[DraftState, Int[Array, "slots k"]]:
    """k greedy draft tokens per slot: feed last_token, p_1, ..., p_k at positions L..L+k (the
    last step only writes p_k's K/V, so the draft pool is complete up to every accepted
    position); writes beyond L + n_prop go to the null page."""
    s, ps, k = st.length.shape[0], cfg.page_size, spec.num_tokens
    rows = jnp.arange(s)
    tok = st.last_token
    props = []
    kp, vp = ds.k_pages, ds.v_pages
    for j in range(k + 1):
        pos = st.length + j
        live = running & (j <= n_prop)
        page = jnp.where(live, page_table[rows, jnp.minimum(pos // ps, cfg.pages_per_seq - 1)], NULL_PAGE)
        off = pos % ps
        attn_len = jnp.where(live, pos + 1, 0)

        def attend(i, q, kk, vv, kv, layer_spec, page=page, off=off, attn_len=attn_len):
            kp, vp = kv
            kp = kp.at[i, page[:, None], off[:, None]].set(kk.astype(kp.dtype))
            vp = vp.at[i, page[:, None], off[:, None]].set(vv.astype(vp.dtype))
            o = decode_attention(q[:, 0], kp, vp, i, page_table, attn_len, backend=cfg.attention_backend,
                                 **layer_spec.kwargs())
            return o[:, None], (kp, vp)

        h, (kp, vp) = decoder(draft, tok[:, None], pos[:, None], attend, (kp, vp))
        if j < k:
            tok = jnp.argmax(lm_head(draft, h[:, 0]), axis=-1).astype(jnp.int32)
            props.append(tok)
    return DraftState(kp, vp), jnp.stack(props, axis=1)


def _allocate_span(cfg: EngineConfig, a, page_table, start, last, running):
    """Pages for positions [start, last] of each running slot, where still missing."""
    ps, s = cfg.page_size, start.shape[0]
    m = min(-(-(cfg.decode_steps + 1) // ps) + 1, cfg.pages_per_seq)
    entry = start[:, None] // ps + jnp.arange(m)[None, :]
    inb = entry < cfg.pages_per_seq
    ec = jnp.minimum(entry, cfg.pages_per_seq - 1)
    rows = jnp.arange(s)[:, None]
    need = running[:, None] & inb & (entry <= (last // ps)[:, None]) & (page_table[rows, ec] == NULL_PAGE)
    a, pages, granted = allocator.allocate(a, need.sum(1).astype(jnp.int32), m)
    rank = jnp.cumsum(need, axis=1) - 1
    got = jnp.take_along_axis(pages, jnp.clip(rank, 0, m - 1), axis=1)
    fill = need & granted[:, None]
    tgt = jnp.where(fill, ec, cfg.pages_per_seq)  # out of bounds: dropped
    page_table = page_table.at[rows, tgt].set(got, mode="drop")
    return a, page_table, granted | ~jnp.any(need, axis=1)


def _round(cfg: EngineConfig, spec: SpeculativeConfig, model: Model, st: EngineState, running, used, draft, ds):
    """One propose-verify-accept round over all slots; returns (state, draft state, tokens
    [s, k+1], emitted [s, k+1], logprob outputs, proposed, accepted)."""
    s, k, ps = st.length.shape[0], spec.num_tokens, cfg.page_size
    L, g = st.length, st.num_generated
    if spec.method == "ngram":
        proposals, n_prop = ngram_propose(spec, history(st, cfg), L)
    else:  # the draft proposes at every position; its tokens come after the pages are allocated
        proposals, n_prop = None, jnp.full((s,), k, jnp.int32)
    # Never write past what decode could: the burst's budget, max_tokens, max_seq_len.
    n_prop = jnp.clip(jnp.minimum(jnp.minimum(n_prop, cfg.decode_steps - used - 1),
                                  jnp.minimum(st.max_tokens - g - 1, cfg.max_seq_len - L - 2)), 0, k)
    n_prop = jnp.where(running, n_prop, 0)
    a, page_table, granted = _allocate_span(cfg, st.alloc, st.page_table, L, L + n_prop, running)
    starved = running & ~granted
    running = running & granted
    if spec.method == "draft":
        ds, proposals = draft_propose(cfg, spec, draft, ds, st, page_table, jnp.where(running, n_prop, -1), running)
    tokens = jnp.concatenate([st.last_token[:, None], proposals], axis=1)  # [s, k+1]
    pos = L[:, None] + jnp.arange(k + 1)[None, :]
    live = running[:, None] & (jnp.arange(k + 1)[None, :] <= n_prop[:, None])
    rows = jnp.arange(s)[:, None]
    write_page = jnp.where(live, page_table[rows, jnp.minimum(pos // ps, cfg.pages_per_seq - 1)], NULL_PAGE)
    write_off = pos % ps
    n_valid = jnp.where(running, n_prop + 1, 0)

    def attend(i, q, kk, vv, kv, layer_spec):  # layer_spec: the layer's window / soft-cap / scale
        # int8: K smoothed; 8-bit pools: quantized as written; kk, vv become what reads will see.
        q, kk, vv, (kp, vp, ks, vs, kc) = write_layer_kv(kv, i, write_page, write_off, q, kk, vv)
        o = chunk_attention(q, kk, vv, kp, vp, i, page_table, jnp.where(running, L, 0), n_valid,
                            backend=cfg.attention_backend, k_scales=ks, v_scales=vs, **layer_spec.kwargs())
        return o, (kp, vp, ks, vs, kc)

    h, (k_pages, v_pages, k_scales, v_scales, _) = decoder(
        model, tokens, pos, attend, (st.k_pages, st.v_pages, st.k_scales, st.v_scales, st.k_channel))
    logits = lm_head(model, h)  # [s, k+1, vocab] float32
    a = allocator.write_tokens(a, write_page, write_off, tokens)

    # Accept position by position: position j predicts the token after tokens[:, j].
    vocab = logits.shape[-1]
    sampled = st.temperature > 0
    seen, counts = st.seen, st.counts
    alive = running
    out_tok, out_emit = [], []
    accepted = jnp.zeros((s,), jnp.int32)
    finished, reason = st.finished | starved, jnp.where(starved, FINISH_ABORT, st.finish_reason)
    for j in range(k + 1):
        proc = process_logits(logits[:, j], g + j, st.min_tokens, st.stop_ids, seen, counts,
                              st.repetition_penalty, st.presence_penalty, st.frequency_penalty)
        greedy = jnp.argmax(proc, axis=-1).astype(jnp.int32)
        prop = proposals[:, j] if j < k else greedy
        has_prop = j < n_prop

        def stochastic(_, proc=proc, prop=prop, has_prop=has_prop, j=j):
            probs = filtered_probs(proc, st.temperature, st.top_k, st.top_p, st.min_p)
            keys = jax.vmap(lambda key, i: jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), i))(
                st.rng, g + j)
            u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 1)))(keys)
            p_prop = jnp.take_along_axis(probs, prop[:, None], axis=1)[:, 0]
            ok = u < p_prop
            resid = jnp.where(has_prop[:, None], probs.at[jnp.arange(s), prop].set(0.0), probs)
            resid = jnp.where(jnp.sum(resid, 1, keepdims=True) > 0, resid, probs)  # p was a point mass on x
            draw = jax.vmap(lambda kk, lp: jax.random.categorical(jax.random.fold_in(kk, 2), lp))(
                keys, jnp.log(resid)).astype(jnp.int32)
            return ok, draw

        ok_s, draw = jax.lax.cond(jnp.any(sampled & alive), stochastic,
                                  lambda _: (jnp.zeros((s,), bool), greedy), None)
        ok = has_prop & jnp.where(sampled, ok_s, prop == greedy)
        tok = jnp.where(ok, prop, jnp.where(sampled, draw, greedy))
        emit = alive
        out_tok.append(tok)
        out_emit.append(emit)
        col = jnp.where(emit, tok, vocab)
        seen = seen.at[jnp.arange(s), col].set(True, mode="drop")
        counts = counts.at[jnp.arange(s), col].add(1, mode="drop")
        gen, length = g + j + 1, L + j + 1
        is_stop = jnp.any(tok[:, None] == st.stop_ids, axis=-1)
        room = (gen >= st.max_tokens) | (length + 1 >= cfg.max_seq_len)
        why = jnp.where(is_stop, FINISH_STOP, jnp.where(room, FINISH_LENGTH, FINISH_NONE))
        ends = emit & (why != FINISH_NONE)
        finished, reason = finished | ends, jnp.where(ends, why, reason)
        accepted = accepted + (emit & ok)
        alive = emit & ok & ~ends
    tok = jnp.stack(out_tok, 1)
    emitted = jnp.stack(out_emit, 1)
    m = emitted.sum(1).astype(jnp.int32)
    new_len = jnp.where(running, L + m, L)
    last = jnp.take_along_axis(tok, jnp.clip(m - 1, 0, k)[:, None], axis=1)[:, 0]
    if cfg.prefix_caching:
        a = allocator.register_full_pages(a, page_table, new_len, running)
    st = st.replace(k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales, alloc=a,
                    page_table=page_table, length=new_len,
                    last_token=jnp.where(running, last, st.last_token), num_generated=g + m,
                    seen=seen, counts=counts, finished=finished, finish_reason=reason)
    lp = token_logprobs(logits, tok, cfg.max_logprobs, jnp.any(running & (st.logprobs >= 0)))
    return st, ds, tok, emitted, lp, n_prop, accepted


def spec_decode_steps(cfg: EngineConfig, spec: SpeculativeConfig, model: Model, state: EngineState,
                      slots: int | None = None, draft: Model | None = None, draft_state: DraftState | None = None
                      ) -> tuple[EngineState, DecodeResult, SpecStats, DraftState | None]:
    """Up to cfg.decode_steps tokens per running slot (the first `slots` slots) in rounds of
    propose + verify, one host sync for all; see the module docstring. DecodeResult arrays are
    [decode_steps, slots] with each slot's tokens at the front of its column, in order. Method
    "draft" needs `draft` (same vocabulary) and its `draft_state`, returned updated."""
    b = cfg.max_slots if slots is None else slots
    if spec.method == "draft" and (draft is None or draft_state is None):
        raise ValueError("spec_decode_steps: method 'draft' needs draft= and draft_state=")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({model.config.vocab_size})")
    if not 1 <= b <= cfg.max_slots:
        raise ValueError(f"spec_decode_steps: slots={slots} must be in [1, {cfg.max_slots}]")
    n, k, kl = cfg.decode_steps, spec.num_tokens, cfg.max_logprobs
    sub = take_slots(state, b)
    outs = DecodeResult(
        token=jnp.zeros((n, b), jnp.int32), emitted=jnp.zeros((n, b), bool),
        logprob=jnp.zeros((n, b), jnp.float32), top_ids=jnp.zeros((n, b, kl), jnp.int32),
        top_logprobs=jnp.zeros((n, b, kl), jnp.float32))
    zero = jnp.zeros((b,), jnp.int32)
    stats = SpecStats(zero, zero, zero)

    def go(st, used):
        return st.running & (used < n)

    def cond(carry):
        st, used, _, _, _ = carry
        return jnp.any(go(st, used))

    def body(carry):
        st, used, outs, stats, ds = carry
        running = go(st, used)
        st, ds, tok, emitted, (lp, top_ids, top_lp), proposed, accepted = _round(cfg, spec, model, st, running,
                                                                                  used, draft, ds)
        # Token j of the round goes to row used + j of the slot's column (dropped if not emitted).
        row = jnp.where(emitted, used[:, None] + jnp.arange(k + 1)[None, :], n)
        col = jnp.broadcast_to(jnp.arange(b)[:, None], row.shape)
        outs = DecodeResult(
            token=outs.token.at[row, col].set(tok, mode="drop"),
            emitted=outs.emitted.at[row, col].set(True, mode="drop"),
            logprob=outs.logprob.at[row, col].set(lp, mode="drop"),
            top_ids=outs.top_ids.at[row, col].set(top_ids, mode="drop"),
            top_logprobs=outs.top_logprobs.at[row, col].set(top_lp, mode="drop"))
        stats = SpecStats(stats.proposed + proposed, stats.accepted + accepted, stats.rounds + running)
        return st, used + emitted.sum(1).astype(jnp.int32), outs, stats, ds

    sub, _, outs, stats, draft_state = jax.lax.while_loop(cond, body, (sub, zero, outs, stats, draft_state))
    return put_slots(state, sub), outs, stats, draft_state


spec_decode_steps_jit = jax.jit(spec_decode_steps, static_argnums=(0, 1, 4), donate_argnums=(3, 6))
draft_prefill_jit = jax.jit(draft_prefill, static_argnums=0, donate_argnums=2)

