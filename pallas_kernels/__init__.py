"""Pallas Mosaic GPU (Hopper, sm_90) kernels and their plain-jnp references, one file per kernel:

    from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
    from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
    from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference, dequantize

(The kernel functions are not re-exported here: their names are the submodules' names.)
`is_sm90()` says whether the kernels can run on a device; `masked_softmax` is the references'
NaN-safe masked softmax, `soft_cap` their logit soft-cap; `NO_WINDOW` spells "no sliding
window" as a traced int32 window.
"""

from pallas_kernels._common import NO_WINDOW, is_sm90, masked_softmax, soft_cap
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.paged_attention import paged_attention_reference

__all__ = ["NO_WINDOW", "flash_attention_reference", "is_sm90", "masked_softmax", "paged_attention_reference",
           "soft_cap"]
