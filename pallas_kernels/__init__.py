"""Attention kernels (Pallas Mosaic GPU) and their plain-jnp references, one file per kernel:

    from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
    from pallas_kernels.paged_attention import paged_attention, paged_attention_reference

(The kernel functions are not re-exported here: their names are the submodules' names.)
"""

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.paged_attention import paged_attention_reference

__all__ = ["flash_attention_reference", "paged_attention_reference"]
