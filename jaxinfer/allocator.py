"""Page allocator: vectorised allocation and release over reference counts, inside jit.

A page is free when its reference count is 0 (the null page 0 is pinned at 1). Allocation
hands out the lowest-numbered free pages, in request order, with a cumulative sum instead of a
loop: request i takes free pages [start_i, start_i + count_i) of the sorted free list, where
start_i is the sum of the counts before it. A request is granted only if every request before
it fits too (grants form a prefix), so the result is deterministic and exactly testable.
Reference counts (not a free bit) let prefix sharing map one page into several slots later.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxinfer.state import NULL_PAGE


def num_free(refcount: Int[Array, "pages"]) -> Int[Array, ""]:
    return jnp.sum(refcount == 0).astype(jnp.int32)


def allocate(
    refcount: Int[Array, "pages"], counts: Int[Array, "n"], max_per: int
) -> tuple[Int[Array, "n max_per"], Bool[Array, "n"], Int[Array, "pages"]]:
    """Give request i `counts[i]` (<= max_per) fresh pages.

    Returns (pages, granted, new_refcount): pages[i, j] is the j-th page of request i, or the
    null page for j >= counts[i] and for requests not granted.
    """
    num_pages = refcount.shape[0]
    free_ids = jnp.nonzero(refcount == 0, size=num_pages, fill_value=NULL_PAGE)[0]
    end = jnp.cumsum(counts)
    start = end - counts
    granted = end <= num_free(refcount)
    j = jnp.arange(max_per)
    take = granted[:, None] & (j[None, :] < counts[:, None])
    idx = jnp.clip(start[:, None] + j[None, :], 0, num_pages - 1)
    pages = jnp.where(take, free_ids[idx], NULL_PAGE).astype(jnp.int32)
    refcount = refcount.at[pages.ravel()].add(take.ravel().astype(jnp.int32))
    return pages, granted, refcount


def release(
    refcount: Int[Array, "pages"], page_rows: Int[Array, "n pages_per_seq"], mask: Bool[Array, "n"]
) -> Int[Array, "pages"]:
    """Drop one reference to every non-null page in the masked rows."""
    owned = mask[:, None] & (page_rows != NULL_PAGE)
    return refcount.at[page_rows.ravel()].add(-owned.ravel().astype(jnp.int32))
