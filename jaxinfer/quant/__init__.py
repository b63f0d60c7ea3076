"""Quantized linear weights: one PyTree (`QuantizedWeight`) for GPTQ and bitsandbytes formats.

`jaxinfer.load_model` routes checkpoints whose config.json has a `quantization_config` here;
model.py's `linear` calls `QuantizedWeight.matmul` for them. `quantize(model, method, ...)`
quantizes a dense model offline (int8, int4, nf4, gptq, llm_int8; see quantize.py);
`save_quantized` / `load_quantized_orbax` store and restore a quantized model with orbax.
"""

from jaxinfer.quant.load import check_quantized, load_quantized, quant_tensor_specs
from jaxinfer.quant.orbax_io import is_quantized_orbax, load_quantized_orbax, save_quantized
from jaxinfer.quant.quantize import METHODS, quantize
from jaxinfer.quant.weight import KINDS, MATMUL_BACKENDS, QuantizedWeight, with_matmul_backend

__all__ = ["KINDS", "MATMUL_BACKENDS", "METHODS", "QuantizedWeight", "with_matmul_backend", "check_quantized", "is_quantized_orbax", "load_quantized",
           "load_quantized_orbax", "quant_tensor_specs", "quantize", "save_quantized"]
