"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): top-k routing inside the jitted step and a
grouped matmul that computes only the routed (token, expert) pairs.

Parameters of one MoE layer (slices of params["layers"], stacked over the MoE layers only, see
jaxinfer/checkpoint.py), with an expert axis that expert parallelism will shard:

    router     [hidden, experts]
    moe_gate, moe_up  [experts, hidden, moe_ffn]
    moe_down   [experts, moe_ffn, hidden]

Routing (as transformers): softmax over all expert logits in float32, the top k
probabilities, renormalised to sum 1 when `norm_topk_prob` (always for Mixtral: that is the
softmax over the chosen logits). Everything stays on the device: no host sync, no
data-dependent shapes.

Grouped matmul ("sort by expert + segment matmul"): the n*k (token, expert) assignments are
sorted by expert, each expert's rows are padded to whole tiles of B rows, and one batched
matmul multiplies every tile by its own expert's weights (gathered per tile). The number of
tiles is bounded statically (see `tile_plan`), so the shapes are fixed while the work follows
the routing. `jax.lax.ragged_dot` would be the one-call spelling, but on CPU JAX lowers it to a
dense product over every group (every expert on every token), which is what this avoids.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxinfer.config import ModelConfig

TILE_OVERHEAD = 4  # B is at most assignments / (TILE_OVERHEAD * experts): padding <= 1/4 of the rows


def activation(config: ModelConfig, gate: Array) -> Array:
    """The MLP gate nonlinearity: SwiGLU's silu or GeGLU's tanh-approximated gelu."""
    if config.hidden_act == "gelu_pytorch_tanh":
        return jax.nn.gelu(gate, approximate=True)
    return jax.nn.silu(gate)


def route(config: ModelConfig, logits: Float[Array, "tokens experts"]) -> tuple[Float[Array, "tokens top_k"], Int[Array, "tokens top_k"]]:
    """Top-k routing weights (float32) and expert ids per token."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def tile_plan(assignments: int, experts: int) -> tuple[int, int]:
    """(B rows per tile, number of tiles), static, for `assignments` routed rows over `experts`.

    Expert e's c_e rows take ceil(c_e / B) tiles; at most min(experts, assignments) experts are
    non-empty, so the tiles never exceed (assignments + min(experts, assignments) * (B - 1)) // B.
    B = 1 while assignments < 2 * TILE_OVERHEAD * experts (decode and short prefills): the tiles
    are exactly the assignments, no padding. Beyond, B is the largest power of two <=
    assignments / (TILE_OVERHEAD * experts), which bounds the padding to 1/TILE_OVERHEAD of the
    rows while the tiles grow into real matmuls.
    """
    b = 1
    while 2 * b * TILE_OVERHEAD * experts <= assignments:
        b *= 2
    return b, (assignments + min(experts, assignments) * (b - 1)) // b


def _grouped(x: Array, w: Array, tile_expert: Int[Array, "tiles"], rows_per_tile: int) -> Array:
    """Rows of x [tiles * B, in] times their tile's expert weight w [experts, in, out]: f32 out."""
    tiles = tile_expert.shape[0]
    xt = x.reshape(tiles, rows_per_tile, x.shape[-1]).astype(w.dtype)
    y = jnp.einsum("tbi,tio->tbo", xt, w[tile_expert], preferred_element_type=jnp.float32)
    return y.reshape(tiles * rows_per_tile, w.shape[-1])


def moe_mlp(config: ModelConfig, lp: dict[str, Any], h: Float[Array, "*b hidden"]) -> Float[Array, "*b hidden"]:
    """The routed MLP of one MoE layer on normalised hidden states `h`.

    Design: n tokens, k experts each, A = n * k assignments. Sort the assignments by expert
    (stable), give assignment s of expert e the padded row tile_start[e] * B + (its rank in e),
    scatter the tokens' rows there (unused rows stay 0), run gate/up/down as grouped matmuls
    over the tiles, gather each assignment's output row back and sum the k of a token weighted
    by its routing weights (a fixed-order sum over k: no scatter-add).

    FLOPs per token: router 2 * hidden * experts, then 6 * hidden * moe_ffn per padded row,
    R / n rows per token with R = B * tiles (`tile_plan`, `moe_flops_per_token`): exactly k
    rows (the ideal top_k / num_experts of running every expert) while A < 8 * experts, at
    most 1.25 * k beyond. E.g. Qwen3-30B-A3B (8 of 128): decode of up to 127 slots is exact,
    1/16 of the all-experts FLOPs; a 512-token prefill (A = 4096) runs B = 8, 624 tiles, 1.22 x
    the ideal. Mixtral (2 of 8): decode exact (1/4 of all-experts); a 512-token prefill runs
    B = 32, 39 tiles, 1.22 x the ideal 1/4. Memory: each tile gathers its expert's weights, so
    a call reads (and briefly holds) `tiles` expert matrices: at decode only the routed ones
    (A of them, duplicates included), at long prefills up to ~5 x the layer's experts.
    """
    lead, d = h.shape[:-1], h.shape[-1]
    x = h.reshape(-1, d)
    n, k, e = x.shape[0], config.num_experts_per_tok, config.num_experts
    logits = jnp.einsum("nd,de->ne", x.astype(lp["router"].dtype), lp["router"], preferred_element_type=jnp.float32)
    # As transformers: router logits in the activation dtype, softmax in float32.
    weights, experts = route(config, logits.astype(x.dtype))

    a = n * k
    b, tiles = tile_plan(a, e)
    flat = experts.reshape(a)
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    group_start = jnp.cumsum(counts) - counts
    tiles_of = -(-counts // b)
    tile_end = jnp.cumsum(tiles_of)
    row_sorted = (tile_end - tiles_of)[sorted_e] * b + (jnp.arange(a) - group_start[sorted_e])
    rows = jnp.zeros((a,), jnp.int32).at[order].set(row_sorted)  # padded row of assignment (token, j)
    # Tile t belongs to the first expert whose tiles end after t; tiles past the last are unused
    # (their rows are 0) and borrow the last expert's weight.
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(tiles), side="right"), e - 1)

    xs = jnp.zeros((tiles * b, d), x.dtype).at[rows].set(jnp.repeat(x, k, axis=0))
    gate = _grouped(xs, lp["moe_gate"], tile_expert, b).astype(x.dtype)
    up = _grouped(xs, lp["moe_up"], tile_expert, b).astype(x.dtype)
    y = _grouped(activation(config, gate) * up, lp["moe_down"], tile_expert, b)  # f32 [rows, hidden]
    out = jnp.sum(weights.astype(x.dtype).astype(jnp.float32)[..., None] * y[rows].reshape(n, k, d), axis=1)
    return out.astype(x.dtype).reshape(*lead, d)


def moe_flops_per_token(config: ModelConfig, tokens: int) -> dict[str, float]:
    """Matmul FLOPs per token of one MoE layer for a call on `tokens` tokens: what `moe_mlp`
    spends, the ideal (k experts), and every expert on every token."""
    d, f, e, k = config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok
    b, tiles = tile_plan(tokens * k, e)
    per_row = 6 * d * f
    return {"spent": 2 * d * e + b * tiles * per_row / tokens, "ideal": 2 * d * e + k * per_row,
            "all_experts": 2 * d * e + e * per_row}
