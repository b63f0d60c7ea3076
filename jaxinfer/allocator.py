"""Page allocator with automatic prefix caching: reference counts, a hash-chain cache of full
pages, LRU eviction. All of it is arrays in `PageAllocator` and pure functions over it, so it
runs inside jit (the engine's steps call it; the host never mirrors it).

Pages
-----
Page 0 is the *null page*: its reference count is pinned at 1, it is never handed out, and
unused page-table entries point at it. A page is *in use* while its reference count (the number
of slots whose page table holds it) is > 0, and *free* at 0. A free page may still be *cached*:
it holds the K/V of a full page of some earlier sequence and can be handed back to a new
sequence with the same prefix instead of being recomputed.

The cache key (hash chain) and why a collision cannot give a wrong hit
----------------------------------------------------------------------
A page is registered in the cache when it becomes full (all `page_size` positions written),
with
    hash[p]       = H(hash[parent], tokens of p)   (hash[null page] = ROOT_HASH)
    parent[p]     = the page holding the previous `page_size` tokens of that sequence (0 first)
    parent_gen[p] = gen[parent] at registration; gen[q] counts how often q was (re)allocated
    tokens[p]     = the page's tokens
H is 32-bit (murmur3 finaliser over position-mixed tokens). Lookup walks a prompt page by page:
page j of the prompt matches cached page c only if
    hash[c] == H(prompt hash through page j-1, prompt page j)   (fast filter)
    parent[c] == the page matched for page j-1 and parent_gen[c] == gen[that page]
    tokens[c] == the prompt's page j tokens exactly                 (verification)
By induction the matched chain holds exactly the prompt's tokens at the same positions: the
parent link pins everything before page j to the already-verified match (the generation check
rules out a parent page that was reallocated and refilled since), and page j's own tokens are
compared. So the hash only narrows the candidates; a 32-bit collision can at worst make the
walk pick a candidate that then fails verification, i.e. a cache miss, never a wrong hit.

LRU eviction
------------
Allocation takes never-cached free pages first (lowest id first), then cached free pages in
eviction order: released earliest first, and among pages released together the deepest
(latest position in its sequence) first, so a prefix outlives its suffixes (vLLM's order).
Taking a cached page drops it from the cache (its generation advances, orphaning any
registered children: they can no longer match and age out the same way).

Allocation hands pages out in request order with a cumulative sum instead of a loop: request i
takes entries [start_i, start_i + count_i) of the eviction-ordered free list. A request is
granted only if it and every request before it fit (grants form a prefix), so the result is
deterministic and exactly testable.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, UInt32

NULL_PAGE = 0
ROOT_HASH = 0x811C9DC5  # hash of the empty prefix (the null page's)


@flax.struct.dataclass
class PageAllocator:
    refcount: Int[Array, "pages"]  # slots holding the page; 0 = free; the null page is pinned at 1
    cached: Bool[Array, "pages"]  # holds a registered full page (in use or free)
    hash: UInt32[Array, "pages"]  # chain hash through this page (valid where cached)
    parent: Int[Array, "pages"]  # page of the previous page_size tokens (null page for the first)
    parent_gen: Int[Array, "pages"]  # gen[parent] when registered
    gen: Int[Array, "pages"]  # times the page was handed out by `allocate`
    tokens: Int[Array, "pages page_size"]  # token at each position (written with the K/V)
    evict_key: Int[Array, "pages"]  # LRU order of free cached pages (smaller goes first)
    clock: Int[Array, ""]  # release counter (evict_key = clock * pages_per_seq + depth rank)

    @property
    def num_pages(self) -> int:
        return self.refcount.shape[0]

    @property
    def page_size(self) -> int:
        return self.tokens.shape[1]


def init_arrays(num_pages: int, page_size: int) -> dict[str, np.ndarray]:
    """The fields of an empty allocator as NumPy arrays (distinct buffers: the steps donate)."""
    z = lambda: np.zeros((num_pages,), np.int32)  # noqa: E731
    refcount, hashes = z(), np.zeros((num_pages,), np.uint32)
    refcount[NULL_PAGE], hashes[NULL_PAGE] = 1, ROOT_HASH
    return dict(refcount=refcount, cached=np.zeros((num_pages,), bool), hash=hashes, parent=z(), parent_gen=z(),
                gen=z(), tokens=np.zeros((num_pages, page_size), np.int32), evict_key=z(),
                clock=np.zeros((), np.int32))


def init(num_pages: int, page_size: int) -> PageAllocator:
    """An empty allocator: every page free but the null page."""
    return PageAllocator(**jax.device_put(init_arrays(num_pages, page_size)))


def _fmix(x: UInt32[Array, "*b"]) -> UInt32[Array, "*b"]:
    """murmur3's 32-bit finaliser (a bijection with good avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def chain_hash(parent_hash: UInt32[Array, "n"], tokens: Int[Array, "n page_size"]) -> UInt32[Array, "n"]:
    """H(parent hash, page tokens): each token mixed with its position, summed (mod 2^32), then
    mixed with the parent's hash. Order-sensitive through the position mixing."""
    pos = _fmix(jnp.arange(1, tokens.shape[-1] + 1, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1))
    per = _fmix(tokens.astype(jnp.uint32) * jnp.uint32(0xCC9E2D51) + pos)
    return _fmix(_fmix(parent_hash ^ jnp.uint32(0x27D4EB2F)) + jnp.sum(per, axis=-1, dtype=jnp.uint32))


def num_free(a: PageAllocator) -> Int[Array, ""]:
    """Pages an allocation can take now (free ones, cached or not)."""
    return jnp.sum(a.refcount == 0).astype(jnp.int32)


def eviction_order(a: PageAllocator) -> Int[Array, "pages"]:
    """Page ids in the order `allocate` takes them: never-cached free pages by id, then cached
    free pages by evict_key, then pages in use (never taken)."""
    ids = jnp.arange(a.num_pages, dtype=jnp.int32)
    klass = jnp.where(a.refcount > 0, 2, jnp.where(a.cached, 1, 0))
    return jnp.lexsort((ids, jnp.where(klass == 1, a.evict_key, 0), klass)).astype(jnp.int32)


def allocate(a: PageAllocator, counts: Int[Array, "n"], max_per: int) -> tuple[PageAllocator, Int[Array, "n max_per"], Bool[Array, "n"]]:
    """Give request i `counts[i]` (<= max_per) fresh pages (reference count 1, not cached).

    Returns (allocator, pages, granted): pages[i, j] is the j-th page of request i, or the null
    page for j >= counts[i] and for requests not granted.
    """
    order = eviction_order(a)
    end = jnp.cumsum(counts)
    start = end - counts
    granted = end <= num_free(a)
    j = jnp.arange(max_per)
    take = granted[:, None] & (j[None, :] < counts[:, None])
    idx = jnp.clip(start[:, None] + j[None, :], 0, a.num_pages - 1)
    pages = jnp.where(take, order[idx], NULL_PAGE).astype(jnp.int32)
    # Taken pages: rows not taken scatter to the null page and are masked out by `where`.
    flat, t = pages.ravel(), take.ravel()
    is_taken = jnp.zeros((a.num_pages,), bool).at[flat].max(t)
    a = a.replace(
        refcount=a.refcount + is_taken,
        cached=a.cached & ~is_taken,
        gen=a.gen + is_taken,
    )
    return a, pages, granted


def acquire(a: PageAllocator, pages: Int[Array, "n k"], mask: Bool[Array, "n k"]) -> PageAllocator:
    """One more reference to each masked non-null page (sharing a cached or in-use page)."""
    add = (mask & (pages != NULL_PAGE)).astype(jnp.int32)
    return a.replace(refcount=a.refcount.at[pages.ravel()].add(add.ravel()))


def release(a: PageAllocator, page_rows: Int[Array, "n pages_per_seq"], mask: Bool[Array, "n"]) -> PageAllocator:
    """Drop one reference to every non-null page in the masked rows. Pages that become free get
    this release's LRU stamp: clock * pages_per_seq + (pages_per_seq - 1 - position in row), so
    deeper pages of one release are evicted before shallower ones, and earlier releases first.
    (int32: fine for ~2^31 / pages_per_seq release calls.)"""
    n, pps = page_rows.shape
    owned = mask[:, None] & (page_rows != NULL_PAGE)
    flat = page_rows.ravel()
    refcount = a.refcount.at[flat].add(-owned.ravel().astype(jnp.int32))
    now_free = jnp.zeros((a.num_pages,), bool).at[flat].max(owned.ravel()) & (refcount == 0)
    depth_rank = jnp.broadcast_to(pps - 1 - jnp.arange(pps, dtype=jnp.int32), (n, pps))
    stamp = jnp.zeros((a.num_pages,), jnp.int32).at[flat].max(jnp.where(owned, depth_rank, 0).ravel())
    evict_key = jnp.where(now_free, a.clock * pps + stamp, a.evict_key)
    return a.replace(refcount=refcount, evict_key=evict_key, clock=a.clock + jnp.any(owned))


def write_tokens(a: PageAllocator, pages: Int[Array, "*b"], offsets: Int[Array, "*b"], tokens: Int[Array, "*b"]) -> PageAllocator:
    """Record the tokens whose K/V were written (writes to the null page are harmless sinks)."""
    return a.replace(tokens=a.tokens.at[pages, offsets].set(tokens.astype(jnp.int32)))


def register(a: PageAllocator, page: Int[Array, "n"], parent: Int[Array, "n"], mask: Bool[Array, "n"]) -> PageAllocator:
    """Register full pages (their tokens already written) as cache entries under `parent`."""
    h = chain_hash(a.hash[parent], a.tokens[page])
    tgt = jnp.where(mask & (page != NULL_PAGE), page, a.num_pages)  # out of bounds: dropped
    return a.replace(
        cached=a.cached.at[tgt].set(True, mode="drop"),
        hash=a.hash.at[tgt].set(h, mode="drop"),
        parent=a.parent.at[tgt].set(parent, mode="drop"),
        parent_gen=a.parent_gen.at[tgt].set(a.gen[parent], mode="drop"),
    )


def register_full_pages(a: PageAllocator, page_table: Int[Array, "n pages_per_seq"], length: Int[Array, "n"], mask: Bool[Array, "n"]) -> PageAllocator:
    """Register every full, not yet cached page of the masked rows (positions < length written).
    Walks the row's pages in order, because page j's hash needs page j-1's."""
    ps = a.page_size

    def body(j, a):
        page = page_table[:, j]
        parent = jnp.where(j > 0, page_table[:, jnp.maximum(j - 1, 0)], NULL_PAGE)
        full = mask & ((j + 1) * ps <= length) & ~a.cached[page] & (page != NULL_PAGE)
        return register(a, page, parent, full)

    # A loop, not an unrolled Python for: the program stays small for long page tables.
    return jax.lax.fori_loop(0, page_table.shape[1], body, a)


def lookup(a: PageAllocator, tokens: Int[Array, "n seq"], max_pages: Int[Array, "n"]) -> tuple[Int[Array, "n hit_pages"], Int[Array, "n"]]:
    """Longest cached prefix of each row, in whole pages, at most max_pages[i] pages.

    Returns (pages [n, seq // page_size], hits [n]): pages[i, j] for j < hits[i] is the cached
    page holding the row's tokens [j*ps, (j+1)*ps) (null beyond). See the module docstring for
    why a match is exact. Nothing is acquired here.
    """
    n, t = tokens.shape
    ps = a.page_size
    jmax = t // ps
    if jmax == 0:
        return jnp.zeros((n, 0), jnp.int32), jnp.zeros((n,), jnp.int32)
    chunks = tokens[:, : jmax * ps].reshape(n, jmax, ps).transpose(1, 0, 2)  # [jmax, n, ps]

    def body(carry, xs):
        prev, prev_gen, h, alive = carry
        j, toks = xs
        h = chain_hash(h, toks)
        cand = (a.cached[None, :] & (a.hash[None, :] == h[:, None]) & (a.parent[None, :] == prev[:, None])
                & (a.parent_gen[None, :] == prev_gen[:, None]))
        c = jnp.argmax(cand, axis=1).astype(jnp.int32)
        ok = alive & (j < max_pages) & jnp.any(cand, axis=1) & jnp.all(a.tokens[c] == toks, axis=-1)
        page = jnp.where(ok, c, NULL_PAGE)
        carry = (jnp.where(ok, c, prev), jnp.where(ok, a.gen[c], prev_gen), h, ok)
        return carry, page

    init_carry = (jnp.full((n,), NULL_PAGE, jnp.int32), jnp.full((n,), a.gen[NULL_PAGE], jnp.int32),
                  jnp.full((n,), ROOT_HASH, jnp.uint32), jnp.ones((n,), bool))
    _, pages = jax.lax.scan(body, init_carry, (jnp.arange(jmax), chunks))
    pages = pages.T
    return pages, jnp.sum(pages != NULL_PAGE, axis=1).astype(jnp.int32)
