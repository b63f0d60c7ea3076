"""Quantized linear weights: one PyTree (`QuantizedWeight`) for GPTQ and bitsandbytes formats.

`jaxinfer.load_model` routes checkpoints whose config.json has a `quantization_config` here;
model.py's `linear` calls `QuantizedWeight.matmul` for them.
"""

from jaxinfer.quant.load import check_quantized, load_quantized, quant_tensor_specs
from jaxinfer.quant.weight import KINDS, QuantizedWeight

__all__ = ["KINDS", "QuantizedWeight", "check_quantized", "load_quantized", "quant_tensor_specs"]
