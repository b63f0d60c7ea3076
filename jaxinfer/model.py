"""The Llama-family decoder as pure functions over a parameter PyTree.

Parameter layout (`Model.params`), layers stacked on a leading axis so one `lax.scan` body
serves every layer (compile time does not grow with depth). Linear weights are stored
[in, out] (transposed from HF's [out, in]) so a layer is `x @ w`:

    embed        [vocab, hidden]
    layers/
      attn_norm  [layers, hidden]
      wq         [layers, hidden, q_heads*head_dim]     bq [layers, q_heads*head_dim]   (qkv_bias)
      wk, wv     [layers, hidden, kv_heads*head_dim]    bk, bv [layers, kv_heads*head_dim]
      wo         [layers, q_heads*head_dim, hidden]     bo [layers, hidden]              (o_bias)
      mlp_norm   [layers, hidden]
      w_gate, w_up [layers, hidden, ffn]                b_gate, b_up [layers, ffn]      (mlp_bias)
      w_down     [layers, ffn, hidden]                  b_down [layers, hidden]          (mlp_bias)
    final_norm   [hidden]
    lm_head      [hidden, vocab]                        (absent when tie_word_embeddings)

One layer body (`layer`) serves `forward` (no cache), the engine's prefill and decode steps and
GPTQ calibration; they differ only in the `attend` callback, which does attention and any
KV-cache bookkeeping.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxinfer.attention import prefill_attention
from jaxinfer.config import ModelConfig

Params = dict[str, Any]


@flax.struct.dataclass
class Model:
    """A config (static: part of the jit cache key) and its parameters (a PyTree of arrays).

    `params["layers"]` is either one dict of arrays stacked on a leading layer axis (the stored
    form: `decoder` runs one `lax.scan`, so compile time does not grow with depth) or a tuple of
    per-layer dicts (`unstacked()`: `decoder` runs a Python loop; on XLA:CPU this is what lets
    every matmul read its weight in place: a scan, or a static slice of a stacked weight,
    copies it first, which costs as much as the matmul at decode sizes).

    `compute_dtype` (static): the dtype of activations and of the KV cache; None = the weights'.
    Matmuls take their inputs in the weight's dtype and accumulate in float32, so bfloat16
    weights with float32 compute run XLA:CPU's fastest dot (bf16 in, f32 out) while norms,
    residuals and attention stay in float32.
    """

    config: ModelConfig = flax.struct.field(pytree_node=False)
    params: Params
    compute_dtype: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def weight_dtype(self):
        return self.params["embed"].dtype

    @property
    def dtype(self):
        """The compute dtype: activations and KV cache."""
        return jnp.dtype(self.compute_dtype) if self.compute_dtype is not None else self.weight_dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def unstacked(self) -> "Model":
        """The same model with params["layers"] as a tuple of per-layer dicts (each its own
        buffers); see the class docstring. Idempotent."""
        layers = self.params["layers"]
        if isinstance(layers, tuple):
            return self
        return self.replace(params={**self.params, "layers": _split_layers(layers, self.config.num_layers)})

    def stacked(self) -> "Model":
        """The inverse of `unstacked` (the stored form). Idempotent."""
        layers = self.params["layers"]
        if not isinstance(layers, tuple):
            return self
        return self.replace(params={**self.params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)})


def _split_layers(layers: Params, n: int) -> tuple[Params, ...]:
    # Through the host (NumPy views; on CPU np.asarray of a device array is free): slicing on
    # the device would compile a program per weight shape.
    leaves, treedef = jax.tree.flatten(layers)
    host = [np.asarray(a) for a in leaves]
    return tuple(jax.tree.unflatten(treedef, jax.device_put([np.ascontiguousarray(h[i]) for h in host]))
                 for i in range(n))


def rms_norm(x: Float[Array, "*b hidden"], w: Float[Array, "hidden"], eps: float) -> Float[Array, "*b hidden"]:
    # As HF: normalise in float32, cast back, then scale (the order matters in bf16).
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: Int[Array, "*b"]) -> tuple[Array, Array]:
    """cos and sin [*b, head_dim] for positions, in float32 as HF computes them."""
    inv_freq = jnp.asarray(config.rope.inv_freq(config.head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "*b heads head_dim"], cos: Array, sin: Array) -> Float[Array, "*b heads head_dim"]:
    # HF's rotate_half convention (checkpoints store q/k rows permuted for it).
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[..., None, :] + rotated.astype(jnp.float32) * sin[..., None, :]
    return out.astype(x.dtype)


def linear(x: Array, w: Any, b: Array | None = None) -> Array:
    # A quantized weight (any PyTree with a `matmul(x) -> float32` method, see jaxinfer.quant)
    # multiplies itself; a dense one takes x in its own dtype (never converting the weight) and
    # accumulates in float32.
    if hasattr(w, "matmul"):
        y = w.matmul(x)
    else:
        y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


# attend(layer_index, q, k, v, cache) -> (out, cache): attention for one layer plus whatever the
# caller keeps across layers (the KV pool for the engine; nothing for the plain forward).
AttendFn = Callable[[Array, Array, Array, Array, Any], tuple[Array, Any]]


def layer(
    config: ModelConfig,
    lp: Params,
    x: Float[Array, "batch seq hidden"],
    rope: tuple[Array, Array],
    attend: AttendFn,
    cache: Any,
    i: Int[Array, ""] | int,
) -> tuple[Float[Array, "batch seq hidden"], Any, dict[str, Array]]:
    """One decoder layer (the only layer body: `decoder` scans it, GPTQ calibration calls it).
    `lp` is one layer's slice of params["layers"]. Returns the new residual stream, the cache
    and the inputs of the layer's linear weights by the first weight that reads each (wq for
    q/k/v, wo, w_gate for gate/up, w_down), which GPTQ needs and everyone else drops."""
    b, t = x.shape[:2]
    cos, sin = rope
    h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q = linear(h, lp["wq"], lp.get("bq")).reshape(b, t, config.num_heads, config.head_dim)
    k = linear(h, lp["wk"], lp.get("bk")).reshape(b, t, config.num_kv_heads, config.head_dim)
    v = linear(h, lp["wv"], lp.get("bv")).reshape(b, t, config.num_kv_heads, config.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, cache = attend(i, q, k, v, cache)
    o = o.reshape(b, t, config.q_size)
    x = x + linear(o, lp["wo"], lp.get("bo"))
    h2 = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    act = jax.nn.silu(linear(h2, lp["w_gate"], lp.get("b_gate"))) * linear(h2, lp["w_up"], lp.get("b_up"))
    x = x + linear(act, lp["w_down"], lp.get("b_down"))
    return x, cache, {"wq": h, "wo": o, "w_gate": h2, "w_down": act}


def decoder(
    model: Model,
    tokens: Int[Array, "batch seq"],
    positions: Int[Array, "batch seq"],
    attend: AttendFn,
    cache: Any,
) -> tuple[Float[Array, "batch seq hidden"], Any]:
    """Embeds tokens, runs every layer (a lax.scan over stacked weights, a Python loop over
    unstacked ones) and the final norm. `attend` gets the layer index: a traced int32 in the
    scan, a Python int in the loop."""
    cfg, p = model.config, model.params
    x = p["embed"][tokens].astype(model.dtype)
    rope = rope_tables(cfg, positions)
    if isinstance(p["layers"], tuple):  # unstacked: the layer index is a Python int
        for i, lp in enumerate(p["layers"]):
            x, cache, _ = layer(cfg, lp, x, rope, attend, cache, i)
    else:
        def body(carry, lp):
            x, cache, i = carry
            x, cache, _ = layer(cfg, lp, x, rope, attend, cache, i)
            return (x, cache, i + 1), None

        (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), p["layers"])
    return rms_norm(x, p["final_norm"], cfg.rms_norm_eps), cache


def lm_head(model: Model, h: Float[Array, "*b hidden"]) -> Float[Array, "*b vocab"]:
    p = model.params
    w = p["embed"].T if model.config.tie_word_embeddings else p["lm_head"]
    return jnp.einsum("...i,io->...o", h.astype(w.dtype), w, preferred_element_type=jnp.float32)


def causal_attend(config: ModelConfig) -> AttendFn:
    """The cache-free attention of a full-sequence forward (every row full, causal)."""
    def attend(i, q, k, v, cache):
        return prefill_attention(q, k, v, lengths=None, sliding_window=config.sliding_window), cache

    return attend


@jax.jit
def _forward(model: Model, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = decoder(model, tokens, positions, causal_attend(model.config), None)
    return lm_head(model, h)


def forward(model: Model, tokens) -> Float[Array, "batch seq vocab"]:
    """Full-sequence causal forward without a cache: float32 logits [batch, seq, vocab].

    Concrete inputs are checked (rank 2, integer, ids inside the vocabulary: XLA would clamp a
    bad id silently); inside a caller's jit only the static checks apply.
    """
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {model.config.vocab_size})")
    return _forward(model, jnp.asarray(tokens, jnp.int32))
