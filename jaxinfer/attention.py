"""One attention interface for the runtime; the implementations live in `pallas_kernels/`.

`backend` is a static string (EngineConfig.attention_backend):
- "auto": the Pallas Mosaic GPU kernels on a Hopper GPU (sm_90) when the inputs are ones they
  support (bf16/fp16, head_dim 64/128, no sliding window, ...), else the references. CPU
  always uses the references.
- "reference": the plain-jnp references (the CPU path, and the oracles for the kernels).
- "pallas": the kernels, compiled for the GPU; unsupported inputs raise instead of falling back.
- "interpret": the kernels in Mosaic GPU interpret mode (CPU testing); unsupported inputs raise.
The model code calls only these two functions, so swapping kernels never touches it.
`pallas_kernels` is imported where it is used: it takes its dimension names from
`jaxinfer.dims`, so a module-level import here would be circular.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

BACKENDS = ("auto", "reference", "pallas", "interpret")


def _use_kernel(backend: str, check) -> bool:
    """Whether to call the kernel; `check()` raises for inputs it does not support."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "reference":
        return False
    if backend == "auto":
        device = jax.devices()[0]
        if device.platform != "gpu" or getattr(device, "compute_capability", None) != "9.0":
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
    from pallas_kernels import flash_attention as fa

    def check():
        if sliding_window is not None:
            raise NotImplementedError("the flash-attention kernel has no sliding window")
        fa.check_flash_attention_kernel_inputs(q, k, v, lengths)

    if _use_kernel(backend, check):
        return fa.flash_attention(q, k, v, lengths=lengths, causal=True, interpret=backend == "interpret")
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
    from pallas_kernels import paged_attention as pa

    def check():
        pa.check_paged_attention_kernel_inputs(q, k_pages, v_pages, page_table, lengths,
                                               sliding_window=sliding_window)

    if _use_kernel(backend, check):
        return pa.paged_attention(q, k_pages, v_pages, page_table, lengths, interpret=backend == "interpret")
    return pa.paged_attention_reference(q, k_pages, v_pages, page_table, lengths, sliding_window=sliding_window)
