"""The pure steps. Each takes (EngineConfig [static], Model, EngineState, ...) and returns a new
EngineState plus small per-row outputs. No globals, no host callbacks: they compose with the
caller's own `jit`, `lax.scan` or `lax.while_loop`. The jitted entry points donate the state, so
the KV pool is updated in place.

A request's life, in steps:
- `admit`: take a free slot, reuse the cached pages of the prompt's longest cached prefix
  (prefix caching), allocate fresh pages for the rest of the prompt, store the sampling
  settings. No model call.
- `prefill`: write the K/V of the next chunk of prompt tokens (call it once for the whole
  prompt, or several times for chunked prefill). Prefill covers the prompt minus its last token.
- `decode` / `decode_steps`: feed every running slot's `last_token` (for a new request: the
  prompt's last token, so its first generated token comes from the first decode step), sample,
  detect stops. `fork` copies a slot that finished prefill into other slots (parallel sampling
  `n > 1`): full pages are shared, the page the samples will write next is copied.
- `evict`: drop a slot's page references; full pages stay cached until the pool needs them.
`insert` = admit + prefill + one decode step for the new slots only (prefill a batch of
requests and return each one's first token in one call).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxinfer import allocator
from jaxinfer.attention import chunk_attention, write_layer_kv
from jaxinfer.decode import (  # noqa: F401  re-exported: the steps are one API
    DecodeResult, decode, decode_forward, decode_forward_jit, decode_jit, decode_steps, decode_steps_jit,
)
from jaxinfer.speculative import (  # noqa: F401  re-exported: the steps are one API
    DraftState, SpecStats, SpeculativeConfig, draft_prefill, draft_prefill_jit, init_draft_state, spec_decode_steps,
    spec_decode_steps_jit,
)
from jaxinfer.dims import AnyArray
from jaxinfer.model import Model, decoder, lm_head
from jaxinfer.sampling import sample_key, token_logprobs
from jaxinfer.state import FINISH_NONE, NULL_PAGE, SLOT_FIELDS, EngineConfig, EngineState


@flax.struct.dataclass
class Requests:
    """A padded batch of requests for `admit` / `insert`. Rows with length 0 are empty."""

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
    # Resuming a preempted request: the row's last num_generated tokens are its earlier output
    # (they count for the penalties, max_tokens, min_tokens and the RNG step). 0 for new ones.
    num_generated: Int[AnyArray, "batch"]
    # The slot to use (must be free), or -1: the lowest free slot not named by another row.
    slot: Int[AnyArray, "batch"]
    # Structured output: constraint-table entry (-1 = none) and the automaton state to start in.
    grammar: Int[AnyArray, "batch"]
    grammar_state: Int[AnyArray, "batch"]


def make_requests(cfg: EngineConfig, prompts, params, request_ids, batch: int, seq: int,
                  num_generated=None, sample_index=None, slots=None, grammars=None) -> Requests:
    """Host side: pack prompts (lists of ints) and SamplingParams into a numpy `Requests` batch
    of shape [batch, seq] (a bucket). Stop ids must already include EOS and fit max_stop_ids.
    `num_generated[i]`: trailing tokens of prompt i that are earlier output (resumption);
    `sample_index[i]`: which of the request's n samples the row is (selects its RNG stream);
    `grammars[i]`: (constraint-table entry, automaton state) of row i, or None."""
    tokens = np.zeros((batch, seq), np.int32)
    f32 = lambda v: np.full((batch,), v, np.float32)  # noqa: E731
    i32 = lambda v: np.full((batch,), v, np.int32)  # noqa: E731
    r = dict(tokens=tokens, length=i32(0), request_id=i32(-1), max_tokens=i32(1), temperature=f32(0),
             top_k=i32(0), top_p=f32(1), min_p=f32(0), rng=np.zeros((batch, 2), np.uint32),
             stop_ids=np.full((batch, cfg.max_stop_ids), -1, np.int32), min_tokens=i32(0),
             repetition_penalty=f32(1), presence_penalty=f32(0), frequency_penalty=f32(0),
             logprobs=i32(-1), prompt_logprobs=i32(-1), num_generated=i32(0), slot=i32(-1),
             grammar=i32(-1), grammar_state=i32(0))
    for row, (prompt, sp, rid) in enumerate(zip(prompts, params, request_ids)):
        tokens[row, : len(prompt)] = prompt
        r["length"][row], r["request_id"][row], r["max_tokens"][row] = len(prompt), rid, sp.max_tokens
        r["temperature"][row], r["top_k"][row] = sp.temperature, sp.top_k
        r["top_p"][row], r["min_p"][row] = sp.top_p, sp.min_p
        seed = sp.seed if sp.seed is not None else int(np.random.default_rng().integers(2**32))
        r["rng"][row] = sample_key(seed, 0 if sample_index is None else sample_index[row])
        r["stop_ids"][row, : len(sp.stop_token_ids)] = sp.stop_token_ids
        r["min_tokens"][row], r["repetition_penalty"][row] = sp.min_tokens, sp.repetition_penalty
        r["presence_penalty"][row], r["frequency_penalty"][row] = sp.presence_penalty, sp.frequency_penalty
        r["logprobs"][row] = -1 if sp.logprobs is None else min(sp.logprobs, cfg.max_logprobs)
        r["prompt_logprobs"][row] = -1 if sp.prompt_logprobs is None else min(sp.prompt_logprobs, cfg.max_logprobs)
        if num_generated is not None:
            r["num_generated"][row] = num_generated[row]
        if slots is not None:
            r["slot"][row] = slots[row]
        if grammars is not None and grammars[row] is not None:
            r["grammar"][row], r["grammar_state"][row] = grammars[row]
    return Requests(**r)


def _first_occurrence(x: Int[Array, "n"]) -> Bool[Array, "n"]:
    """True where x[i] does not occur in x[:i]."""
    return jnp.arange(x.shape[0]) == jnp.argmax(x[None, :] == x[:, None], axis=1)


# ----------------------------------------------------------------------------- admit
@flax.struct.dataclass
class AdmitResult:
    accepted: Bool[AnyArray, "batch"]  # False: no free slot or not enough free pages (row untouched)
    slot: Int[AnyArray, "batch"]  # slot the request went to (max_slots when not accepted)
    cached: Int[AnyArray, "batch"]  # prompt tokens whose K/V came from the prefix cache


def admit(cfg: EngineConfig, state: EngineState, req: Requests) -> tuple[EngineState, AdmitResult]:
    """Put a batch of requests into free slots with their pages; no model call.

    Design: request r goes to the slot it names, else to the r-th free slot (cumulative sum).
    Its page-table row is the
    longest cached prefix of its prompt (whole pages, at most (len-1) // page_size of them: the
    last prompt token is fed by decode, which must own the page it writes) followed by fresh
    pages for the remaining prompt positions. Cache hits are acquired before the fresh pages are
    allocated, so an allocation can never evict a page this batch is about to reuse. A request
    is accepted only if it and every request before it fit (slots and pages); a rejected row
    gives its references back and leaves no trace. Rows asking for prompt_logprobs skip the
    cache (their prompt must be recomputed to be scored).
    """
    s, ps, pps = cfg.max_slots, cfg.page_size, cfg.pages_per_seq
    b, t = req.tokens.shape
    valid = req.length > 0
    # Slots: named ones must be free and named once; the others take the free slots nobody named.
    explicit = valid & (req.slot >= 0) & (req.slot < s)
    named = jnp.where(explicit, req.slot, s)
    named_ok = explicit & _first_occurrence(named) & ~state.active[jnp.minimum(named, s - 1)]
    auto = valid & (req.slot < 0)
    free_auto = ~state.active & ~jnp.zeros((s,), bool).at[named].set(True, mode="drop")
    rank = jnp.cumsum(auto) - 1
    free_ids = jnp.nonzero(free_auto, size=s, fill_value=s)[0]
    slot_of = jnp.where(explicit, named, jnp.where(auto & (rank < jnp.sum(free_auto)), free_ids[jnp.clip(rank, 0, s - 1)], s))
    slots_ok = jnp.where(explicit, named_ok, auto & (slot_of < s))
    a = state.alloc
    if cfg.prefix_caching and t >= ps:
        max_hit = jnp.where(slots_ok & (req.prompt_logprobs < 0), (req.length - 1) // ps, 0)
        hit_pages, hits = allocator.lookup(a, req.tokens, max_hit)
        a = allocator.acquire(a, hit_pages, hit_pages != NULL_PAGE)
    else:
        hit_pages, hits = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)
    need = jnp.where(slots_ok, -(-req.length // ps) - hits, 0)
    a, fresh, granted = allocator.allocate(a, need, pps)
    accepted = slots_ok & granted
    # Rejected rows hand their cache hits back (plain decrement: they were never theirs).
    undo = (~accepted)[:, None] & (hit_pages != NULL_PAGE)
    a = a.replace(refcount=a.refcount.at[hit_pages.ravel()].add(-undo.ravel().astype(jnp.int32)))
    hits = jnp.where(accepted, hits, 0)

    j = jnp.arange(pps)[None, :]
    hit_row = jnp.pad(hit_pages, ((0, 0), (0, pps - hit_pages.shape[1])))[:, :pps]
    fresh_row = jnp.take_along_axis(fresh, jnp.clip(j - hits[:, None], 0, pps - 1), axis=1)
    table = jnp.where(j < hits[:, None], hit_row, jnp.where(j - hits[:, None] < need[:, None], fresh_row, NULL_PAGE))
    table = jnp.where(accepted[:, None], table, NULL_PAGE)

    slot = jnp.where(accepted, slot_of, s)
    v = state.seen.shape[1]
    rows = jnp.arange(b)[:, None]
    pos = jnp.arange(t)[None, :]
    in_prompt = pos < req.length[:, None]
    in_output = in_prompt & (pos >= (req.length - req.num_generated)[:, None])
    # Penalty history: every prompt token is seen; earlier output (resumption) is counted too.
    seen = jnp.zeros((b, v), bool).at[rows, jnp.where(in_prompt, req.tokens, v)].set(True, mode="drop")
    counts = jnp.zeros((b, v), jnp.int32).at[rows, jnp.where(in_output, req.tokens, v)].add(1, mode="drop")
    last = jnp.take_along_axis(req.tokens, jnp.maximum(req.length - 1, 0)[:, None], axis=1)[:, 0]

    def put(field, value):
        return field.at[slot].set(value.astype(field.dtype), mode="drop")

    zeros = jnp.zeros_like(req.length)
    st = state.replace(
        alloc=a, page_table=put(state.page_table, table),
        active=put(state.active, accepted), finished=put(state.finished, zeros.astype(bool)),
        finish_reason=put(state.finish_reason, zeros), request_id=put(state.request_id, req.request_id),
        length=put(state.length, hits * ps), prefill_len=put(state.prefill_len, req.length - 1),
        last_token=put(state.last_token, last), num_generated=put(state.num_generated, req.num_generated),
        max_tokens=put(state.max_tokens, req.max_tokens), temperature=put(state.temperature, req.temperature),
        top_k=put(state.top_k, req.top_k), top_p=put(state.top_p, req.top_p), min_p=put(state.min_p, req.min_p),
        rng=put(state.rng, req.rng), stop_ids=put(state.stop_ids, req.stop_ids),
        min_tokens=put(state.min_tokens, req.min_tokens),
        repetition_penalty=put(state.repetition_penalty, req.repetition_penalty),
        presence_penalty=put(state.presence_penalty, req.presence_penalty),
        frequency_penalty=put(state.frequency_penalty, req.frequency_penalty),
        logprobs=put(state.logprobs, req.logprobs), seen=put(state.seen, seen), counts=put(state.counts, counts),
        grammar=put(state.grammar, req.grammar), grammar_state=put(state.grammar_state, req.grammar_state),
    )
    return st, AdmitResult(accepted=accepted, slot=slot, cached=hits * ps)


# ----------------------------------------------------------------------------- prefill
@flax.struct.dataclass
class Chunk:
    """Prompt tokens for `prefill`: row i continues slot[i]'s prefill at its current length."""

    slot: Int[AnyArray, "batch"]  # max_slots = empty row
    tokens: Int[AnyArray, "batch seq"]  # the prompt tokens at positions [length, length + n)
    n: Int[AnyArray, "batch"]  # valid tokens in the row (clipped to what the prompt has left)
    lookahead: Int[AnyArray, "batch"]  # prompt token at position length + n (scored by the last row)
    prompt_logprobs: Int[AnyArray, "batch"]  # -1: no prompt scores wanted for this row


def make_chunk(cfg: EngineConfig, rows, batch: int, seq: int) -> Chunk:
    """Host side: pack one prefill chunk per row into a numpy `Chunk` of shape [batch, seq] (a
    bucket). `rows` holds (slot, tokens, start, n, prompt_logprobs) per row: the row continues
    slot's prefill with tokens[start:start + n] (tokens: the slot's whole prompt, so the token
    after the chunk is its lookahead); prompt_logprobs is top-k to score, or -1."""
    tokens = np.zeros((batch, seq), np.int32)
    slot = np.full((batch,), cfg.max_slots, np.int32)
    n, lookahead, plp = np.zeros((batch,), np.int32), np.zeros((batch,), np.int32), np.full((batch,), -1, np.int32)
    for i, (s, toks, start, k, lp) in enumerate(rows):
        tokens[i, :k] = toks[start: start + k]
        slot[i], n[i], lookahead[i], plp[i] = s, k, toks[start + k], lp
    return Chunk(slot=slot, tokens=tokens, n=n, lookahead=lookahead, prompt_logprobs=plp)


@flax.struct.dataclass
class PrefillResult:
    n: Int[AnyArray, "batch"]  # tokens actually written per row
    # Row i, column c: logprob (and top-k) of the prompt token at position start + c + 1 given
    # the tokens before it; zeros unless some row asked.
    prompt_logprob: Float[AnyArray, "batch seq"]
    prompt_top_ids: Int[AnyArray, "batch seq max_logprobs"]
    prompt_top_logprobs: Float[AnyArray, "batch seq max_logprobs"]


def prefill(cfg: EngineConfig, model: Model, state: EngineState, chunk: Chunk) -> tuple[EngineState, PrefillResult]:
    """Write the K/V of one chunk of prompt tokens per row into the slot's pages.

    Design: the chunk sits at positions [length, length + n) of its slot (length = tokens
    already in the pool: cached prefix and earlier chunks). K/V are written first, then each
    query attends to the slot's pages up to its own position, so chunked and unchunked prefill
    compute the same function. Pages that become full are registered in the prefix cache.
    Rows for slots that are not prefilling are ignored.
    """
    s, ps = cfg.max_slots, cfg.page_size
    b, t = chunk.tokens.shape
    sc = jnp.clip(chunk.slot, 0, s - 1)
    valid = (chunk.slot < s) & (chunk.n > 0) & state.prefilling[sc]
    start = jnp.where(valid, state.length[sc], 0)
    n = jnp.where(valid, jnp.minimum(chunk.n, state.prefill_len[sc] - start), 0)
    table = jnp.where(valid[:, None], state.page_table[sc], NULL_PAGE)
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    in_chunk = jnp.arange(t)[None, :] < n[:, None]
    write_page = jnp.where(in_chunk, jnp.take_along_axis(table, jnp.minimum(pos // ps, table.shape[1] - 1), 1), NULL_PAGE)
    write_off = pos % ps

    def attend(i, q, k, v, kv, spec):  # spec: the layer's window / soft-cap / scale
        # int8: K smoothed; 8-bit pools: quantized as written; k, v become what reads will see.
        q, k, v, (kp, vp, ks, vs, kc) = write_layer_kv(kv, i, write_page, write_off, q, k, v)
        o = chunk_attention(q, k, v, kp, vp, i, table, start, n, backend=cfg.attention_backend,
                            k_scales=ks, v_scales=vs, **spec.kwargs())
        return o, (kp, vp, ks, vs, kc)

    h, (k_pages, v_pages, k_scales, v_scales, _) = decoder(
        model, chunk.tokens, pos, attend, (state.k_pages, state.v_pages, state.k_scales, state.v_scales, state.k_channel))
    a = allocator.write_tokens(state.alloc, write_page, write_off, chunk.tokens)
    if cfg.prefix_caching:
        a = allocator.register_full_pages(a, table, start + n, valid)
    tgt = jnp.where(valid, chunk.slot, s)
    st = state.replace(k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales, alloc=a,
                       length=state.length.at[tgt].set(start + n, mode="drop"))

    k = cfg.max_logprobs

    def prompt_scores(_):
        nxt = jnp.concatenate([chunk.tokens[:, 1:], jnp.zeros((b, 1), chunk.tokens.dtype)], axis=1)
        nxt = jnp.where(jnp.arange(t)[None, :] == (n - 1)[:, None], chunk.lookahead[:, None], nxt)
        return token_logprobs(lm_head(model, h), jnp.maximum(nxt, 0), k, jnp.bool_(True))

    def no_scores(_):
        return (jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t, k), jnp.int32), jnp.zeros((b, t, k), jnp.float32))

    p_lp, p_ids, p_top = jax.lax.cond(jnp.any(valid & (chunk.prompt_logprobs >= 0)), prompt_scores, no_scores, None)
    return st, PrefillResult(n=n, prompt_logprob=p_lp, prompt_top_ids=p_ids, prompt_top_logprobs=p_top)


# ----------------------------------------------------------------------------- insert
@flax.struct.dataclass
class InsertResult:
    accepted: Bool[AnyArray, "batch"]  # False: no free slot or not enough free pages (row untouched)
    slot: Int[AnyArray, "batch"]  # slot the request went to (max_slots when not accepted)
    cached: Int[AnyArray, "batch"]  # prompt tokens reused from the prefix cache
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


def insert(cfg: EngineConfig, model: Model, state: EngineState, req: Requests) -> tuple[EngineState, InsertResult]:
    """Prefill a batch of requests into free slots and sample each one's first token:
    `admit`, `prefill` of everything not cached, then one `decode` step of the new slots only
    (the slots already running do not move)."""
    s = cfg.max_slots
    b, t = req.tokens.shape
    state, adm = admit(cfg, state, req)
    # The uncached part of each prompt, shifted to the row start (a row with a prefix hit never
    # asks for prompt_logprobs, so prompt scores stay aligned with the prompt).
    idx = jnp.clip(adm.cached[:, None] + jnp.arange(t)[None, :], 0, t - 1)
    rest = jnp.take_along_axis(req.tokens, idx, axis=1)
    lookahead = jnp.take_along_axis(req.tokens, jnp.maximum(req.length - 1, 0)[:, None], axis=1)[:, 0]
    chunk = Chunk(slot=adm.slot, tokens=rest, n=req.length - 1 - adm.cached, lookahead=lookahead,
                  prompt_logprobs=jnp.where(adm.accepted, req.prompt_logprobs, -1))
    state, pre = prefill(cfg, model, state, chunk)
    new = jnp.zeros((s,), bool).at[adm.slot].set(True, mode="drop")
    state, dec = decode(cfg, model, state, new)
    sc = jnp.minimum(adm.slot, s - 1)
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731  align to token i
    return state, InsertResult(
        accepted=adm.accepted, slot=adm.slot, cached=adm.cached, token=dec.token[sc],
        finished=state.finished[sc] & adm.accepted, logprob=dec.logprob[sc], top_ids=dec.top_ids[sc],
        top_logprobs=dec.top_logprobs[sc], prompt_logprob=shift(pre.prompt_logprob),
        prompt_top_ids=shift(pre.prompt_top_ids), prompt_top_logprobs=shift(pre.prompt_top_logprobs),
    )


# ----------------------------------------------------------------------------- fork
def fork(cfg: EngineConfig, state: EngineState, src: Int[Array, "batch"], dst: Int[Array, "batch"],
         rng: UInt32[Array, "batch 2"]) -> tuple[EngineState, Bool[Array, "batch"]]:
    """Parallel sampling: copy slot src[i] (prefill done, nothing decoded yet) into the free
    slot dst[i] with its own RNG key. Rows with dst = max_slots are ignored.

    Copy-on-write: the pages before the one holding position length (full, read-only from now
    on) are shared (one more reference each); the page decode writes next, possibly partly
    filled with prompt K/V, gets a fresh copy per sample, because every sample writes its own
    tokens into it. Returns (state, done); a row fails (no-op) if src is not ready, dst is not
    free, or no page is left.
    """
    s, ps, pps = cfg.max_slots, cfg.page_size, cfg.pages_per_seq
    sc, dc = jnp.clip(src, 0, s - 1), jnp.clip(dst, 0, s - 1)
    ok = (dst < s) & (src < s) & state.running[sc] & (state.length[sc] == state.prefill_len[sc]) & ~state.active[dc]
    ok = ok & _first_occurrence(dc)  # a destination named twice takes the first row only
    j_star = state.length[sc] // ps  # the page position `length` falls in (decode writes there)
    a, fresh, granted = allocator.allocate(state.alloc, ok.astype(jnp.int32), 1)
    ok = ok & granted
    j = jnp.arange(pps)[None, :]
    src_table = state.page_table[sc]
    shared = ok[:, None] & (j < j_star[:, None])
    table = jnp.where(shared, src_table, NULL_PAGE)
    table = jnp.where(ok[:, None] & (j == j_star[:, None]), fresh[:, 0:1], table)
    a = allocator.acquire(a, table, shared)
    src_page = jnp.take_along_axis(src_table, jnp.minimum(j_star, pps - 1)[:, None], 1)[:, 0]
    tgt_page = jnp.where(ok, fresh[:, 0], NULL_PAGE)
    a = a.replace(tokens=a.tokens.at[tgt_page].set(a.tokens[src_page]))
    tgt = jnp.where(ok, dst, s)
    if state.k_pages.dtype == jnp.int8:  # the copied page's per-token scales travel with it
        scales = dict(k_scales=state.k_scales.at[:, tgt_page].set(state.k_scales[:, src_page]),
                      v_scales=state.v_scales.at[:, tgt_page].set(state.v_scales[:, src_page]))
    else:  # float pools have none, fp8's are per layer and head
        scales = {}
    st = state.replace(
        alloc=a, **scales,
        k_pages=state.k_pages.at[:, tgt_page].set(state.k_pages[:, src_page]),
        v_pages=state.v_pages.at[:, tgt_page].set(state.v_pages[:, src_page]),
        page_table=state.page_table.at[tgt].set(table, mode="drop"),
        rng=state.rng.at[tgt].set(rng.astype(state.rng.dtype), mode="drop"),
        **{f: getattr(state, f).at[tgt].set(getattr(state, f)[sc], mode="drop")
           for f in SLOT_FIELDS if f not in ("page_table", "rng")},
    )
    return st, ok


# ----------------------------------------------------------------------------- evict
def evict(cfg: EngineConfig, state: EngineState, mask: Bool[Array, "slots"] | None = None) -> EngineState:
    """Free the slots in `mask` (default: every finished slot): drop their page references and
    clear their table rows. Pages whose count reaches 0 are free for the next allocation; the
    full ones stay in the prefix cache until an allocation reuses them (LRU)."""
    if mask is None:
        mask = state.active & state.finished
    mask = mask & state.active
    a = allocator.release(state.alloc, state.page_table, mask)
    return state.replace(
        alloc=a,
        page_table=jnp.where(mask[:, None], NULL_PAGE, state.page_table),
        active=state.active & ~mask,
        finished=state.finished & ~mask,
        finish_reason=jnp.where(mask, FINISH_NONE, state.finish_reason),
        request_id=jnp.where(mask, -1, state.request_id),
        length=jnp.where(mask, 0, state.length),
        prefill_len=jnp.where(mask, 0, state.prefill_len),
        num_generated=jnp.where(mask, 0, state.num_generated),
        # Back to the defaults, so the penalty / logprob lax.conds take their cheap branch
        # once the requests that used them are gone.
        min_tokens=jnp.where(mask, 0, state.min_tokens),
        repetition_penalty=jnp.where(mask, 1.0, state.repetition_penalty),
        presence_penalty=jnp.where(mask, 0.0, state.presence_penalty),
        frequency_penalty=jnp.where(mask, 0.0, state.frequency_penalty),
        logprobs=jnp.where(mask, -1, state.logprobs),
        grammar=jnp.where(mask, -1, state.grammar),
    )


# ----------------------------------------------------------------------------- structured output
@flax.struct.dataclass
class GrammarLoad:
    """One write into the constraint table (jaxinfer/grammar.py) plus per-slot assignments:
    entry `entry` (max_slots = write nothing) gets the padded automaton; slot i gets
    (slot_entry[i], slot_state[i]) where slot_entry[i] >= -1 (-2 = leave the slot alone)."""

    entry: Int[AnyArray, ""]
    grammar_class: Int[AnyArray, "vocab"]
    grammar_next: Int[AnyArray, "grammar_states grammar_classes"]
    grammar_flags: Int[AnyArray, "grammar_states"]
    slot_entry: Int[AnyArray, "slots"]
    slot_state: Int[AnyArray, "slots"]


def make_grammar_load(cfg: EngineConfig, vocab_size: int, entry: int | None = None, class_of=None, nxt=None,
                      flags=None, slot_assign: dict[int, tuple[int, int]] | None = None) -> GrammarLoad:
    """Host side: a NumPy GrammarLoad writing (class_of [<= vocab], next [states, classes], flags
    [states]) padded to the table's sizes into `entry`, and `slot_assign` {slot: (entry, state)}."""
    g_class = np.zeros((vocab_size,), np.int32)
    g_next = np.full((cfg.grammar_states, cfg.grammar_classes), -1, np.int32)
    g_flags = np.zeros((cfg.grammar_states,), np.int32)
    if entry is not None:
        g_class[: len(class_of)] = class_of
        g_next[: nxt.shape[0], : nxt.shape[1]] = nxt
        g_flags[: len(flags)] = flags
    se, ss = np.full((cfg.max_slots,), -2, np.int32), np.zeros((cfg.max_slots,), np.int32)
    for slot, (e, st) in (slot_assign or {}).items():
        se[slot], ss[slot] = e, st
    return GrammarLoad(entry=np.array(cfg.max_slots if entry is None else entry, np.int32), grammar_class=g_class,
                       grammar_next=g_next, grammar_flags=g_flags, slot_entry=se, slot_state=ss)


def load_grammar(cfg: EngineConfig, state: EngineState, g: GrammarLoad) -> EngineState:
    """Write a constraint into the table and/or (re)assign slots to entries and states. One
    program for every constraint (the table's sizes are static)."""
    keep = g.slot_entry == -2
    return state.replace(
        grammar_class=state.grammar_class.at[g.entry].set(g.grammar_class, mode="drop"),
        grammar_next=state.grammar_next.at[g.entry].set(g.grammar_next, mode="drop"),
        grammar_flags=state.grammar_flags.at[g.entry].set(g.grammar_flags, mode="drop"),
        grammar=jnp.where(keep, state.grammar, g.slot_entry),
        grammar_state=jnp.where(keep, state.grammar_state, g.slot_state),
    )


def permute_slots(cfg: EngineConfig, state: EngineState, perm: Int[Array, "slots"]) -> EngineState:
    """Move slots: new slot i is old slot perm[i] (a permutation). Pages do not move and no
    reference count changes: a request's page-table row travels with the rest of its row. The
    engine uses it to keep its running requests in the lowest slots (so `decode_steps(slots=B)`
    can skip the rest)."""
    return state.replace(**{f: getattr(state, f)[perm] for f in SLOT_FIELDS})


def num_free_pages(state: EngineState) -> Int[Array, ""]:
    return allocator.num_free(state.alloc)


# Jitted entry points. The state is donated: its buffers are reused for the result.
admit_jit = jax.jit(admit, static_argnums=0, donate_argnums=1)
prefill_jit = jax.jit(prefill, static_argnums=0, donate_argnums=2)
insert_jit = jax.jit(insert, static_argnums=0, donate_argnums=2)
fork_jit = jax.jit(fork, static_argnums=0, donate_argnums=1)
evict_jit = jax.jit(evict, static_argnums=0, donate_argnums=1)
permute_slots_jit = jax.jit(permute_slots, static_argnums=0, donate_argnums=1)
load_grammar_jit = jax.jit(load_grammar, static_argnums=0, donate_argnums=1)
num_free_pages_jit = jax.jit(num_free_pages)
