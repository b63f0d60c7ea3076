"""Per-channel K smoothing for int8 KV pools: the calibration of `EngineState.k_channel`.

Why. Int8 K/V pages keep one scale per (token, KV head) (pallas_kernels/kv_quant.py), set by
the token's largest channel. Keys have outlier channels: in stories260K one channel of a head
is 2-6x the median one's RMS (after RoPE), so the small channels get a few of the 255 levels
and q.k moves by a sizeable fraction of a logit. Values do not (their channels are within
1.1-1.7x). So an int8 pool stores k / c and attends with q * c, c a per-(layer, KV head,
channel) factor (attention.smooth_qk): the product is unchanged, every channel of k / c has
about the same RMS, and the per-token scale serves all of them (SmoothQuant's migration, applied
between q and k; KIVI's observation that K wants per-channel treatment).

What c is. c = the RMS of each post-RoPE K channel over a calibration forward: 256 tokens at
positions spread evenly over [0, max_seq_len) (RoPE moves energy between the two channels of a
pair as the position grows, so the positions a pool will hold are sampled, not just the first
256). Default tokens: seeded random ids (data-free and deterministic: the outlier channels come
from the weights); `Engine(kv_calibration=token_ids)` calibrates on the caller's text instead,
at positions 0..n-1. c is computed once, when the Engine (and its state) is built, and never
changes afterwards: pages written under one c are read with the same c, through prefix caching,
forks, preemption, snapshots and `update_params` alike (c only conditions the rounding, it is
never part of the math, so stale c after a weight update costs accuracy, not correctness).

Measured on stories260K against float KV (tests/jaxinfer/test_kv_quant.py, default random-token
c): greedy continuations of 8 story prompts x 48 tokens share 0.61 -> 0.86 of their tokens (3 -> 6
of 8 identical); teacher-forced top-1 agreement over 500 tokens 0.962 -> 0.980. See
docs/performance.md ("Quantized KV").
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxinfer.attention import prefill_attention
from jaxinfer.model import Model, decoder

CALIBRATION_TOKENS = 256
_FLOOR = 1e-3  # c >= 1e-3 * the head's largest c: a dead channel is not blown up by 1 / c


def calibration_inputs(vocab_size: int, max_seq_len: int, tokens: Sequence | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [1, n], positions [1, n]) int32 of the calibration forward: the caller's `tokens`
    at 0..n-1, or CALIBRATION_TOKENS seeded random ids at positions spread over [0, max_seq_len)."""
    if tokens is None:
        n = min(CALIBRATION_TOKENS, max_seq_len)
        ids = np.random.default_rng(seed).integers(0, vocab_size, n)
        pos = np.round(np.linspace(0, max_seq_len - 1, n)) if n > 1 else np.zeros(1)
        return ids.astype(np.int32)[None], pos.astype(np.int32)[None]
    ids = list(tokens)
    if not ids or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
        raise ValueError("kv_calibration must be a non-empty sequence of token ids (ints)")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"kv_calibration holds token ids outside [0, {vocab_size}): {bad[:5]}")
    if len(ids) > max_seq_len:
        raise ValueError(f"kv_calibration has {len(ids)} tokens; at most max_seq_len={max_seq_len}")
    return np.asarray(ids, np.int32)[None], np.arange(len(ids), dtype=np.int32)[None]


@jax.jit
def _channel_rms(model: Model, tokens: Int[Array, "1 seq"], positions: Int[Array, "1 seq"]) -> Array:
    cfg = model.config

    def attend(i, q, k, v, sumsq, spec):  # causal attention, and the sum of k^2 per channel
        sumsq = sumsq.at[i].add(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=(0, 1)))
        return prefill_attention(q, k, v, lengths=None, **spec.kwargs()), sumsq

    zeros = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    _, sumsq = decoder(model, tokens, positions, attend, zeros)
    return jnp.sqrt(sumsq / tokens.shape[1])


def k_channel_scale(model: Model, max_seq_len: int, tokens: Sequence | None = None
                    ) -> Float[Array, "layers kv_heads head_dim"]:
    """c for an int8 pool of `model` (see the module docstring); on a mesh, split over KV heads
    like the pool. Non-finite or all-zero heads get c = 1 (no smoothing)."""
    cfg = model.config
    ids, pos = calibration_inputs(cfg.vocab_size, max_seq_len, tokens)
    rms = _channel_rms(model, jnp.asarray(ids), jnp.asarray(pos))
    top = jnp.max(rms, axis=-1, keepdims=True)
    ok = jnp.all(jnp.isfinite(rms), axis=-1, keepdims=True) & (top > 0)
    return jnp.where(ok, jnp.maximum(rms, _FLOOR * top), 1.0).astype(jnp.float32)
