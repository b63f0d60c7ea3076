"""The pure steps (insert / decode_steps / evict) on the tiny model, with exact slot and page ids.

Every test uses the same EngineConfig, insert shape (2 rows x 32 tokens) and decode_steps length,
so the file compiles insert and decode_steps once each (plus evict with and without a mask, the
no-cache forward, and the while-loop example). Greedy outputs are compared
token for token with a no-cache oracle: `jaxinfer.model.forward` on the full sequence, argmax
of the last position, one token at a time. The oracle asserts a top-2 logit gap > 1e-4 at
every token (the tiny model's gaps here are ~1e-3 and up) while cached and uncached logits differ
by float32 rounding (~1e-6), so exact token equality is the right check. Page ids are exact: the allocator hands out the lowest free pages
in request (and slot) order, so each expected table below is derived by hand in a comment.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.engine import Engine
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import (
    FINISH_ABORT, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, NULL_PAGE, EngineConfig, init_state,
)
from jaxinfer.steps import decode_steps_jit, evict_jit, insert_jit, make_requests

CFG = EngineConfig(max_slots=4, page_size=4, num_pages=32, max_seq_len=32, prefill_buckets=(16, 32),
                   max_prefill_batch=2, max_stop_ids=4, decode_steps=4)
BATCH, SEQ, STEPS = 2, 32, CFG.decode_steps
_rng = np.random.default_rng(0)
P = {n: tuple(int(t) for t in _rng.integers(0, 256, size=n)) for n in (3, 5, 7, 11, 29, 31)}


# --------------------------------------------------------------------------- helpers
def greedy(max_tokens: int, stop=()) -> SamplingParams:
    # make_requests needs an explicit seed (the Engine fills in missing ones).
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tuple(stop), seed=0)


_oracle_cache: dict = {}
MIN_GAP = 1e-4  # top-2 logit gap the oracle requires (cached vs uncached differ by ~1e-6)


def oracle(model, prompt: tuple, n: int) -> list[int]:
    """Greedy continuation without a cache: recompute the whole sequence every token. The
    forward always runs on one [2, max_seq_len] buffer (one compile): it is causal, so the
    padding after position L-1 cannot change the logits at L-1. A near-tie between the top two
    logits would make the comparison meaningless, so it is reported as a bad test input."""
    key = (id(model), prompt)
    if len(_oracle_cache.get(key, ())) < n:
        buf = np.zeros((2, CFG.max_seq_len), np.int32)
        buf[0, : len(prompt)] = prompt
        length, out = len(prompt), []
        for _ in range(n):
            logits = np.asarray(jaxinfer.forward(model, jnp.asarray(buf)))[0, length - 1]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > MIN_GAP, f"near-tie in the oracle at token {len(out)}: pick another prompt"
            out.append(int(np.argmax(logits)))
            if length < CFG.max_seq_len:
                buf[0, length] = out[-1]
            length += 1
        _oracle_cache[key] = out
    return _oracle_cache[key][:n]


def fresh(model):
    return init_state(CFG, model.config, model.dtype)


def insert(model, state, prompts, params, ids=None):
    """insert_jit on a [BATCH, SEQ] request batch (rows beyond len(prompts) are empty).
    Returns (state, host InsertResult)."""
    ids = list(range(len(prompts))) if ids is None else ids
    reqs = make_requests(CFG, [list(p) for p in prompts], params, ids, BATCH, SEQ)
    state, res = insert_jit(CFG, model, state, reqs)
    return state, host(res)


def decode(model, state, chunks: int = 1):
    """`chunks` x decode_steps_jit. Returns (state, tokens [steps, slots], emitted [steps, slots])."""
    toks, ems = [], []
    for _ in range(chunks):
        state, out = decode_steps_jit(CFG, model, state, STEPS)
        out = host(out)
        toks.append(out.token)
        ems.append(out.emitted)
    return state, np.concatenate(toks), np.concatenate(ems)


def emitted_by_slot(tokens, emitted, slot) -> list[int]:
    return tokens[emitted[:, slot], slot].tolist()


def host(state) -> types.SimpleNamespace:
    """Numpy copies of every field of a state or step result (those dataclasses must hold jax
    Arrays: the runtime type checks refuse numpy leaves, so no jax.device_get)."""
    out = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if "alloc" in out:  # the allocator's arrays, flattened: page_refcount, page_cached, ...
        a = out.pop("alloc")
        out.update({f"page_{f.name}" if f.name != "clock" else "alloc_clock": getattr(a, f.name)
                    for f in dataclasses.fields(a)})
    return types.SimpleNamespace(**{k: np.asarray(v) for k, v in out.items()})


def copy(state):
    """A device copy (the jitted steps donate their input state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def evict_mask(*slots):
    return jnp.asarray([s in slots for s in range(CFG.max_slots)])


def table_row(*pages):
    return list(pages) + [0] * (CFG.pages_per_seq - len(pages))


SLOT_FIELDS = ("active", "finished", "finish_reason", "request_id", "length", "last_token",
               "num_generated", "max_tokens", "temperature", "top_k", "top_p", "min_p", "rng", "stop_ids",
               "page_table")


def assert_slots_equal(a, b, slots=range(CFG.max_slots)):
    for f in SLOT_FIELDS:
        for s in slots:
            np.testing.assert_array_equal(getattr(a, f)[s], getattr(b, f)[s], err_msg=f"{f}[{s}]")


def assert_state_unchanged(before, after):
    """Everything equal, except the null page's contents (the write-only sink for rejected rows)."""
    assert_slots_equal(before, after)
    np.testing.assert_array_equal(before.page_refcount, after.page_refcount)
    np.testing.assert_array_equal(before.k_pages[:, 1:], after.k_pages[:, 1:])
    np.testing.assert_array_equal(before.v_pages[:, 1:], after.v_pages[:, 1:])


def refcount_with(*pages, pinned=()):
    rc = np.zeros(CFG.num_pages, np.int32)
    rc[[NULL_PAGE, *pages, *pinned]] = 1
    return rc


# --------------------------------------------------------------------------- insert
def test_insert_assigns_lowest_free_slots_and_exact_pages(tiny_model):
    st, res = insert(tiny_model, fresh(tiny_model), [P[7], P[11]], [greedy(8), greedy(8)], ids=[10, 11])
    np.testing.assert_array_equal(res.accepted, [True, True])
    np.testing.assert_array_equal(res.slot, [0, 1])
    np.testing.assert_array_equal(res.finished, [False, False])
    np.testing.assert_array_equal(res.token, [oracle(tiny_model, P[7], 1)[0], oracle(tiny_model, P[11], 1)[0]])
    h = host(st)
    # 7 tokens -> ceil(7/4) = 2 pages (1, 2); 11 tokens -> 3 pages (3, 4, 5).
    np.testing.assert_array_equal(h.page_table, [table_row(1, 2), table_row(3, 4, 5), table_row(), table_row()])
    np.testing.assert_array_equal(h.page_refcount, refcount_with(1, 2, 3, 4, 5))
    np.testing.assert_array_equal(h.active, [True, True, False, False])
    np.testing.assert_array_equal(h.request_id, [10, 11, -1, -1])
    np.testing.assert_array_equal(h.length, [7, 11, 0, 0])
    np.testing.assert_array_equal(h.num_generated, [1, 1, 0, 0])
    np.testing.assert_array_equal(h.last_token[:2], res.token)

    # Free slot 0: the next two requests take slot 0 (lowest free) and slot 2 (next free). Slot
    # 0's full page 1 (tokens 0-3) stays in the prefix cache, so never-cached free pages go
    # first, lowest id first: 5 tokens -> pages 2 (freed, partial) and 6; 3 tokens -> page 7.
    st = evict_jit(CFG, st, evict_mask(0))
    np.testing.assert_array_equal(host(st).page_refcount, refcount_with(3, 4, 5))
    st, res = insert(tiny_model, st, [P[5], P[3]], [greedy(8), greedy(8)], ids=[12, 13])
    np.testing.assert_array_equal(res.accepted, [True, True])
    np.testing.assert_array_equal(res.slot, [0, 2])
    h = host(st)
    np.testing.assert_array_equal(h.page_table, [table_row(2, 6), table_row(3, 4, 5), table_row(7), table_row()])
    np.testing.assert_array_equal(h.page_refcount, refcount_with(2, 3, 4, 5, 6, 7))
    # Full pages in the cache: 1 (old, free), 3 and 4 (11 tokens), 2 (now P[5]'s tokens 0-3).
    np.testing.assert_array_equal(np.nonzero(h.page_cached)[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(h.request_id, [12, 11, 13, -1])
    np.testing.assert_array_equal(res.token, [oracle(tiny_model, P[5], 1)[0], oracle(tiny_model, P[3], 1)[0]])


def test_insert_rejects_when_no_slot_is_free(tiny_model):
    st, _ = insert(tiny_model, fresh(tiny_model), [P[3], P[5]], [greedy(8)] * 2)
    st, _ = insert(tiny_model, st, [P[7], P[3]], [greedy(8)] * 2)
    before = host(st)
    assert before.active.all()
    st, res = insert(tiny_model, st, [P[5], P[3]], [greedy(8)] * 2, ids=[20, 21])
    np.testing.assert_array_equal(res.accepted, [False, False])
    np.testing.assert_array_equal(res.slot, [CFG.max_slots] * 2)
    assert_state_unchanged(before, host(st))

    # One free slot (2): the first row is accepted into it, the second is rejected untouched.
    st = evict_jit(CFG, st, evict_mask(2))
    before = host(st)
    st, res = insert(tiny_model, st, [P[5], P[3]], [greedy(8)] * 2, ids=[20, 21])
    np.testing.assert_array_equal(res.accepted, [True, False])
    np.testing.assert_array_equal(res.slot, [2, CFG.max_slots])
    after = host(st)
    assert_slots_equal(before, after, slots=[0, 1, 3])
    assert after.request_id[2] == 20 and 21 not in after.request_id


def test_insert_rejects_when_pages_are_short(tiny_model):
    # Pin pages 3..31 (as if held elsewhere) so only pages 1 and 2 are free.
    st = fresh(tiny_model)
    st = st.replace(alloc=st.alloc.replace(refcount=st.alloc.refcount.at[3:].set(1)))
    before = host(st)
    # 11 tokens need 3 pages: refused, and the 5-token request after it is refused too (grants
    # are a prefix of the batch), although it would fit alone.
    st, res = insert(tiny_model, st, [P[11], P[5]], [greedy(8)] * 2)
    np.testing.assert_array_equal(res.accepted, [False, False])
    np.testing.assert_array_equal(res.slot, [CFG.max_slots] * 2)
    assert_state_unchanged(before, host(st))
    # The other order: the 5-token request fits (pages 1, 2) and goes to slot 0.
    st, res = insert(tiny_model, st, [P[5], P[11]], [greedy(8)] * 2)
    np.testing.assert_array_equal(res.accepted, [True, False])
    np.testing.assert_array_equal(res.slot, [0, CFG.max_slots])
    h = host(st)
    np.testing.assert_array_equal(h.page_table[0], table_row(1, 2))
    np.testing.assert_array_equal(h.page_refcount, np.ones(CFG.num_pages, np.int32))
    assert_slots_equal(before, h, slots=[1, 2, 3])


# --------------------------------------------------------------------------- decode
def test_greedy_decode_matches_uncached_forward(tiny_model):
    st, res = insert(tiny_model, fresh(tiny_model), [P[7], P[11]], [greedy(12), greedy(9)])
    st, tokens, emitted = decode(tiny_model, st, chunks=3)  # 12 steps
    # Slot 0 decodes in steps 1..11 (12 tokens incl. the insert token), slot 1 in steps 1..8.
    np.testing.assert_array_equal(emitted[:, 0], [True] * 11 + [False])
    np.testing.assert_array_equal(emitted[:, 1], [True] * 8 + [False] * 4)
    assert not emitted[:, 2:].any()
    for slot, prompt, n in [(0, P[7], 12), (1, P[11], 9)]:
        got = [int(res.token[slot])] + emitted_by_slot(tokens, emitted, slot)
        assert got == oracle(tiny_model, prompt, n), f"slot {slot}"
    h = host(st)
    np.testing.assert_array_equal(h.finished[:2], [True, True])
    np.testing.assert_array_equal(h.finish_reason[:2], [FINISH_LENGTH, FINISH_LENGTH])
    np.testing.assert_array_equal(h.num_generated[:2], [12, 9])
    # The last token is never written back: lengths 7 + 11 and 11 + 8.
    np.testing.assert_array_equal(h.length[:2], [18, 19])
    # Decode step j writes slot 0 at position 6 + j and slot 1 at 10 + j; a new page is taken
    # at positions 8, 12, 16, lowest free first, slot 0 before slot 1 within a step:
    # j=2: slot 0 (pos 8) -> 6, slot 1 (pos 12) -> 7; j=6: slot 0 (12) -> 8, slot 1 (16) -> 9;
    # j=10: slot 0 (16) -> 10.
    np.testing.assert_array_equal(h.page_table[:2], [table_row(1, 2, 6, 8, 10), table_row(3, 4, 5, 7, 9)])
    np.testing.assert_array_equal(h.page_refcount, refcount_with(*range(1, 11)))


def test_stop_token_finishes_with_stop(tiny_model):
    want = oracle(tiny_model, P[11], 12)
    k = next(i for i in range(2, 12) if want[i] not in want[:i])  # first new token at index >= 2
    first7 = oracle(tiny_model, P[7], 1)[0]
    st, res = insert(tiny_model, fresh(tiny_model), [P[7], P[11]],
                     [greedy(20, stop=[first7]), greedy(20, stop=[want[k], 257])])
    # Slot 0 stops on its very first token, at insert.
    np.testing.assert_array_equal(res.finished, [True, False])
    st, tokens, emitted = decode(tiny_model, st, chunks=3)
    h = host(st)
    assert not emitted[:, 0].any()
    got = [int(res.token[1])] + emitted_by_slot(tokens, emitted, 1)
    assert got == want[: k + 1], f"stop id {want[k]} at index {k}"
    np.testing.assert_array_equal(h.finished[:2], [True, True])
    np.testing.assert_array_equal(h.finish_reason[:2], [FINISH_STOP, FINISH_STOP])


def test_max_tokens_and_max_seq_len_finish_with_length(tiny_model):
    st = fresh(tiny_model)
    # max_seq_len 32: a 29-token prompt has room for 3 generated tokens, a 31-token one for 1.
    st, res_a = insert(tiny_model, st, [P[29], P[31]], [greedy(50), greedy(50)])
    # max_tokens: 1 finishes at insert, 6 after exactly 6 tokens.
    st, res_b = insert(tiny_model, st, [P[5], P[3]], [greedy(1), greedy(6)])
    np.testing.assert_array_equal(res_a.slot, [0, 1])
    np.testing.assert_array_equal(res_b.slot, [2, 3])
    np.testing.assert_array_equal(res_a.finished, [False, True])
    np.testing.assert_array_equal(res_b.finished, [True, False])
    st, tokens, emitted = decode(tiny_model, st, chunks=2)
    h = host(st)
    for slot, first, prompt, n in [(0, res_a.token[0], P[29], 3), (1, res_a.token[1], P[31], 1),
                                   (2, res_b.token[0], P[5], 1), (3, res_b.token[1], P[3], 6)]:
        got = [int(first)] + emitted_by_slot(tokens, emitted, slot)
        assert got == oracle(tiny_model, prompt, n), f"slot {slot}"
    np.testing.assert_array_equal(h.finished, [True] * 4)
    np.testing.assert_array_equal(h.finish_reason, [FINISH_LENGTH] * 4)
    np.testing.assert_array_equal(h.length, [31, 31, 5, 8])
    # Prompt + generated tokens never exceed max_seq_len; no page beyond pages_per_seq.
    assert len(P[29]) + h.num_generated[0] == CFG.max_seq_len
    np.testing.assert_array_equal(h.page_table[0], range(1, 9))
    np.testing.assert_array_equal(h.page_table[1], range(9, 17))


def test_out_of_pages_aborts_only_the_starved_slot(tiny_model):
    # Pin pages 6..31 so the pool has pages 1..5 only.
    st = fresh(tiny_model)
    st = st.replace(alloc=st.alloc.replace(refcount=st.alloc.refcount.at[6:].set(1)))
    st, res = insert(tiny_model, st, [P[5], P[7]], [greedy(10), greedy(5)])
    # Slot 0 has pages 1, 2 (positions 0..7), slot 1 pages 3, 4. Decode step j writes slot 0 at
    # 4 + j and slot 1 at 6 + j: at j=2 slot 1 (pos 8) takes page 5, the last free one; at j=4
    # slot 0 (pos 8) finds none and aborts. Slot 1 reaches max_tokens 5 at j=4.
    st, tokens, emitted = decode(tiny_model, st, chunks=1)
    h = host(st)
    np.testing.assert_array_equal(emitted[:, 0], [True, True, True, False])
    np.testing.assert_array_equal(emitted[:, 1], [True, True, True, True])
    np.testing.assert_array_equal(h.finish_reason[:2], [FINISH_ABORT, FINISH_LENGTH])
    np.testing.assert_array_equal(h.finished[:2], [True, True])
    assert [int(res.token[0])] + emitted_by_slot(tokens, emitted, 0) == oracle(tiny_model, P[5], 4)
    assert [int(res.token[1])] + emitted_by_slot(tokens, emitted, 1) == oracle(tiny_model, P[7], 5)
    np.testing.assert_array_equal(h.length[:2], [8, 11])
    np.testing.assert_array_equal(h.page_table[:2], [table_row(1, 2), table_row(3, 4, 5)])
    np.testing.assert_array_equal(h.page_refcount, np.ones(CFG.num_pages, np.int32))
    # Eviction returns exactly the slots' pages.
    h = host(evict_jit(CFG, st))
    np.testing.assert_array_equal(h.page_refcount, refcount_with(pinned=range(6, 32)))
    assert not h.active.any()


def test_nan_in_unowned_kv_does_not_change_outputs(tiny_model):
    """Poison every K/V entry no slot may read: free pages, the null page, and positions at or
    beyond each slot's length in its own pages. Decode (which also takes fresh, poisoned pages
    mid-run) must give exactly the clean run's tokens."""
    st, res = insert(tiny_model, fresh(tiny_model), [P[7], P[11]], [greedy(12), greedy(9)])
    h = host(st)
    readable = np.zeros((CFG.num_pages, CFG.page_size), bool)
    for s in np.nonzero(h.active)[0]:
        for pos in range(h.length[s]):
            readable[h.page_table[s, pos // CFG.page_size], pos % CFG.page_size] = True
    assert readable[0].sum() == 0 and readable.sum() == 7 + 11
    k, v = np.array(h.k_pages), np.array(h.v_pages)
    k[:, ~readable], v[:, ~readable] = np.nan, np.nan
    poisoned = copy(st).replace(k_pages=jnp.asarray(k), v_pages=jnp.asarray(v))

    _, clean_tokens, clean_emitted = decode(tiny_model, st, chunks=3)
    st_p, tokens, emitted = decode(tiny_model, poisoned, chunks=3)
    np.testing.assert_array_equal(emitted, clean_emitted)
    np.testing.assert_array_equal(np.where(emitted, tokens, -1), np.where(clean_emitted, clean_tokens, -1))
    assert [int(res.token[0])] + emitted_by_slot(tokens, emitted, 0) == oracle(tiny_model, P[7], 12)
    # Every position a slot wrote is finite: no NaN leaked into the cache either.
    h = host(st_p)
    for s in (0, 1):
        for pos in range(h.length[s]):
            page, off = h.page_table[s, pos // CFG.page_size], pos % CFG.page_size
            assert np.isfinite(h.k_pages[:, page, off]).all() and np.isfinite(h.v_pages[:, page, off]).all()


def test_seeded_sampling_is_batch_invariant(tiny_model):
    """A seeded request draws the same tokens whatever the other slots hold and whichever slot
    it lands in (keys are per request, folded with the token index)."""
    r = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)

    def run(state, batches):
        out = {}
        for prompts, params, ids in batches:
            state, res = insert(tiny_model, state, prompts, params, ids)
            for row, rid in enumerate(ids):
                out[rid] = (int(res.slot[row]), [int(res.token[row])])
        state, tokens, emitted = decode(tiny_model, state, chunks=2)
        return {rid: (slot, toks + emitted_by_slot(tokens, emitted, slot)) for rid, (slot, toks) in out.items()}

    a = run(fresh(tiny_model), [([P[7], P[11]], [r, greedy(8)], [0, 1])])
    b = run(fresh(tiny_model), [([P[5], P[3]], [SamplingParams(max_tokens=8, temperature=0.7, seed=9), greedy(8)], [1, 2]),
                                ([P[7]], [r], [0])])
    assert a[0][0] == 0 and b[0][0] == 2
    assert len(a[0][1]) == 8
    assert a[0][1] == b[0][1]
    # It really sampled (the tiny model's near-flat logits make a greedy match very unlikely),
    # and a different seed draws differently.
    assert a[0][1] != oracle(tiny_model, P[7], 8)
    c = run(fresh(tiny_model), [([P[7]], [SamplingParams(max_tokens=8, temperature=1.0, seed=1235)], [0])])
    assert c[0][1] != a[0][1]


# --------------------------------------------------------------------------- evict
def test_evict_frees_exactly_the_slot_and_leaves_others_intact(tiny_model):
    st, res = insert(tiny_model, fresh(tiny_model), [P[7], P[11]], [greedy(12), greedy(12)])
    st, tokens1, emitted1 = decode(tiny_model, st, chunks=1)  # both still running
    before = host(st)
    assert before.active[:2].all() and not before.finished[:2].any()
    st = evict_jit(CFG, st, evict_mask(0))
    after = host(st)
    freed = before.page_table[0][before.page_table[0] != 0]
    np.testing.assert_array_equal(freed, [1, 2, 6])
    delta = before.page_refcount - after.page_refcount
    np.testing.assert_array_equal(np.nonzero(delta)[0], freed)
    assert delta[freed].tolist() == [1, 1, 1]
    np.testing.assert_array_equal(after.page_table[0], table_row())
    assert not after.active[0] and after.request_id[0] == -1 and after.length[0] == 0
    assert after.finish_reason[0] == FINISH_NONE
    assert_slots_equal(before, after, slots=[1, 2, 3])
    np.testing.assert_array_equal(after.k_pages, before.k_pages)
    np.testing.assert_array_equal(after.v_pages, before.v_pages)

    # Default evict frees finished slots only: a 1-token request finishes at insert (slot 0,
    # reusing pages 1, 2) while slot 1 keeps running.
    st, res2 = insert(tiny_model, st, [P[5]], [greedy(1)], ids=[7])
    assert res2.slot[0] == 0 and res2.finished[0]
    mid = host(st)
    st = evict_jit(CFG, st)
    after = host(st)
    assert not after.active[0] and after.active[1]
    np.testing.assert_array_equal(after.page_refcount, refcount_with(3, 4, 5, 7))
    assert_slots_equal(mid, after, slots=[1, 2, 3])

    # Slot 1 finishes exactly as if nothing had happened around it.
    st, tokens2, emitted2 = decode(tiny_model, st, chunks=2)
    got = [int(res.token[1])] + emitted_by_slot(tokens1, emitted1, 1) + emitted_by_slot(tokens2, emitted2, 1)
    assert got == oracle(tiny_model, P[11], 12)
    h = host(evict_jit(CFG, st))
    np.testing.assert_array_equal(h.page_refcount, refcount_with())
    np.testing.assert_array_equal(h.page_table, np.zeros_like(h.page_table))


# --------------------------------------------------------------------------- the example
@functools.cache
def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "while_loop_generate.py"
    spec = importlib.util.spec_from_file_location("while_loop_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_while_loop_example_matches_engine(tiny_model):
    ex = _example()
    prompts = [list(_rng_prompt(i, n)) for i, n in enumerate([17, 20, 18, 22, 19, 21])]
    params = [greedy(n) for n in (3, 8, 5, 1, 6, 2)]  # staggered finishes: slots free mid-run
    queue = ex.make_queue(CFG, tiny_model, prompts, params)
    tokens, reason, state = ex.generate_in_jit(CFG, tiny_model, queue, 8)
    tokens, reason, state = np.asarray(tokens), np.asarray(reason), host(state)

    engine = Engine(tiny_model, max_slots=CFG.max_slots, page_size=CFG.page_size, num_pages=CFG.num_pages,
                    max_seq_len=CFG.max_seq_len, prefill_buckets=CFG.prefill_buckets,
                    max_prefill_batch=CFG.max_prefill_batch, decode_steps=CFG.decode_steps,
                    max_stop_ids=CFG.max_stop_ids)
    outs = engine.generate(prompts, params)
    for i, out in enumerate(outs):
        got = tokens[i][tokens[i] >= 0].tolist()
        assert got == out.token_ids, f"request {i}"
        assert jaxinfer.state.FINISH_REASONS[int(reason[i])] == out.finish_reason, f"request {i}"
    assert [len(o.token_ids) for o in outs] == [3, 8, 5, 1, 6, 2]
    # Everything was evicted: every page but the null page is free, every slot empty.
    np.testing.assert_array_equal(state.page_refcount, refcount_with())
    assert not state.active.any() and not state.page_table.any()


def _rng_prompt(i: int, n: int):
    return np.random.default_rng(1000 + i).integers(0, 256, size=n)
