"""8-bit KV pages: quantize as K/V are written, dequantize as they are read (plain jnp; shared
by the paged-attention reference, the kernel wrapper and the runtime's writers).

Two formats, told apart by the page dtype (static under jit):

- int8, symmetric, one scale per (page, token, kv head): `x ~= q * scale`, q in [-127, 127],
  scale = max|x| over head_dim / 127, stored in bfloat16 (its float32 exponent range, so no
  underflow; the value is rounded *before* x is divided by it, so `q * scale` is exactly what a
  reader sees and every element is off by at most scale / 2, one half quantization step).
  Scale layout for one layer `[pages, kv_heads, page_size]` (the page's tokens contiguous per
  head: the kernel copies one head's scales of a page with one TMA, next to its K/V tile).
- fp8 e4m3 (`float8_e4m3fn`), one float32 scale per kv head per layer (vLLM's `fp8` keeps one
  per-tensor k_scale / v_scale per layer, 1.0 unless calibrated; this is that, per head):
  `x ~= float(q) * scale`, q = e4m3(clip(x / scale, +-448)). Relative step 2^-3 (3 mantissa
  bits): each element is off by at most 2^-4 |x| (plus 2^-10 * scale in the subnormal range).

Float pages (float32 / bfloat16 / float16) take no scale and are read as `x.astype(f32)`.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8 = jnp.dtype(jnp.int8)
FP8 = jnp.dtype(jnp.float8_e4m3fn)
SCALE_DTYPE = jnp.dtype(jnp.bfloat16)  # int8 per-token scales

Scales = Float[Array, "..."]  # int8: [..., kv_heads, page_size]; fp8: [kv_heads]; float pages: unused


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) in (INT8, FP8)


def quantize(x: Float[Array, "*b kv_heads head_dim"], dtype, fp8_scale: Float[Array, "kv_heads"] | None = None):
    """(q, scale, x_read): x in `dtype` pages, its scale (int8: [*b, kv_heads] bf16; fp8: None),
    and the float32 value a reader will dequantize (so attention over freshly written K/V can
    use exactly what later reads of the pages see). Float dtypes: (x.astype(dtype), None, x)."""
    dtype = jnp.dtype(dtype)
    if dtype == INT8:
        x32 = x.astype(jnp.float32)
        scale = (jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX).astype(SCALE_DTYPE)
        s32 = scale.astype(jnp.float32)
        q = jnp.clip(jnp.round(x32 / jnp.where(s32 > 0, s32, 1.0)[..., None]), -INT8_MAX, INT8_MAX)
        return q.astype(INT8), scale, q * s32[..., None]
    if dtype == FP8:
        s = fp8_scale.astype(jnp.float32)[:, None]
        q = jnp.clip(x.astype(jnp.float32) / s, -FP8_MAX, FP8_MAX).astype(FP8)
        return q, None, q.astype(jnp.float32) * s
    return x.astype(dtype), None, x


def dequantize(x: Shaped[Array, "*b page_size kv_heads head_dim"], scale: Scales | None) -> Float[Array, "*b page_size kv_heads head_dim"]:
    """float32 values of pages `x` (any leading dims). int8: `scale` [*b, kv_heads, page_size]
    (the pages' own scales, gathered alongside); fp8: [kv_heads]; float pages: ignored."""
    dtype = jnp.dtype(x.dtype)
    if dtype == INT8:
        return x.astype(jnp.float32) * jnp.swapaxes(scale, -1, -2).astype(jnp.float32)[..., None]
    if dtype == FP8:
        return x.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
    return x.astype(jnp.float32)

