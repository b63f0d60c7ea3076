"""Prefill attention: the plain-jnp reference (CPU path of the runtime, oracle for the GPU kernel).

Layout is that of `jax.nn.dot_product_attention`: q `[batch, seq, q_heads, head_dim]`,
k/v `[batch, seq, kv_heads, head_dim]`, query position i and key position j are both the
token's index in `seq`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxinfer.dims import KeysValues, Lengths, Queries

_HIGHEST = jax.lax.Precision.HIGHEST


def flash_attention_reference(
    q: Queries,
    k: KeysValues,
    v: KeysValues,
    *,
    lengths: Lengths | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> Queries:
    """Masked multi-head attention with GQA, padding, causal and sliding-window masks.

    Key j is visible to query i iff
      * j < lengths[b]                       (keys past a row's length are padding),
      * j <= i            when `causal`,
      * i - j < W         when `sliding_window=W` (Mistral / HF convention: a query sees
                          itself and the W-1 previous tokens; with `causal=False` the window
                          only limits how far back a query looks, never forward).
    Query rows at i >= lengths[b] return exactly 0. `lengths=None` means every row is full.

    Query head h reads KV head h // (q_heads // kv_heads). Scores and softmax are float32
    (HIGHEST matmul precision, so GPU TF32 does not blur the oracle); the result has q's dtype.
    Padded positions may hold garbage, NaN included: they are zeroed with `jnp.where` before
    any arithmetic, and fully masked rows give 0 rather than NaN. Keys hidden only by the
    causal or window mask are real tokens and are assumed finite.
    """
    if lengths is not None:
        _require_int("lengths", lengths.dtype)
    _check_shapes(q.shape, k.shape, v.shape, None if lengths is None else lengths.shape)
    _check_window(sliding_window)
    if lengths is None:
        lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return _attention(q, k, v, lengths, causal, sliding_window,
                      q.shape[-1] ** -0.5 if scale is None else scale)


def _attention(
    q: Queries,
    k: KeysValues,
    v: KeysValues,
    lengths: Lengths,
    causal: bool,
    sliding_window: int | None,
    scale: float,
) -> Queries:
    # Design: build one [batch, q_pos, k_pos] visibility mask, zero every padded q/k/v entry
    # so NaN garbage never meets a multiply (0 * NaN = NaN), and take a max-subtracted softmax
    # whose probabilities are selected with `where` (not multiplied by a mask) and whose
    # empty rows divide by 1. GQA groups query heads against their KV head by reshaping q,
    # so K/V are never repeated.
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    pos = jnp.arange(seq)
    in_row = pos[None, :] < lengths[:, None]  # [batch, seq]: real (non-padding) tokens
    mask = jnp.broadcast_to(in_row[:, None, :], (batch, seq, seq))
    if causal:
        mask = mask & (pos[:, None] >= pos[None, :])
    if sliding_window is not None:
        mask = mask & (pos[:, None] - pos[None, :] < sliding_window)

    keep = in_row[:, :, None, None]
    q32, k32, v32 = (jnp.where(keep, x.astype(jnp.float32), 0.0) for x in (q, k, v))
    qg = q32.reshape(batch, seq, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k32, precision=_HIGHEST) * scale
    probs = masked_softmax(scores, mask[:, None, None])
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v32, precision=_HIGHEST)
    out = out.reshape(batch, seq, q_heads, head_dim)
    return jnp.where(keep, out, 0.0).astype(q.dtype)


def masked_softmax(
    scores: Float[Array, "*lead"], mask: Bool[Array, "*#lead"]
) -> Float[Array, "*lead"]:
    """Softmax over visible keys: exactly 0 where masked, all-zero rows where nothing is visible.

    Shared with the paged reference so both oracles mask identically.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty row: max is -inf
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(denom > 0, denom, 1.0)


def _check_shapes(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    lengths_shape: tuple[int, ...] | None,
) -> None:
    """ValueErrors for malformed prefill-attention inputs (works without runtime type checks)."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be rank 4 [batch, seq, heads, head_dim], got shape {shape}")
    if k_shape != v_shape:
        raise ValueError(f"k and v must have the same shape, got {k_shape} and {v_shape}")
    if q_shape[:2] != k_shape[:2]:
        raise ValueError(f"q and k must agree on [batch, seq], got {q_shape[:2]} and {k_shape[:2]}")
    _check_heads(q_shape[-2], k_shape[-2], q_shape[-1], k_shape[-1])
    if lengths_shape is not None and lengths_shape != q_shape[:1]:
        raise ValueError(f"lengths must have shape [batch] = {q_shape[:1]}, got {lengths_shape}")


def _check_heads(q_heads: int, kv_heads: int, q_head_dim: int, kv_head_dim: int) -> None:
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q_head_dim != kv_head_dim:
        raise ValueError(f"head_dim mismatch: q has {q_head_dim}, k/v have {kv_head_dim}")


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")


def _require_int(name: str, dtype: jnp.dtype) -> None:
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")
