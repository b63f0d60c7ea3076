"""Decode attention over a paged KV pool: the plain-jnp reference (CPU path, GPU-kernel oracle)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_attention import (
    _check_heads,
    _check_window,
    _require_int,
    masked_softmax,
)

from jaxinfer.dims import DecodeQueries, LayerPages, PageTable, SlotInts

_HIGHEST = jax.lax.Precision.HIGHEST


def paged_attention_reference(
    q: DecodeQueries,
    k_pages: LayerPages,
    v_pages: LayerPages,
    page_table: PageTable,
    lengths: SlotInts,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> DecodeQueries:
    """Attention of one query token per slot against that slot's paged keys/values.

    Layout:
      q           [slots, q_heads, head_dim]                 the current token of each slot.
      k_pages,
      v_pages     [pages, page_size, kv_heads, head_dim]     one layer of the KV pool; page 0
                                                             is conventionally a "null" page.
      page_table  int [slots, pages_per_seq]                 entry p is the page holding the
                                                             slot's tokens p*page_size ..
                                                             (p+1)*page_size - 1.
      lengths     int [slots]                                valid tokens per slot, INCLUDING
                                                             the current one (its K/V already
                                                             written); the query sits at
                                                             position lengths - 1.
    Token t of a slot is visible iff t < lengths[s] and, with `sliding_window=W`,
    (lengths[s] - 1) - t < W (the query sees itself and the W-1 previous tokens). Slots with
    length 0 return 0. Table entries past a slot's length may point anywhere (out-of-range ids
    are clamped), and invisible positions may hold NaN: they are zeroed with `jnp.where`
    before any arithmetic. lengths must not exceed pages_per_seq * page_size.

    Query head h reads KV head h // (q_heads // kv_heads). Scores and softmax are float32 at
    HIGHEST matmul precision; the result has q's dtype.
    """
    _require_int("page_table", page_table.dtype)
    _require_int("lengths", lengths.dtype)
    _check_shapes(q.shape, k_pages.shape, v_pages.shape, page_table.shape, lengths.shape)
    _check_window(sliding_window)
    return _paged_attention(q, k_pages, v_pages, page_table, lengths, sliding_window,
                            q.shape[-1] ** -0.5 if scale is None else scale)


def _paged_attention(
    q: DecodeQueries,
    k_pages: LayerPages,
    v_pages: LayerPages,
    page_table: PageTable,
    lengths: SlotInts,
    sliding_window: int | None,
    scale: float,
) -> DecodeQueries:
    # Design: gather every table entry's page into a dense [slots, tokens, kv_heads, head_dim]
    # view (simple, O(pages_per_seq * page_size) per slot, fine for an oracle), then mask by
    # token position. With a single query per slot the mask is per (slot, token), so zeroing
    # masked K/V rows makes NaN-poisoned pages harmless everywhere, not just in the softmax.
    slots, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    tokens = page_table.shape[1] * page_size
    pos = jnp.arange(tokens)
    visible = pos[None, :] < lengths[:, None]  # [slots, tokens]
    if sliding_window is not None:
        visible = visible & ((lengths[:, None] - 1) - pos[None, :] < sliding_window)

    k32, v32 = (jnp.take(x, page_table, axis=0, mode="clip") for x in (k_pages, v_pages))
    keep = visible[:, :, None, None]
    k32, v32 = (
        jnp.where(keep, x.reshape(slots, tokens, kv_heads, head_dim).astype(jnp.float32), 0.0)
        for x in (k32, v32)
    )
    qg = q.astype(jnp.float32).reshape(slots, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("nkgd,ntkd->nkgt", qg, k32, precision=_HIGHEST) * scale
    probs = masked_softmax(scores, visible[:, None, None, :])
    out = jnp.einsum("nkgt,ntkd->nkgd", probs, v32, precision=_HIGHEST)
    return out.reshape(slots, q_heads, head_dim).astype(q.dtype)


def _check_shapes(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    table_shape: tuple[int, ...],
    lengths_shape: tuple[int, ...],
) -> None:
    """ValueErrors for malformed paged-attention inputs (works without runtime type checks)."""
    if len(q_shape) != 3:
        raise ValueError(f"q must be rank 3 [slots, q_heads, head_dim], got shape {q_shape}")
    for name, shape in (("k_pages", k_shape), ("v_pages", v_shape)):
        if len(shape) != 4:
            raise ValueError(
                f"{name} must be rank 4 [pages, page_size, kv_heads, head_dim], got shape {shape}")
    if k_shape != v_shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got {k_shape} and {v_shape}")
    _check_heads(q_shape[1], k_shape[2], q_shape[2], k_shape[3])
    if len(table_shape) != 2 or table_shape[0] != q_shape[0]:
        raise ValueError(
            f"page_table must have shape [slots={q_shape[0]}, pages_per_seq], got {table_shape}")
    if lengths_shape != q_shape[:1]:
        raise ValueError(f"lengths must have shape [slots] = {q_shape[:1]}, got {lengths_shape}")
