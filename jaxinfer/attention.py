"""One attention interface for the runtime; the implementations live in `pallas_kernels/`.

`backend` is a static string (EngineConfig.attention_backend):
- "auto": the Pallas Mosaic GPU kernels on a Hopper GPU (sm_90) when the inputs are ones they
  support (bf16/fp16, head_dim 64/128, no sliding window, ...), else the references. CPU
  always uses the references.
- "reference": the plain-jnp references (the CPU path, and the oracles for the kernels).
- "pallas": the kernels, compiled for the GPU; unsupported inputs raise instead of falling back.
- "interpret": the kernels in Mosaic GPU interpret mode (CPU testing); unsupported inputs raise.
The model code calls only these two functions, so swapping kernels never touches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels import flash_attention as fa
from pallas_kernels import is_sm90
from pallas_kernels import paged_attention as pa

BACKENDS = ("auto", "reference", "pallas", "interpret")
KERNEL_HEAD_DIMS = (64, 128)


def _kernel_head_dim(head_dim: int) -> int:
    """Smaller head dims (e.g. stories260K's 8) are zero-padded up to one the kernels take:
    zero columns add nothing to q.k, and V's zero columns are sliced off the output. It costs a
    padded copy of the inputs (the whole layer pool in decode), fine for the small models that
    have such heads."""
    return next((d for d in KERNEL_HEAD_DIMS if d >= head_dim), head_dim)


def _pad(x, head_dim: int):
    return x if x.shape[-1] == head_dim else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim - x.shape[-1])])


def _spec(x, head_dim: int):
    return jax.ShapeDtypeStruct(x.shape[:-1] + (head_dim,), x.dtype)


def _use_kernel(backend: str, check) -> bool:
    """Whether to call the kernel; `check()` raises for inputs it does not support."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "reference":
        return False
    if backend == "auto":
        if not is_sm90():
            return False
        try:
            check()
        except (ValueError, NotImplementedError):
            return False
        return True
    check()  # "pallas" / "interpret": the caller asked for the kernel, so say why it can't run
    return True


def prefill_attention(
    q: Float[Array, "batch seq q_heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    *,
    lengths: Int[Array, "batch"] | None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> Float[Array, "batch seq q_heads head_dim"]:
    """Causal self-attention over each row's first `lengths` tokens; padded rows give zeros."""
    hd, d = q.shape[-1], _kernel_head_dim(q.shape[-1])

    def check():
        if sliding_window is not None:
            raise NotImplementedError("the flash-attention kernel has no sliding window")
        fa.check_flash_attention_kernel_inputs(_spec(q, d), _spec(k, d), _spec(v, d), lengths)

    if _use_kernel(backend, check):
        out = fa.flash_attention(_pad(q, d), _pad(k, d), _pad(v, d), lengths=lengths, causal=True,
                                 scale=hd**-0.5, interpret=backend == "interpret")
        return out[..., :hd]
    return fa.flash_attention_reference(q, k, v, lengths=lengths, causal=True, sliding_window=sliding_window)


def decode_attention(
    q: Float[Array, "slots q_heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    page_table: Int[Array, "slots pages_per_seq"],
    lengths: Int[Array, "slots"],
    *,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> Float[Array, "slots q_heads head_dim"]:
    """One query per slot against that slot's pages; `lengths` counts the query's own token."""
    hd, d = q.shape[-1], _kernel_head_dim(q.shape[-1])

    def check():
        pa.check_paged_attention_kernel_inputs(_spec(q, d), _spec(k_pages, d), _spec(v_pages, d), page_table,
                                               lengths, sliding_window=sliding_window)

    if _use_kernel(backend, check):
        out = pa.paged_attention(_pad(q, d), _pad(k_pages, d), _pad(v_pages, d), page_table, lengths,
                                 scale=hd**-0.5, interpret=backend == "interpret")
        return out[..., :hd]
    return pa.paged_attention_reference(q, k_pages, v_pages, page_table, lengths, sliding_window=sliding_window)


def chunk_attention_reference(
    q: Float[Array, "batch seq q_heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    page_table: Int[Array, "batch pages_per_seq"],
    start: Int[Array, "batch"],
    *,
    sliding_window: int | None = None,
) -> Float[Array, "batch seq q_heads head_dim"]:
    """A prefill chunk against the paged pool: query i of row b sits at position start[b] + i and
    attends causally to every position <= its own in the row's pages (the cached prefix plus
    the chunk, whose K/V were written first). Float32 softmax; masked with `where`, so whatever
    lies in pages beyond the query's position (stale data, NaN) cannot leak. Rows past a chunk's
    valid length produce values the caller ignores.

    Gathers the row's whole page table (max_seq_len positions): the plain-jnp path for prefix-cache
    continuations and chunked prefill on every backend (there is no paged-prefill kernel yet).
    """
    b, t, hq, d = q.shape
    kvh = k_pages.shape[2]
    g = hq // kvh
    k = k_pages[page_table].reshape(b, -1, kvh, d)  # [b, S, kvh, d]
    v = v_pages[page_table].reshape(b, -1, kvh, d)
    qpos = start[:, None] + jnp.arange(t)[None, :]  # [b, t]
    kpos = jnp.arange(k.shape[1])
    allowed = kpos[None, None, :] <= qpos[:, :, None]  # [b, t, S]
    if sliding_window is not None:
        allowed &= qpos[:, :, None] - kpos[None, None, :] < sliding_window
    qg = q.reshape(b, t, kvh, g, d).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # as the other references: no TF32 on GPU
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=hi) * d**-0.5
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(allowed[:, None, None], p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, jnp.where(jnp.isfinite(v), v, 0).astype(jnp.float32), precision=hi)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def chunk_attention(
    q: Float[Array, "batch seq q_heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    page_table: Int[Array, "batch pages_per_seq"],
    start: Int[Array, "batch"],
    n: Int[Array, "batch"],
    *,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> Float[Array, "batch seq q_heads head_dim"]:
    """Attention for a prefill chunk at positions [start, start + n) of each row, whose K/V are
    `k`, `v` (already written to the pages too). When every row starts at 0 (no cached prefix,
    first chunk) this is plain causal prefill over the chunk and runs `prefill_attention` (the
    flash kernel where it applies); otherwise the paged reference above."""
    def fresh(_):
        return prefill_attention(q, k, v, lengths=n, sliding_window=sliding_window, backend=backend)

    def paged(_):
        return chunk_attention_reference(q, k_pages, v_pages, page_table, start, sliding_window=sliding_window)

    return jax.lax.cond(jnp.all(start == 0), fresh, paged, None)
