"""The page allocator (jaxinfer.allocator) with exact page ids, vLLM block-pool style.

The contract under test (allocator module docstring):
- the null page 0 is pinned at reference count 1 and never handed out;
- allocation takes never-cached free pages first (lowest id first), then cached free pages in
  LRU order (earliest release first; within one release the deepest page first), in request
  order; grants form a prefix (request i is granted only if it and every request before it fit);
- release drops one reference per non-null page of the masked rows and stamps the LRU key only
  on pages that became free;
- the prefix cache is a hash chain verified by parent page id + parent generation + tokens, so a
  lookup returns exactly the pages holding the prompt's prefix, and a hash collision or a
  reallocated parent can only cause a miss (cf. vLLM tests/v1/core/test_prefix_caching.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer import allocator
from jaxinfer.allocator import NULL_PAGE, ROOT_HASH

# One compilation per shape used below.
_allocate = jax.jit(allocator.allocate, static_argnums=2)
_release = jax.jit(allocator.release)
_acquire = jax.jit(allocator.acquire)
_lookup = jax.jit(allocator.lookup)
_write = jax.jit(allocator.write_tokens)
_register = jax.jit(allocator.register)
_register_full = jax.jit(allocator.register_full_pages)
_order = jax.jit(allocator.eviction_order)


# --------------------------------------------------------------------------- helpers
def i32(x) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.int32))


def allocate(a, counts, max_per):
    a, pages, granted = _allocate(a, i32(counts), max_per)
    return a, np.asarray(pages), np.asarray(granted)


def release(a, rows, mask):
    return _release(a, i32(rows), jnp.asarray(np.asarray(mask, bool)))


def acquire(a, rows, mask=None):
    rows = np.asarray(rows, np.int32)
    mask = rows != NULL_PAGE if mask is None else np.asarray(mask, bool)
    return _acquire(a, i32(rows), jnp.asarray(mask))


def fill(a, row, tokens):
    """Write one sequence's `tokens` into the pages of `row` and register its full pages."""
    row = np.asarray(row, np.int32)
    pos = np.arange(len(tokens))
    a = _write(a, i32(row[pos // a.page_size]), i32(pos % a.page_size), i32(tokens))
    return _register_full(a, i32(row[None]), i32([len(tokens)]), jnp.asarray([True]))


def lookup(a, prompts, max_pages=None):
    prompts = np.asarray(prompts, np.int32)
    if max_pages is None:
        max_pages = [prompts.shape[1] // a.page_size] * prompts.shape[0]
    pages, hits = _lookup(a, i32(prompts), i32(max_pages))
    return np.asarray(pages), np.asarray(hits)


def free_order(a) -> list[int]:
    """The free part of eviction_order: the page ids the next allocations take, in order."""
    return np.asarray(_order(a))[: int(allocator.num_free(a))].tolist()


def arr(x) -> np.ndarray:
    return np.asarray(x)


def H(parent_hash, tokens) -> int:
    """chain_hash of one page, as a Python int."""
    h = allocator.chain_hash(jnp.asarray([parent_hash], jnp.uint32), i32([tokens]))
    return int(h[0])


# --------------------------------------------------------------------------- allocate / release
def test_init_pins_the_null_page():
    a = allocator.init(8, 2)
    np.testing.assert_array_equal(arr(a.refcount), [1, 0, 0, 0, 0, 0, 0, 0])
    assert not arr(a.cached).any() and int(a.clock) == 0
    assert int(a.hash[NULL_PAGE]) == ROOT_HASH
    assert a.num_pages == 8 and a.page_size == 2 and a.tokens.shape == (8, 2)
    assert int(allocator.num_free(a)) == 7
    np.testing.assert_array_equal(arr(_order(a)), [1, 2, 3, 4, 5, 6, 7, 0])  # in-use null page last


def test_fresh_pool_hands_out_1_2_3_in_request_order():
    a, pages, granted = allocate(allocator.init(16, 2), [2, 3, 1], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 0], [3, 4, 5], [6, 0, 0]])
    np.testing.assert_array_equal(granted, [True, True, True])
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 1, 1, 1, 1] + [0] * 9)
    np.testing.assert_array_equal(arr(a.gen), [0, 1, 1, 1, 1, 1, 1] + [0] * 9)  # gen counts hand-outs
    assert int(allocator.num_free(a)) == 9
    assert free_order(a) == list(range(7, 16))


def test_zero_counts_get_null_rows_and_take_nothing():
    a, pages, granted = allocate(allocator.init(16, 2), [0, 2, 0, 1], 3)
    np.testing.assert_array_equal(pages, [[0, 0, 0], [1, 2, 0], [0, 0, 0], [3, 0, 0]])
    np.testing.assert_array_equal(granted, [True, True, True, True])
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 1] + [0] * 12)
    # All-zero request: nothing changes.
    a2, pages, granted = allocate(a, [0, 0, 0, 0], 3)
    assert not pages.any() and granted.all()
    np.testing.assert_array_equal(arr(a2.refcount), arr(a.refcount))
    np.testing.assert_array_equal(arr(a2.gen), arr(a.gen))


def test_grants_form_a_prefix_when_the_pool_runs_short():
    pool = allocator.init(6, 2)  # 5 usable pages: 1..5
    # 2 fits, 2+4 does not, and the 1-page request after it is refused although it would fit alone.
    a, pages, granted = allocate(pool, [2, 4, 1], 4)
    np.testing.assert_array_equal(granted, [True, False, False])
    np.testing.assert_array_equal(pages, [[1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(arr(a.gen), [0, 1, 1, 0, 0, 0])
    # Exactly filling the pool is fine; the next request is refused.
    a, pages, granted = allocate(pool, [2, 3, 1], 4)
    np.testing.assert_array_equal(granted, [True, True, False])
    np.testing.assert_array_equal(pages, [[1, 2, 0, 0], [3, 4, 5, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 1, 1, 1])
    assert int(allocator.num_free(a)) == 0
    # A first request that does not fit refuses everything after it too, and changes nothing.
    a, _, _ = allocate(pool, [3, 0, 0], 4)  # pages 1..3 in use, 4 and 5 free
    a2, pages, granted = allocate(a, [3, 1, 0], 4)
    np.testing.assert_array_equal(granted, [False, False, False])
    assert not pages.any()
    for f in ("refcount", "gen", "cached"):
        np.testing.assert_array_equal(arr(getattr(a2, f)), arr(getattr(a, f)), err_msg=f)


def test_release_returns_pages_and_ignores_null_entries():
    a, pages, _ = allocate(allocator.init(12, 2), [3, 2, 3], 4)
    np.testing.assert_array_equal(pages, [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 0]])
    a = release(a, pages, [False, True, False])
    # Only pages 4 and 5 drop; the null entries (page 0) in every row are not decremented.
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
    assert int(a.clock) == 1
    # A release that drops nothing (no row masked, or only null entries) does not tick the clock.
    a = release(a, pages, [False, False, False])
    a = release(a, np.zeros_like(pages), [True, True, True])
    assert int(a.clock) == 1
    np.testing.assert_array_equal(arr(a.refcount), [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
    a = release(a, pages, [True, False, True])
    np.testing.assert_array_equal(arr(a.refcount), [1] + [0] * 11)
    assert int(a.clock) == 2


def test_allocate_after_release_reuses_freed_ids_lowest_first():
    # Pages that were never registered in the cache go back to the lowest-id-first pool.
    a, pages, _ = allocate(allocator.init(12, 2), [3, 3, 3], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    a = release(a, pages, [True, False, True])  # free 1,2,3 and 7,8,9; 10,11 were never used
    assert free_order(a) == [1, 2, 3, 7, 8, 9, 10, 11]
    a, pages, granted = allocate(a, [2, 3, 0], 3)
    np.testing.assert_array_equal(pages, [[1, 2, 0], [3, 7, 8], [0, 0, 0]])
    a, pages, granted = allocate(a, [3, 0, 0], 3)
    np.testing.assert_array_equal(pages, [[9, 10, 11], [0, 0, 0], [0, 0, 0]])
    assert granted.all()
    np.testing.assert_array_equal(arr(a.refcount), np.ones(12, np.int32))
    np.testing.assert_array_equal(arr(a.gen), [0, 2, 2, 2, 1, 1, 1, 2, 2, 2, 1, 1])


def test_null_page_never_handed_out_and_stays_pinned():
    a = allocator.init(8, 2)
    # Exhaust the pool with more demand than supply, repeatedly, with releases in between.
    for _ in range(3):
        a, pages, granted = allocate(a, [3, 3, 3], 3)
        np.testing.assert_array_equal(granted, [True, True, False])
        held = pages[granted]
        assert sorted(held.ravel().tolist()) == list(range(1, 7))
        assert int(a.refcount[NULL_PAGE]) == 1
        a = release(a, pages, granted)
        assert int(a.refcount[NULL_PAGE]) == 1 and int(a.gen[NULL_PAGE]) == 0
    np.testing.assert_array_equal(arr(a.refcount), [1] + [0] * 7)


# --------------------------------------------------------------------------- prefix cache
def test_chain_hash_depends_on_order_position_and_parent():
    h = int(ROOT_HASH)
    assert H(h, [1, 2]) == H(h, [1, 2])
    assert H(h, [1, 2]) != H(h, [2, 1])  # position-mixed, not a multiset hash
    assert H(h, [1, 2]) != H(H(h, [5, 6]), [1, 2])  # chained through the parent's hash
    # Batched rows are hashed independently.
    both = allocator.chain_hash(jnp.asarray([h, H(h, [5, 6])], jnp.uint32), i32([[1, 2], [1, 2]]))
    assert [int(x) for x in both] == [H(h, [1, 2]), H(H(h, [5, 6]), [1, 2])]


def test_register_full_pages_registers_full_uncached_pages_only():
    a, pages, _ = allocate(allocator.init(8, 2), [3, 3], 3)  # rows [1,2,3], [4,5,6]
    np.testing.assert_array_equal(pages, [[1, 2, 3], [4, 5, 6]])
    toks = [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]]
    pos = np.arange(6)
    a = _write(a, i32(pages[:, pos // 2]), i32(np.broadcast_to(pos % 2, (2, 6))), i32(toks))
    # Row 0 has 5 tokens (2 full pages + 1 partial), row 1 is masked out.
    a = _register_full(a, i32(pages), i32([5, 6]), jnp.asarray([True, False]))
    np.testing.assert_array_equal(arr(a.cached), [0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(arr(a.parent)[[1, 2]], [NULL_PAGE, 1])
    np.testing.assert_array_equal(arr(a.parent_gen)[[1, 2]], [0, 1])  # gen[null] = 0, gen[1] = 1
    h1 = H(ROOT_HASH, [10, 11])
    assert int(a.hash[1]) == h1 and int(a.hash[2]) == H(h1, [12, 13])
    # Forge page 1's hash: extending row 0 to 6 tokens registers page 3 only and leaves the
    # already-cached pages alone (a re-registration would overwrite the forged hash).
    a = a.replace(hash=a.hash.at[1].set(jnp.uint32(12345)))
    a = _register_full(a, i32(pages), i32([6, 6]), jnp.asarray([True, False]))
    np.testing.assert_array_equal(arr(a.cached), [0, 1, 1, 1, 0, 0, 0, 0])
    assert int(a.hash[1]) == 12345 and int(a.hash[2]) == H(h1, [12, 13])
    assert int(a.hash[3]) == H(H(h1, [12, 13]), [14, 15]) and int(a.parent[3]) == 2
    # Null entries in the table are never registered.
    a = _register_full(a, i32([[0, 0, 0], [0, 0, 0]]), i32([6, 6]), jnp.asarray([True, True]))
    assert not bool(a.cached[NULL_PAGE]) and int(a.hash[NULL_PAGE]) == ROOT_HASH


def test_prefix_hits_follow_the_hash_chain():
    """vLLM test_prefill style: exact page ids of a cached prefix, and the chain semantics."""
    a, pages, _ = allocate(allocator.init(16, 4), [4], 4)
    np.testing.assert_array_equal(pages, [[1, 2, 3, 4]])
    A = list(range(100, 114))  # 3 full pages + 2 tokens in page 4
    a = fill(a, [1, 2, 3, 4], A)
    np.testing.assert_array_equal(arr(a.cached)[:6], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(arr(a.parent)[1:4], [0, 1, 2])
    np.testing.assert_array_equal(arr(a.parent_gen)[1:4], [0, 1, 1])
    # Pages of a running sequence can already be shared.
    np.testing.assert_array_equal(lookup(a, [A[:12]])[0], [[1, 2, 3]])

    a = release(a, [[1, 2, 3, 4]], [True])
    assert arr(a.cached)[1:4].all()  # free but still cached
    prompts = [
        A[:12],  # the whole cached prefix
        A[:8] + [7, 7, 7, 7],  # shares the first two pages
        [99] + A[1:12],  # differs in page 0 only: the chain breaks at page 0
        A[4:8] + A[0:4] + A[8:12],  # the right pages in the wrong positions
        A[:4] + [7, 7, 7, 7] + A[8:12],  # page 2 equal, page 1 not: hits stop at the first miss
        A[:12],  # capped at 1 page
        A[:12],  # capped at 0 pages
    ]
    pages, hits = lookup(a, prompts, [3, 3, 3, 3, 3, 1, 0])
    np.testing.assert_array_equal(pages, [[1, 2, 3], [1, 2, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(hits, [3, 2, 0, 0, 1, 1, 0])
    # The partial page 4 was never registered: a 14-token prompt still hits 3 pages.
    pages, hits = lookup(a, [A], [3])
    np.testing.assert_array_equal(pages, [[1, 2, 3]])
    np.testing.assert_array_equal(hits, [3])
    # A prompt shorter than one page has nothing to look up.
    pages, hits = lookup(a, [A[:3]], [1])
    assert pages.shape == (1, 0) and hits.tolist() == [0]
    # lookup is pure: nothing acquired.
    np.testing.assert_array_equal(arr(a.refcount), [1] + [0] * 15)

    # A new sequence takes the 2 hit pages (acquire) and one fresh page: the fresh page is the
    # lowest-id never-cached free page (4: used before, never registered), not a cached one.
    a = acquire(a, [[1, 2]])
    np.testing.assert_array_equal(arr(a.refcount)[:5], [1, 1, 1, 0, 0])
    a, pages, _ = allocate(a, [1], 1)
    np.testing.assert_array_equal(pages, [[4]])
    assert free_order(a) == list(range(5, 16)) + [3]


def test_lru_eviction_order_across_releases():
    """vLLM test_evict style: never-cached pages by id, then cached pages: earlier release
    first, deeper page first within a release; evicting a suffix keeps the prefix usable."""
    a, rows, _ = allocate(allocator.init(10, 2), [3, 3], 3)
    np.testing.assert_array_equal(rows, [[1, 2, 3], [4, 5, 6]])
    A, B = [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15]
    a = fill(a, rows[0], A)
    a = fill(a, rows[1], B)  # page 6 holds one token: never cached
    np.testing.assert_array_equal(arr(a.cached), [0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    a = release(a, rows, [True, False])  # clock 0: A's pages 3, 2, 1
    a = release(a, rows, [False, True])  # clock 1: B's pages 6, 5, 4
    np.testing.assert_array_equal(arr(a.evict_key)[1:7], [2, 1, 0, 5, 4, 3])
    assert int(a.clock) == 2
    assert free_order(a) == [6, 7, 8, 9, 3, 2, 1, 5, 4]

    a, pages, granted = allocate(a, [2, 3], 3)
    np.testing.assert_array_equal(pages, [[6, 7, 0], [8, 9, 3]])
    assert granted.all()
    # Page 3 (A's deepest) was evicted: A's prompt now hits its first 2 pages, B's still 2.
    assert not bool(a.cached[3]) and int(a.gen[3]) == 2
    pages, hits = lookup(a, [A, B + [0]], [3, 3])
    np.testing.assert_array_equal(pages, [[1, 2, 0], [4, 5, 0]])
    np.testing.assert_array_equal(hits, [2, 2])

    a, pages, granted = allocate(a, [2, 2], 3)
    np.testing.assert_array_equal(pages, [[2, 1, 0], [5, 4, 0]])
    assert granted.all() and not arr(a.cached).any()
    np.testing.assert_array_equal(arr(a.gen), [0, 2, 2, 2, 2, 2, 2, 1, 1, 1])
    np.testing.assert_array_equal(lookup(a, [A, B + [0]], [3, 3])[1], [0, 0])
    a, pages, granted = allocate(a, [1], 3)
    assert not granted.any() and not pages.any() and int(allocator.num_free(a)) == 0


def test_lru_eviction_order_within_one_release():
    a, rows, _ = allocate(allocator.init(10, 2), [3, 3], 3)
    a = fill(a, rows[0], [1, 2, 3, 4, 5, 6])
    a = fill(a, rows[1], [11, 12, 13, 14, 15])
    a = release(a, rows, [True, True])  # one call: depth decides, then id
    np.testing.assert_array_equal(arr(a.evict_key)[1:7], [2, 1, 0, 2, 1, 0])
    assert free_order(a) == [6, 7, 8, 9, 3, 2, 5, 1, 4]
    a, pages, _ = allocate(a, [4, 3], 4)
    np.testing.assert_array_equal(pages, [[6, 7, 8, 9], [3, 2, 5, 0]])
    assert free_order(a) == [1, 4]


def test_reallocated_parent_orphans_its_children():
    """Taking a cached page drops it from the cache and bumps its generation: a child
    registered under it can no longer match, even after the page is refilled with the same
    tokens and re-registered (the child's hash alone would still match)."""
    a, rows, _ = allocate(allocator.init(3, 2), [2], 2)
    np.testing.assert_array_equal(rows, [[1, 2]])
    a = fill(a, [1, 2], [1, 2, 3, 4])
    np.testing.assert_array_equal(lookup(a, [[1, 2, 3, 4]])[0], [[1, 2]])
    # Free the parent first (as if its other holder had already gone), then the child.
    a = release(a, [[1, 0]], [True])
    a = release(a, [[0, 2]], [True])
    assert free_order(a) == [1, 2]
    a, pages, _ = allocate(a, [1], 1)
    np.testing.assert_array_equal(pages, [[1]])
    assert not bool(a.cached[1]) and int(a.gen[1]) == 2 and bool(a.cached[2])
    np.testing.assert_array_equal(lookup(a, [[1, 2, 3, 4]])[1], [0])
    # Refill page 1 with the same tokens and re-register it at the root.
    a = _write(a, i32([1, 1]), i32([0, 1]), i32([1, 2]))
    a = _register(a, i32([1]), i32([NULL_PAGE]), jnp.asarray([True]))
    assert int(a.hash[2]) == H(int(a.hash[1]), [3, 4]) and int(a.parent[2]) == 1  # hash filter passes
    assert int(a.parent_gen[2]) == 1 != int(a.gen[1])  # ... the generation check does not
    pages, hits = lookup(a, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(pages, [[1, 0]])
    np.testing.assert_array_equal(hits, [1])
    # The orphan is still a free cached page and is the next one evicted.
    a = release(a, [[1, 0]], [True])
    assert free_order(a) == [2, 1]


def test_hash_collision_is_a_miss_not_a_wrong_hit():
    a, rows, _ = allocate(allocator.init(8, 2), [2, 1], 2)
    np.testing.assert_array_equal(rows, [[1, 2], [3, 0]])
    a = fill(a, [1, 2], [1, 2, 5, 6])
    a = release(a, rows, [True, False])
    X, Y = [1, 2], [3, 4]
    # Forge: page 1 (tokens X) claims the hash of Y. Looking up Y must not return page 1.
    forged = a.replace(hash=a.hash.at[1].set(jnp.uint32(H(ROOT_HASH, Y))))
    pages, hits = lookup(forged, [Y + [5, 6], X + [5, 6]])
    np.testing.assert_array_equal(pages, [[0, 0], [0, 0]])  # X misses too: its hash no longer fits
    np.testing.assert_array_equal(hits, [0, 0])
    # Forge at depth 1: page 2 (tokens [5,6] under page 1) claims the hash of [7,8] under page 1.
    forged = a.replace(hash=a.hash.at[2].set(jnp.uint32(H(int(a.hash[1]), [7, 8]))))
    pages, hits = lookup(forged, [X + [7, 8]])
    np.testing.assert_array_equal(pages, [[1, 0]])
    np.testing.assert_array_equal(hits, [1])
    # Forge so that, after a miss at page 1 (tokens [7,8]), page 2 would fit page 2 of the prompt
    # by hash and by parent (page 1): hits still stop at the first miss.
    h_walk = H(H(int(a.hash[1]), [7, 8]), [5, 6])  # the prompt's chain hash through its page 2
    forged = a.replace(hash=a.hash.at[2].set(jnp.uint32(h_walk)))
    pages, hits = lookup(forged, [X + [7, 8, 5, 6]])
    np.testing.assert_array_equal(pages, [[1, 0, 0]])
    np.testing.assert_array_equal(hits, [1])
    # A genuine cache entry for Y (page 3) beside the forged page 1: never the wrong page.
    a = fill(a, [3], Y)
    forged = a.replace(hash=a.hash.at[1].set(a.hash[3]))
    pages, hits = lookup(forged, [Y])
    assert pages[0, 0] != 1
    assert (hits[0], pages[0, 0]) in {(0, NULL_PAGE), (1, 3)}
    # Sanity: without forgery both entries hit.
    np.testing.assert_array_equal(lookup(a, [X + [5, 6], Y + [0, 0]], [2, 1])[0], [[1, 2], [3, 0]])


def test_shared_page_refcount_and_lru_stamp():
    """A page shared by two rows goes 2 -> 1 -> 0 and becomes allocatable only at 0; only pages
    that became free get the release's LRU stamp."""
    a, rows, _ = allocate(allocator.init(8, 2), [2], 2)
    np.testing.assert_array_equal(rows, [[1, 2]])
    A = [1, 2, 3, 4]
    a = fill(a, [1, 2], A)
    # Sequence B shares A's first page (a prefix hit) and owns page 3.
    hit, hits = lookup(a, [[1, 2, 9, 9]], [1])
    np.testing.assert_array_equal(hit, [[1, 0]])
    a = acquire(a, hit)
    a, fresh, _ = allocate(a, [1], 1)
    np.testing.assert_array_equal(fresh, [[3]])
    a = fill(a, [1, 3], [1, 2, 9, 9])
    np.testing.assert_array_equal(arr(a.refcount)[:5], [1, 2, 1, 1, 0])
    assert int(a.parent[3]) == 1 and bool(a.cached[3])
    table = [[1, 2], [1, 3]]

    a = release(a, table, [True, False])  # clock 0: A
    np.testing.assert_array_equal(arr(a.refcount)[:5], [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(arr(a.evict_key)[:4], [0, 0, 0, 0])  # page 1 (still in use) not stamped
    assert free_order(a) == [4, 5, 6, 7, 2]
    a = release(a, table, [False, True])  # clock 1: B
    np.testing.assert_array_equal(arr(a.refcount)[:5], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(arr(a.evict_key)[:4], [0, 3, 0, 2])  # 1*2 + depth rank
    assert free_order(a) == [4, 5, 6, 7, 2, 3, 1]

    # Both holders released in one call: 2 -> 0 at once, stamped once.
    b, rows, _ = allocate(allocator.init(8, 2), [2, 1], 2)
    b = acquire(b, [[1, 0]])
    b = release(b, [[1, 2], [1, 3]], [True, True])
    np.testing.assert_array_equal(arr(b.refcount), [1] + [0] * 7)
    np.testing.assert_array_equal(arr(b.evict_key)[:4], [0, 1, 0, 0])
    assert int(b.clock) == 1


def test_copy_on_write_rows_share_pages():
    """Fork: two sample rows share the source's full pages (acquire) and get a fresh last page
    each; releasing one holder keeps the shared pages in use."""
    a, rows, _ = allocate(allocator.init(8, 2), [3], 3)
    np.testing.assert_array_equal(rows, [[1, 2, 3]])
    a = fill(a, [1, 2, 3], [1, 2, 3, 4, 5])  # pages 1, 2 full; page 3 partial
    a, fresh, granted = allocate(a, [1, 1], 1)
    np.testing.assert_array_equal(fresh, [[4], [5]])
    shared = [[1, 2, 0], [1, 2, 0]]
    # Masked-in null entries are ignored: the null page stays pinned at 1.
    a = acquire(a, shared, [[True, True, True], [True, True, True]])  # two rows, one reference each
    assert int(a.refcount[NULL_PAGE]) == 1
    table = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    np.testing.assert_array_equal(arr(a.refcount)[:6], [1, 3, 3, 1, 1, 1])

    a = release(a, table, [True, False, False])  # the source goes
    np.testing.assert_array_equal(arr(a.refcount)[:6], [1, 2, 2, 0, 1, 1])
    assert free_order(a) == [3, 6, 7]
    a = release(a, table, [False, True, False])  # the first sample goes
    np.testing.assert_array_equal(arr(a.refcount)[:6], [1, 1, 1, 0, 0, 1])
    assert free_order(a) == [3, 4, 6, 7]
    a, pages, granted = allocate(a, [4], 4)  # everything allocatable: never the shared pages
    np.testing.assert_array_equal(pages, [[3, 4, 6, 7]])
    assert bool(a.cached[1]) and bool(a.cached[2])
    a = release(a, table, [False, False, True])  # the last holder goes: now free and cached
    assert free_order(a) == [5, 2, 1]  # 5 (never registered) first, then the cached pages, deepest first
    np.testing.assert_array_equal(arr(a.cached)[[1, 2, 5]], [True, True, False])


# --------------------------------------------------------------------------- model-based test
NUM_PAGES, ROWS, PPS, PS = 9, 4, 3, 2  # 8 usable pages for up to 12 wanted: shortages happen


class Model:
    """Plain-Python reference of the allocator's contract (no hashes: exact matching)."""

    def __init__(self, n: int):
        self.n = n
        self.rc = [1] + [0] * (n - 1)
        self.cached = [False] * n
        self.gen = [0] * n
        self.key = [0] * n
        self.parent = [0] * n
        self.pgen = [0] * n
        self.toks: list = [None] * n
        self.clock = 0

    def order(self):
        def k(p):
            klass = 2 if self.rc[p] > 0 else 1 if self.cached[p] else 0
            return (klass, self.key[p] if klass == 1 else 0, p)

        return sorted(range(self.n), key=k)

    def num_free(self):
        return sum(r == 0 for r in self.rc)

    def lookup(self, tokens, max_pages):
        prev, out = 0, []
        for j in range(max_pages):
            chunk = tuple(tokens[j * PS:(j + 1) * PS])
            c = [p for p in range(self.n) if self.cached[p] and self.parent[p] == prev
                 and self.pgen[p] == self.gen[prev] and self.toks[p] == chunk]
            if not c:
                break
            prev = min(c)
            out.append(prev)
        return out

    def allocate(self, counts):
        free, s, pages, granted = self.order()[: self.num_free()], 0, [], []
        for c in counts:
            s += c
            granted.append(s <= len(free))
            pages.append(free[s - c: s] if granted[-1] else [])
        for p in (p for row in pages for p in row):
            self.rc[p], self.cached[p], self.gen[p] = 1, False, self.gen[p] + 1
        return pages, granted

    def release(self, rows, mask):
        touched = {}
        for row, m in zip(rows, mask):
            for pos, p in enumerate(row):
                if m and p:
                    self.rc[p] -= 1
                    touched[p] = max(touched.get(p, 0), len(row) - 1 - pos)
        for p, rank in touched.items():
            if self.rc[p] == 0:
                self.key[p] = self.clock * len(rows[0]) + rank
        self.clock += bool(touched)

    def register_full(self, table, lengths, mask, tokens):
        for j in range(PPS):
            todo = [(i, table[i][j]) for i in range(len(table))
                    if mask[i] and table[i][j] and (j + 1) * PS <= lengths[i] and not self.cached[table[i][j]]]
            for i, p in todo:
                par = table[i][j - 1] if j else 0
                self.cached[p], self.parent[p], self.pgen[p] = True, par, self.gen[par]
                self.toks[p] = tuple(tokens[i][j * PS:(j + 1) * PS])


@jax.jit
def _admit(a, tokens, length, want):
    """Engine-style admission of the rows in `want`: look up the prompt's cached prefix (at most
    (length-1) // PS pages), acquire it, allocate the rest, undo the hits of rejected rows,
    write the prompt's tokens and register its full pages."""
    max_hit = jnp.where(want, (length - 1) // PS, 0)
    hit, hits = allocator.lookup(a, tokens, max_hit)
    a = allocator.acquire(a, hit, hit != NULL_PAGE)
    need = jnp.where(want, -(-length // PS) - hits, 0)
    a, fresh, granted = allocator.allocate(a, need, PPS)
    ok = want & granted
    undo = (~ok)[:, None] & (hit != NULL_PAGE)
    a = a.replace(refcount=a.refcount.at[hit.ravel()].add(-undo.ravel().astype(jnp.int32)))
    hits = jnp.where(ok, hits, 0)
    j = jnp.arange(PPS)[None, :]
    fresh_row = jnp.take_along_axis(fresh, jnp.clip(j - hits[:, None], 0, PPS - 1), axis=1)
    table = jnp.where(j < hits[:, None], hit, jnp.where(j - hits[:, None] < need[:, None], fresh_row, NULL_PAGE))
    table = jnp.where(ok[:, None], table, NULL_PAGE)
    pos = jnp.arange(PPS * PS)[None, :]
    write = ok[:, None] & (pos >= hits[:, None] * PS) & (pos < length[:, None])
    page = jnp.where(write, jnp.take_along_axis(table, pos // PS, axis=1), NULL_PAGE)
    a = allocator.write_tokens(a, page, jnp.broadcast_to(pos % PS, page.shape), tokens)
    a = allocator.register_full_pages(a, table, length, ok)
    return a, table, hits, ok


prompt = st.tuples(st.integers(0, PPS * PS), st.lists(st.integers(0, 1), min_size=PPS * PS, max_size=PPS * PS))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.lists(prompt, min_size=ROWS, max_size=ROWS)),
        st.tuples(st.just("release"), st.lists(st.booleans(), min_size=ROWS, max_size=ROWS)),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_random_admit_release_sequences_match_a_reference_model(sequence):
    """ROWS page-table rows driven by random engine-style admissions (prefix lookup + acquire +
    allocate + write + register) and releases, checked after every call against `Model`: exact
    page ids, hits, grants, reference counts, cache flags, generations and eviction order."""
    a = allocator.init(NUM_PAGES, PS)
    m = Model(NUM_PAGES)
    table = np.zeros((ROWS, PPS), np.int32)
    for op, arg in sequence:
        if op == "admit":
            length = np.asarray([n if not table[i].any() else 0 for i, (n, _) in enumerate(arg)], np.int32)
            tokens = np.asarray([t for _, t in arg], np.int32)
            want = length > 0
            a, rows, hits, ok = _admit(a, i32(tokens), i32(length), jnp.asarray(want))
            rows, hits, ok = np.asarray(rows), np.asarray(hits), np.asarray(ok)
            # Model: hits acquired first, then the rest allocated; rejected rows give hits back.
            want_hits = [m.lookup(tokens[i], (length[i] - 1) // PS) if want[i] else [] for i in range(ROWS)]
            for h in want_hits:
                for p in h:
                    m.rc[p] += 1
            need = [-(-int(length[i]) // PS) - len(want_hits[i]) if want[i] else 0 for i in range(ROWS)]
            fresh, granted = m.allocate(need)
            want_ok = want & np.asarray(granted)
            want_rows = np.zeros((ROWS, PPS), np.int32)
            for i in range(ROWS):
                if want_ok[i]:
                    r = want_hits[i] + fresh[i]
                    want_rows[i, : len(r)] = r
                else:
                    for p in want_hits[i]:
                        m.rc[p] -= 1
            m.register_full(want_rows.tolist(), length.tolist(), want_ok.tolist(), tokens.tolist())
            np.testing.assert_array_equal(ok, want_ok)
            np.testing.assert_array_equal(hits, [len(h) if k else 0 for h, k in zip(want_hits, want_ok)])
            np.testing.assert_array_equal(rows, want_rows)
            table = np.where(ok[:, None], rows, table)
        else:
            mask = np.asarray(arg) & table.any(1)
            a = release(a, table, mask)
            m.release(table.tolist(), mask.tolist())
            table[mask] = 0

        rc = arr(a.refcount)
        held = table[table != 0]
        np.testing.assert_array_equal(rc, m.rc)
        assert rc.min() >= 0 and rc[NULL_PAGE] == 1
        assert rc.sum() == held.size + 1, "sum of refcounts != page references held by rows + null page"
        np.testing.assert_array_equal(arr(a.cached), m.cached)
        np.testing.assert_array_equal(arr(a.gen), m.gen)
        assert int(a.clock) == m.clock
        np.testing.assert_array_equal(arr(_order(a)), m.order())
        cached = np.nonzero(m.cached)[0]
        np.testing.assert_array_equal(arr(a.parent)[cached], [m.parent[p] for p in cached])
        np.testing.assert_array_equal(arr(a.parent_gen)[cached], [m.pgen[p] for p in cached])
        np.testing.assert_array_equal(arr(a.tokens)[cached].reshape(-1, PS), [m.toks[p] for p in cached] or np.zeros((0, PS)))
        # Live cache entries hash as their chain says.
        for p in cached:
            par = m.parent[p]
            if par == 0 or (m.cached[par] and m.pgen[p] == m.gen[par]):
                assert int(a.hash[p]) == H(int(a.hash[par]), list(m.toks[p]))
