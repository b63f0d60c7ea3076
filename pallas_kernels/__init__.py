"""Attention kernels for jaxinfer: plain-jnp references (CPU path and oracles for GPU kernels)."""

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.paged_attention import paged_attention_reference

__all__ = ["flash_attention_reference", "paged_attention_reference"]
