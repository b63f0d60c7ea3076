"""jaxinfer: a pure-JAX, functional LLM inference runtime.

    model = jaxinfer.load_model("path/to/hf_dir", dtype="float32")
    logits = jaxinfer.forward(model, tokens)
    engine = jaxinfer.Engine(model, max_slots=4, page_size=16, num_pages=256, max_seq_len=512)
    outs = engine.generate(["a prompt"], jaxinfer.SamplingParams(max_tokens=32, temperature=0.0))
"""

from jaxinfer.config import ModelConfig, RopeConfig, config_from_hf, load_config
from jaxinfer.engine import Engine, RequestOutput, SampleOutput, StreamDelta
from jaxinfer.errors import CheckpointError, ConfigError, InvalidRequestError, JaxinferError
from jaxinfer.model import Model, forward
from jaxinfer.presets import PRESETS, get_preset
from jaxinfer.quant import quantize
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import EngineConfig, EngineState, init_state
from jaxinfer.steps import (
    AdmitResult, Chunk, DecodeResult, InsertResult, PrefillResult, Requests, admit, decode, decode_steps, evict,
    fork, insert, make_requests, prefill,
)
from jaxinfer.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from jaxinfer.weights import dummy_model, load_model, save_model

__all__ = [
    "ModelConfig", "RopeConfig", "config_from_hf", "load_config", "Engine", "RequestOutput",
    "SampleOutput", "StreamDelta", "AdmitResult", "Chunk", "PrefillResult", "admit", "prefill", "fork", "CheckpointError", "ConfigError", "InvalidRequestError", "JaxinferError",
    "Model", "forward", "PRESETS", "get_preset", "SamplingParams", "EngineConfig", "EngineState",
    "init_state", "DecodeResult", "InsertResult", "Requests", "decode", "decode_steps", "evict",
    "insert", "make_requests", "ByteTokenizer", "Tokenizer", "load_tokenizer", "dummy_model",
    "load_model", "save_model", "quantize",
]
