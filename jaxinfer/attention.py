"""One attention interface for the runtime; the implementations live in `pallas_kernels/`.

`backend` is a static string:
- "reference": the plain-jnp references (the CPU path, and the oracles for the kernels);
- "auto": the Pallas kernels on GPU, the references elsewhere (kernels land with the
  attention-kernels issue; until then "auto" means "reference" everywhere).
The model code calls only these two functions, so swapping kernels never touches it.
`pallas_kernels` is imported where it is used: it takes its dimension names from
`jaxinfer.dims`, so a module-level import here would be circular.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

BACKENDS = ("auto", "reference")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")


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
    _check_backend(backend)
    from pallas_kernels.flash_attention import flash_attention_reference

    return flash_attention_reference(q, k, v, lengths=lengths, causal=True, sliding_window=sliding_window)


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
    _check_backend(backend)
    from pallas_kernels.paged_attention import paged_attention_reference

    return paged_attention_reference(
        q, k_pages, v_pages, page_table, lengths, sliding_window=sliding_window
    )
