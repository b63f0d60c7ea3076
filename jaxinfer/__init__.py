"""jaxinfer: a pure-JAX, functional LLM inference runtime.

    model = jaxinfer.load_model("path/to/hf_dir", dtype="float32")
    logits = jaxinfer.forward(model, tokens)
    engine = jaxinfer.Engine(model, max_slots=4, page_size=16, num_pages=256, max_seq_len=512)
    outs = engine.generate(["a prompt"], jaxinfer.SamplingParams(max_tokens=32, temperature=0.0))
"""

# Engine: the host-side scheduler and what it hands out.
from jaxinfer.engine import Engine
from jaxinfer.request import RequestOutput, SampleOutput, StreamDelta
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

# Steps: the pure functions over the state, for use inside your own jit / scan / while_loop.
from jaxinfer.state import EngineConfig, EngineState, init_state
from jaxinfer.snapshot import SnapshotError, load_state, save_state
from jaxinfer.steps import (
    AdmitResult, Chunk, DecodeResult, InsertResult, PrefillResult, Requests, admit, decode, decode_steps, evict,
    fork, insert, make_chunk, make_requests, prefill, SpeculativeConfig, spec_decode_steps,
)

# Model and weights; tensor / data parallelism.
from jaxinfer.model import Model, forward
from jaxinfer.sharding import make_mesh
from jaxinfer.replicas import ReplicatedEngine
from jaxinfer.weights import dummy_model, load_model, save_model

# Configuration.
from jaxinfer.config import ModelConfig, RopeConfig, config_from_hf, config_to_hf, load_config
from jaxinfer.presets import PRESETS, default_model_dir, get_preset

# Quantization.
from jaxinfer.quant import quantize

# ONNX export (onnx / jax2onnx are imported only when it runs: the optional "onnx" extra).
from jaxinfer.onnx_export import export_onnx

# Errors.
from jaxinfer.errors import CheckpointError, ConfigError, InvalidRequestError, JaxinferError

# Compiled programs are kept on disk (jaxinfer/aot.py; JAXINFER_CACHE_DIR=0 turns it off): turn
# JAX's persistent compilation cache on too, unless the user configured one.
from jaxinfer import aot  # noqa: E402

aot.enable_persistent_cache()

__all__ = [
    # engine
    "Engine", "RequestOutput", "SampleOutput", "StreamDelta", "SamplingParams", "ByteTokenizer", "Tokenizer",
    "load_tokenizer",
    # steps
    "EngineConfig", "EngineState", "init_state", "save_state", "load_state", "SnapshotError", "AdmitResult", "Chunk", "DecodeResult", "InsertResult", "SpeculativeConfig", "spec_decode_steps",
    "PrefillResult", "Requests", "admit", "decode", "decode_steps", "evict", "fork", "insert", "make_chunk",
    "make_requests", "prefill",
    # model and weights
    "Model", "forward", "dummy_model", "load_model", "save_model", "make_mesh", "ReplicatedEngine",
    # configuration
    "ModelConfig", "RopeConfig", "config_from_hf", "config_to_hf", "load_config", "PRESETS", "default_model_dir", "get_preset",
    # quantization
    "quantize",
    # ONNX export
    "export_onnx",
    # errors
    "CheckpointError", "ConfigError", "InvalidRequestError", "JaxinferError",
]
