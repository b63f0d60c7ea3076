"""The page allocator (jaxinfer.allocator) with exact page ids, vLLM block-pool style.

The contract under test (allocator module docstring): free pages have reference count 0, the
null page 0 is pinned at 1 and never handed out; allocation hands out the lowest-numbered free
pages in request order; grants form a prefix (request i is granted only if it and every request
before it fit); release drops one reference per non-null page of the masked rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer import allocator
from jaxinfer.state import NULL_PAGE

# One compilation per (pool size, rows, max_per) shape used below.
_allocate = jax.jit(allocator.allocate, static_argnums=2)
_release = jax.jit(allocator.release)


def fresh(num_pages: int) -> np.ndarray:
    return np.zeros(num_pages, np.int32) + (np.arange(num_pages) == NULL_PAGE)


def allocate(refcount, counts, max_per):
    pages, granted, rc = _allocate(jnp.asarray(refcount, jnp.int32), jnp.asarray(counts, jnp.int32), max_per)
    return np.asarray(pages), np.asarray(granted), np.asarray(rc)


def release(refcount, rows, mask):
    return np.asarray(_release(jnp.asarray(refcount, jnp.int32), jnp.asarray(rows, jnp.int32), jnp.asarray(mask)))


def test_fresh_pool_hands_out_1_2_3_in_request_order():
    pages, granted, rc = allocate(fresh(16), [2, 3, 1], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 0], [3, 4, 5], [6, 0, 0]])
    np.testing.assert_array_equal(granted, [True, True, True])
    np.testing.assert_array_equal(rc, [1, 1, 1, 1, 1, 1, 1] + [0] * 9)
    assert allocator.num_free(jnp.asarray(rc)) == 9


def test_zero_counts_get_null_rows_and_take_nothing():
    pages, granted, rc = allocate(fresh(16), [0, 2, 0, 1], 3)
    np.testing.assert_array_equal(pages, [[0, 0, 0], [1, 2, 0], [0, 0, 0], [3, 0, 0]])
    np.testing.assert_array_equal(granted, [True, True, True, True])
    np.testing.assert_array_equal(rc, [1, 1, 1, 1] + [0] * 12)
    # All-zero request: nothing changes.
    pages, granted, rc2 = allocate(rc, [0, 0, 0, 0], 3)
    assert not pages.any() and granted.all()
    np.testing.assert_array_equal(rc2, rc)


def test_grants_form_a_prefix_when_the_pool_runs_short():
    pool = fresh(6)  # 5 usable pages: 1..5
    # 2 fits, 2+4 does not, and the 1-page request after it is refused although it would fit alone.
    pages, granted, rc = allocate(pool, [2, 4, 1], 4)
    np.testing.assert_array_equal(granted, [True, False, False])
    np.testing.assert_array_equal(pages, [[1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rc, [1, 1, 1, 0, 0, 0])
    # Exactly filling the pool is fine; the next request is refused.
    pages, granted, rc = allocate(pool, [2, 3, 1], 4)
    np.testing.assert_array_equal(granted, [True, True, False])
    np.testing.assert_array_equal(pages, [[1, 2, 0, 0], [3, 4, 5, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rc, [1, 1, 1, 1, 1, 1])
    # A first request that does not fit refuses everything after it too, and changes nothing.
    _, _, rc = allocate(pool, [3, 0, 0], 4)  # pages 1..3 in use, 4 and 5 free
    pages, granted, rc2 = allocate(rc, [3, 1, 0], 4)
    np.testing.assert_array_equal(granted, [False, False, False])
    assert not pages.any()
    np.testing.assert_array_equal(rc2, rc)


def test_release_returns_pages_and_ignores_null_entries():
    pages, _, rc = allocate(fresh(12), [3, 2, 3], 4)
    np.testing.assert_array_equal(pages, [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 0]])
    rc = release(rc, pages, [False, True, False])
    # Only pages 4 and 5 drop; the null entries (page 0) in every row are not decremented.
    np.testing.assert_array_equal(rc, [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
    rc = release(rc, pages, [True, False, True])
    np.testing.assert_array_equal(rc, fresh(12))
    assert rc.min() >= 0


def test_allocate_after_release_reuses_freed_ids_lowest_first():
    pages, _, rc = allocate(fresh(12), [3, 3, 3], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    rc = release(rc, pages, [True, False, True])  # free 1,2,3 and 7,8,9; 10,11 were never used
    pages, granted, rc = allocate(rc, [2, 3, 0], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 0], [3, 7, 8], [0, 0, 0]])
    pages, granted, rc = allocate(rc, [3, 0, 0], 3)
    np.testing.assert_array_equal(pages, [[9, 10, 11], [0, 0, 0], [0, 0, 0]])
    assert granted.all()
    np.testing.assert_array_equal(rc, np.ones(12, np.int32))


def test_null_page_never_handed_out_and_stays_pinned():
    rc = fresh(8)
    # Exhaust the pool with more demand than supply, repeatedly, with releases in between.
    for _ in range(3):
        pages, granted, rc = allocate(rc, [3, 3, 3], 3)
        held = pages[granted]
        assert NULL_PAGE not in held[held != 0] and rc[NULL_PAGE] == 1
        assert sorted(held[held != 0].tolist()) == list(range(1, 7))
        rc = release(rc, pages, granted)
        assert rc[NULL_PAGE] == 1
    np.testing.assert_array_equal(rc, fresh(8))


# --------------------------------------------------------------------------- property test
NUM_PAGES, ROWS, MAX_PER = 12, 4, 4

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.lists(st.integers(0, MAX_PER), min_size=ROWS, max_size=ROWS)),
        st.tuples(st.just("release"), st.lists(st.booleans(), min_size=ROWS, max_size=ROWS)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_allocate_release_sequences_keep_invariants(sequence):
    """A page table of ROWS rows driven by random allocate/release calls (a row only asks for
    pages while it holds none), checked after every call against a plain-Python free list."""
    rc = fresh(NUM_PAGES)
    table = np.zeros((ROWS, MAX_PER), np.int32)
    free = list(range(1, NUM_PAGES))  # model: sorted free page ids
    for op, arg in sequence:
        if op == "alloc":
            counts = np.where(table.any(1), 0, arg).astype(np.int32)
            pages, granted, rc = allocate(rc, counts, MAX_PER)
            # Model: prefix grants, lowest free ids in request order.
            ends = np.cumsum(counts)
            want_granted = ends <= len(free)
            np.testing.assert_array_equal(granted, want_granted)
            for i in range(ROWS):
                want = free[ends[i] - counts[i]: ends[i]] if want_granted[i] else []
                np.testing.assert_array_equal(pages[i], want + [0] * (MAX_PER - len(want)))
            taken = set(pages[granted].ravel().tolist()) - {0}
            free = [p for p in free if p not in taken]
            table = np.where((granted & (counts > 0))[:, None], pages, table)
        else:
            mask = np.asarray(arg)
            rc = release(rc, table, mask)
            free = sorted(free + table[mask].ravel()[table[mask].ravel() != 0].tolist())
            table[mask] = 0
        held = table[table != 0]
        assert rc.min() >= 0 and rc[NULL_PAGE] == 1
        assert rc.sum() == held.size + 1, "sum of refcounts != pages held by rows + null page"
        assert len(set(held.tolist())) == held.size, "a page is held by two rows (or twice)"
        np.testing.assert_array_equal(np.nonzero(rc == 0)[0], free)
        assert np.all(rc[held] == 1)
