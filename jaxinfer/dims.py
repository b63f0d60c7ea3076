"""The one place that names array dimensions.

Every jaxtyping annotation in jaxinfer and pallas_kernels uses these names, so a shape
mismatch anywhere is reported in the same vocabulary (tests run with runtime shape checks).

| name            | meaning                                                        |
|-----------------|----------------------------------------------------------------|
| batch           | rows of a request batch (prefill batch, forward batch)          |
| seq             | tokens per row (a prefill bucket, or a forward sequence)        |
| slots           | decode slots in the engine state (EngineConfig.max_slots)       |
| pages           | pages in the KV pool (EngineConfig.num_pages; page 0 is null)   |
| page_size       | tokens per page                                                 |
| pages_per_seq   | page-table entries per slot (ceil(max_seq_len / page_size))     |
| layers          | transformer layers                                             |
| q_heads         | query heads                                                     |
| kv_heads        | key/value heads (q_heads is a multiple: GQA)                   |
| head_dim        | per-head width                                                  |
| hidden          | model width                                                     |
| ffn             | MLP intermediate width                                          |
| vocab           | vocabulary size                                                 |
| max_stops       | stop-token ids per slot (EngineConfig.max_stop_ids)             |
| steps           | decode steps run per host sync                                  |
| max_logprobs    | top-k logprobs returned per token (EngineConfig.max_logprobs)   |
| tokens          | rows of an MoE layer's input (batch * seq, flattened)           |
| experts         | experts of an MoE layer (ModelConfig.num_experts)               |
| top_k           | experts each token is routed to (num_experts_per_tok)           |
| tiles           | row tiles of the grouped expert matmul (jaxinfer/moe.py)        |
"""

import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

# Host-side batches (numpy) and their device twins share one annotation.
AnyArray = Array | np.ndarray

BATCH = "batch"
SEQ = "seq"
SLOTS = "slots"
PAGES = "pages"
PAGE_SIZE = "page_size"
PAGES_PER_SEQ = "pages_per_seq"
LAYERS = "layers"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
HIDDEN = "hidden"
FFN = "ffn"
VOCAB = "vocab"
MAX_STOPS = "max_stops"
STEPS = "steps"
MAX_LOGPROBS = "max_logprobs"
TOKENS = "tokens"
EXPERTS = "experts"
TOP_K = "top_k"
TILES = "tiles"
# Structured output (jaxinfer/grammar.py): constraint table entries and their padded sizes.
GRAMMARS = "grammars"
GRAMMAR_STATES = "grammar_states"
GRAMMAR_CLASSES = "grammar_classes"

# Shared aliases for the arrays that cross module boundaries.
Tokens = Int[Array, "batch seq"]
Lengths = Int[Array, "batch"]
Logits = Float[Array, "batch seq vocab"]
Queries = Float[Array, "batch seq q_heads head_dim"]
KeysValues = Float[Array, "batch seq kv_heads head_dim"]
DecodeQueries = Float[Array, "slots q_heads head_dim"]
PageTable = Int[Array, "slots pages_per_seq"]
LayerPages = Float[Array, "pages page_size kv_heads head_dim"]
KVPool = Float[Array, "layers pages page_size kv_heads head_dim"]
SlotInts = Int[Array, "slots"]
SlotFloats = Float[Array, "slots"]
SlotBools = Bool[Array, "slots"]
SlotKeys = UInt32[Array, "slots 2"]
StopIds = Int[Array, "slots max_stops"]

__all__ = [
    "AnyArray",
    "BATCH", "SEQ", "SLOTS", "PAGES", "PAGE_SIZE", "PAGES_PER_SEQ", "LAYERS", "Q_HEADS",
    "KV_HEADS", "HEAD_DIM", "HIDDEN", "FFN", "VOCAB", "MAX_STOPS", "STEPS", "MAX_LOGPROBS", "TOKENS",
    "EXPERTS", "TOP_K", "TILES", "GRAMMARS", "GRAMMAR_STATES", "GRAMMAR_CLASSES",
    "Tokens", "Lengths", "Logits", "Queries", "KeysValues", "DecodeQueries", "PageTable",
    "LayerPages", "KVPool", "SlotInts", "SlotFloats", "SlotBools", "SlotKeys", "StopIds",
]
