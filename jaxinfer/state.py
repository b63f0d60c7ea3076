"""Engine state: one immutable PyTree holding the paged KV pool, page tables, the page
allocator's bookkeeping and the slot table. Every shape is fixed by a frozen `EngineConfig`.

Page-table representation (why no slot can read another slot's KV)
------------------------------------------------------------------
Page 0 is the *null page*: it is never handed out (its reference count is pinned at 1), and
every page-table entry that does not hold one of the slot's own pages is 0. Three rules make
cross-slot reads impossible:
1. A slot's page-table entries are either pages the allocator gave to that slot (reference
   count incremented for it, so no other slot can receive them while it holds them) or 0.
2. Attention reads only positions < length, and every such position was written by this slot
   (prefill writes positions < prompt length, decode writes position `length` before reading).
   Whatever is in a page beyond `length` (stale data from an earlier owner) is masked, with
   `where`, so even NaN garbage cannot leak.
3. Writes for padded prompt positions, finished and inactive slots go to the null page, a
   write-only sink nobody reads unmasked.
Eviction decrements the counts of a slot's pages and resets its entries to 0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, Shaped, UInt32

from jaxinfer import allocator
from jaxinfer.allocator import NULL_PAGE, PageAllocator
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import pool_spec

# finish_reason codes stored in the state (names are the public strings).
# "dead_end": a structured-output constraint allowed no token (jaxinfer/grammar.py).
FINISH_NONE, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_DEAD_END = 0, 1, 2, 3, 4
FINISH_REASONS = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_ABORT: "abort",
                  FINISH_DEAD_END: "dead_end"}


# KV pool element types (EngineConfig.kv_dtype). "auto": float32 on the CPU ("xla") attention
# path, the model's compute dtype elsewhere (the pool of every release before 8-bit KV).
KV_DTYPES = ("auto", "bfloat16", "float32", "int8", "fp8_e4m3")
_KV_JNP = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
INT8_SCALE_DTYPE = jnp.bfloat16  # one per (page, token, KV head): see pallas_kernels/kv_quant.py


def kv_pool_dtype(kv_dtype: str, auto_dtype) -> jnp.dtype:
    """The pool's element type for EngineConfig.kv_dtype ("auto": `auto_dtype`)."""
    return jnp.dtype(auto_dtype if kv_dtype == "auto" else _KV_JNP[kv_dtype])


def kv_bytes_per_token(model_cfg: ModelConfig, pool_dtype) -> int:
    """Bytes of KV one token occupies in the pool: K and V for every layer and KV head, plus
    int8's per-(token, head) scale (fp8's per-(layer, head) scales are per pool, not per token)."""
    pool_dtype = jnp.dtype(pool_dtype)
    per_head = model_cfg.head_dim * pool_dtype.itemsize
    if pool_dtype == jnp.dtype(jnp.int8):
        per_head += jnp.dtype(INT8_SCALE_DTYPE).itemsize
    return 2 * model_cfg.num_layers * model_cfg.num_kv_heads * per_head


def pages_for_memory(gb: float, model_cfg: ModelConfig, page_size: int, pool_dtype) -> int:
    """num_pages (null page included) whose K/V (and scales) fit in `gb` GiB (2^30 bytes)."""
    if isinstance(gb, bool) or not isinstance(gb, numbers.Real) or not gb > 0:
        raise ValueError(f"kv_memory_gb must be a positive number, got {gb!r}")
    pages = int(gb * 2**30) // (page_size * kv_bytes_per_token(model_cfg, pool_dtype))
    if pages < 2:
        raise ValueError(f"kv_memory_gb={gb} holds {pages} pages of {page_size} tokens; at least 2 are needed "
                         "(page 0 is the null page)")
    return pages


# EngineState fields with a leading [slots] axis: the slot table (fork copies a slot's row,
# decode_steps works on the first rows).
SLOT_FIELDS = ("page_table", "active", "finished", "finish_reason", "request_id", "length", "prefill_len",
               "last_token", "num_generated", "max_tokens", "temperature", "top_k", "top_p", "min_p", "rng",
               "stop_ids", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "logprobs", "seen", "counts", "grammar", "grammar_state")


def default_buckets(max_seq_len: int, smallest: int = 32, factor: int = 4) -> tuple[int, ...]:
    """Prompt-length buckets: smallest * factor**i below max_seq_len, then max_seq_len. Factor 4
    (not 2) halves the prefill programs a workload compiles, for at most 4x padded tokens: on
    CPU a compile (~1.5 s) costs more than the padding of a short prompt."""
    out, b = [], smallest
    while b < max_seq_len:
        out.append(b)
        b *= factor
    out.append(max_seq_len)
    return tuple(out)


@typing.no_type_check  # __post_init__ checks every field and names it (TypeError / ValueError)
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static engine shapes: a jit static argument, so changing any of these recompiles.

    Prefill compiles once per (batch bucket, length bucket) pair: a prompt is padded to the
    smallest `prefill_buckets` entry that holds it (default: 32, 128, 512, ... up to max_seq_len)
    and the batch to the next power of four up to `max_prefill_batch`. Decode compiles once per (slot bucket, span bucket) pair used:
    a burst decodes the smallest `decode_slot_buckets` entry of slots that holds every occupied
    slot, attending over the smallest `decode_span_buckets` entry of positions that holds every
    running slot's length after the burst (defaults: max_slots / 4, / 2, / 1; and spans doubling
    from 128 tokens up to the page table's). One bucket each = fixed shapes.
    """

    max_slots: int = 4
    page_size: int = 16
    num_pages: int = 256  # including the null page 0
    max_seq_len: int = 512
    prefill_buckets: tuple[int, ...] = ()
    max_prefill_batch: int = 0  # 0: max_slots
    max_stop_ids: int = 4
    decode_steps: int = 8  # decode steps per host sync
    attention_backend: str = "auto"
    # Top-k logprobs computed per token when a request asks (SamplingParams.logprobs /
    # prompt_logprobs <= this); static because it is the width of the top-k output arrays.
    max_logprobs: int = 5
    # Automatic prefix caching: full pages are registered in a hash-chain cache and a new
    # request reuses the cached pages of its prompt (jaxinfer.allocator). Off: no lookup and no
    # registration (each request prefills its whole prompt).
    prefix_caching: bool = True
    decode_slot_buckets: tuple[int, ...] = ()
    decode_span_buckets: tuple[int, ...] = ()
    # Structured output (jaxinfer/grammar.py): the device constraint table has max_slots
    # entries of grammar_states x grammar_classes (a constraint's automaton padded to them);
    # a bigger automaton runs with the host-mask fallback (one token per host sync).
    grammar_states: int = 256
    grammar_classes: int = 256
    # The KV pool's element type (KV_DTYPES): "int8" / "fp8_e4m3" store 8-bit K/V with scales
    # (EngineState.k_scales / v_scales) and are dequantized by every attention read.
    kv_dtype: str = "auto"

    def __post_init__(self):
        # Sizes: integers (NumPy integers converted), never bools or floats: TypeError naming the
        # field for the wrong type, ValueError for a wrong value.
        for name in ("max_slots", "page_size", "num_pages", "max_seq_len", "max_stop_ids", "decode_steps",
                     "max_logprobs", "max_prefill_batch", "grammar_states", "grammar_classes"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"EngineConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, int(value))
        for name in ("max_slots", "page_size", "num_pages", "max_seq_len", "max_stop_ids", "decode_steps",
                     "grammar_states", "grammar_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        for name in ("prefill_buckets", "decode_slot_buckets", "decode_span_buckets"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not all(
                    isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in value):
                raise TypeError(f"EngineConfig.{name} must be a sequence of integers, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"EngineConfig.kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if not isinstance(self.prefix_caching, (bool, np.bool_)):
            raise TypeError(f"EngineConfig.prefix_caching must be a bool, got {self.prefix_caching!r}")
        if self.num_pages < 2:
            raise ValueError("EngineConfig.num_pages must be >= 2 (page 0 is the reserved null page)")
        if not self.prefill_buckets:
            object.__setattr__(self, "prefill_buckets", default_buckets(self.max_seq_len))
        if self.max_prefill_batch <= 0:
            object.__setattr__(self, "max_prefill_batch", self.max_slots)
        b = self.prefill_buckets
        if list(b) != sorted(set(b)) or b[-1] < self.max_seq_len - 1:
            raise ValueError(
                f"prefill_buckets {b} must be strictly increasing and reach max_seq_len - 1 "
                f"({self.max_seq_len - 1}) so every admissible prompt has a bucket"
            )
        full = self.pages_per_seq * self.page_size
        if not self.decode_slot_buckets:
            object.__setattr__(self, "decode_slot_buckets",
                               tuple(sorted({max(1, self.max_slots // 4), max(1, self.max_slots // 2), self.max_slots})))
        if not self.decode_span_buckets:
            spans, t = [], min(full, self.pages_for(128) * self.page_size)
            while t < full:
                spans.append(t)
                t *= 2
            object.__setattr__(self, "decode_span_buckets", tuple(spans) + (full,))
        sb, tb = self.decode_slot_buckets, self.decode_span_buckets
        if list(sb) != sorted(set(sb)) or sb[-1] != self.max_slots or sb[0] < 1:
            raise ValueError(f"decode_slot_buckets {sb} must be strictly increasing, >= 1, and end at max_slots ({self.max_slots})")
        if list(tb) != sorted(set(tb)) or tb[-1] != full or any(t % self.page_size or t <= 0 for t in tb):
            raise ValueError(f"decode_span_buckets {tb} must be strictly increasing multiples of page_size "
                             f"({self.page_size}) ending at {full} (the page table's positions)")

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.page_size)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Prefill batch sizes: powers of 4 below max_prefill_batch, then max_prefill_batch."""
        out, b = [], 1
        while b < self.max_prefill_batch:
            out.append(b)
            b *= 4
        return tuple(out) + (self.max_prefill_batch,)

    def prefill_bucket(self, length: int) -> int:
        return next(b for b in self.prefill_buckets if b >= length)

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    def decode_slots(self, n: int) -> int:
        """The decode slot bucket holding slots [0, n)."""
        return next(b for b in self.decode_slot_buckets if b >= n)

    def decode_span(self, length: int) -> int:
        """The decode span bucket holding positions [0, length) (capped at the largest)."""
        return next((t for t in self.decode_span_buckets if t >= length), self.decode_span_buckets[-1])

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # The page budget, one formula for validating a request and for scheduling it.
    def decode_growth(self, prompt_len: int, max_tokens: int, length: int, ntok: int) -> int:
        """Pages a sample may allocate in its next decode_steps tokens (an upper bound): it holds
        pages for max(ntok, length) positions (admit allocates the whole prompt of ntok tokens)
        and writes positions from max(length, ntok - 1), never past prompt_len - 1 + max_tokens."""
        start = max(length, ntok - 1)
        end = min(start + self.decode_steps, prompt_len - 1 + max_tokens, self.max_seq_len)
        return max(0, self.pages_for(end) - self.pages_for(max(ntok, length)))

    def admission_pages(self, prompt_len: int, max_tokens: int, ntok: int, samples: int) -> int:
        """Pages an admission can take in its first step: the prompt's (no cache hit assumed),
        each extra sample's copied page, and every sample's decode growth."""
        g = self.decode_growth(prompt_len, max_tokens, 0, ntok)
        return self.pages_for(ntok) + g + (samples - 1) * (1 + g)

    def request_pages(self, prompt_len: int, max_tokens: int, n: int) -> int:
        """The most pages a request can ever need at once: one sample's whole sequence, or all n
        samples' first step. Within the pool, preempting everything newer always lets the oldest
        request progress."""
        last = min(prompt_len - 1 + max_tokens, self.max_seq_len)
        return max(self.pages_for(last), self.admission_pages(prompt_len, max_tokens, prompt_len, n))


@flax.struct.dataclass
class EngineState:
    """Everything that changes while serving, as arrays. See the module docstring for pages."""

    # KV pool: K and V pages for every layer (float, or int8 / float8_e4m3fn with scales).
    k_pages: Shaped[Array, "layers pages page_size kv_heads head_dim"]
    v_pages: Shaped[Array, "layers pages page_size kv_heads head_dim"]
    # Their scales (pallas_kernels/kv_quant.py): int8 [layers, pages, kv_heads, page_size] bf16,
    # one per token and KV head, written with the token; fp8 [layers, kv_heads] float32 (1.0,
    # vLLM's default per-tensor scale); float pools: a [1] placeholder nothing reads.
    k_scales: Float[Array, "..."]
    v_scales: Float[Array, "..."]
    # int8 pools: K's per-channel smoothing, [layers, kv_heads, head_dim] float32 (the pool
    # holds k / c, attention uses q * c; jaxinfer/kv_smoothing.py); other pools: a [1] placeholder.
    k_channel: Float[Array, "..."]
    # Page allocator: reference counts, prefix cache, LRU (see jaxinfer.allocator).
    alloc: PageAllocator
    # Slot -> pages. Entry p holds tokens [p*page_size, (p+1)*page_size); unused entries are 0.
    page_table: Int[Array, "slots pages_per_seq"]
    # Slot table.
    active: Bool[Array, "slots"]  # holds a request (running, or finished and not yet evicted)
    finished: Bool[Array, "slots"]
    finish_reason: Int[Array, "slots"]  # FINISH_* codes
    request_id: Int[Array, "slots"]  # caller's id; -1 when empty
    length: Int[Array, "slots"]  # tokens whose K/V is in the pool
    # Tokens that prefill writes (the prompt minus its last token, which is `last_token` and
    # is fed by the first decode step); the slot decodes once length >= prefill_len.
    prefill_len: Int[Array, "slots"]
    last_token: Int[Array, "slots"]  # newest sampled token (its K/V is written by the next decode)
    num_generated: Int[Array, "slots"]
    max_tokens: Int[Array, "slots"]
    temperature: Float[Array, "slots"]  # 0 = greedy
    top_k: Int[Array, "slots"]  # <= 0 = off
    top_p: Float[Array, "slots"]  # 1 = off
    min_p: Float[Array, "slots"]  # 0 = off
    rng: UInt32[Array, "slots 2"]  # per-request threefry key; step i uses fold_in(key, i)
    stop_ids: Int[Array, "slots max_stops"]  # -1 = unused
    min_tokens: Int[Array, "slots"]  # stop ids are masked while num_generated < min_tokens
    repetition_penalty: Float[Array, "slots"]  # 1 = off
    presence_penalty: Float[Array, "slots"]  # 0 = off
    frequency_penalty: Float[Array, "slots"]  # 0 = off
    logprobs: Int[Array, "slots"]  # top-k logprobs wanted per token; -1 = none (lets decode skip them)
    # Token history for the penalties: filled from the prompt by insert, updated by decode.
    seen: Bool[Array, "slots vocab"]  # token occurs in prompt or output (repetition penalty)
    counts: Int[Array, "slots vocab"]  # occurrences in the output (presence/frequency penalties)
    # Structured output (jaxinfer/grammar.py): per slot its constraint-table entry (-1 = none)
    # and automaton state; the table itself (max_slots entries, written by `load_grammar`).
    grammar: Int[Array, "slots"]
    grammar_state: Int[Array, "slots"]
    grammar_class: Int[Array, "grammars vocab"]
    grammar_next: Int[Array, "grammars grammar_states grammar_classes"]
    grammar_flags: Int[Array, "grammars grammar_states"]

    @property
    def running(self) -> Bool[Array, "slots"]:
        """Slots that decode: active, not finished, prefill complete."""
        return self.active & ~self.finished & (self.length >= self.prefill_len)

    @property
    def prefilling(self) -> Bool[Array, "slots"]:
        return self.active & ~self.finished & (self.length < self.prefill_len)

    @property
    def page_refcount(self) -> Int[Array, "pages"]:
        return self.alloc.refcount


def init_state(cfg: EngineConfig, model_cfg: ModelConfig, dtype=jnp.float32, mesh=None, k_channel=None) -> EngineState:
    """An empty state: every slot free, every page but the null page free. The pool holds
    `cfg.kv_dtype` (its "auto": `dtype`). An int8 pool takes `k_channel`, its per-channel K
    smoothing ([layers, kv_heads, head_dim]; `kv_smoothing.k_channel_scale(model)` is what the
    Engine passes; default ones: plain per-token int8). On a `mesh` (tensor parallel, jaxinfer/sharding.py;
    `model_cfg` the sharded model's) the pool and its scales are split over KV heads along
    "model" and everything else is replicated.

    Built in NumPy and moved to the device in one `device_put` (every field its own buffer: the
    jitted steps donate the state, and XLA refuses to donate one buffer twice); building it with
    jnp ops would compile a small program per distinct shape, most of a second in all."""
    s = cfg.max_slots
    pool_shape = (model_cfg.num_layers, cfg.num_pages, cfg.page_size, model_cfg.num_kv_heads,
                  model_cfg.head_dim)
    i32 = lambda v, shape=(s,): np.full(shape, v, np.int32)  # noqa: E731
    f32 = lambda v: np.full((s,), v, np.float32)  # noqa: E731
    pool_dtype = kv_pool_dtype(cfg.kv_dtype, dtype)
    if pool_dtype == jnp.dtype(jnp.int8):
        scales = lambda: np.zeros((model_cfg.num_layers, cfg.num_pages, model_cfg.num_kv_heads, cfg.page_size),  # noqa: E731
                                  jnp.dtype(INT8_SCALE_DTYPE))
    elif pool_dtype == jnp.dtype(jnp.float8_e4m3fn):
        scales = lambda: np.ones((model_cfg.num_layers, model_cfg.num_kv_heads), np.float32)  # noqa: E731
    else:
        scales = lambda: np.zeros((1,), np.float32)  # noqa: E731
    channel_shape = (model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim)
    if pool_dtype != jnp.dtype(jnp.int8):
        if k_channel is not None:
            raise ValueError(f"k_channel is the K smoothing of an int8 pool; this pool holds {pool_dtype}")
        k_channel = np.ones((1,), np.float32)
    elif k_channel is None:
        k_channel = np.ones(channel_shape, np.float32)
    elif tuple(k_channel.shape) != channel_shape or jnp.dtype(k_channel.dtype) != jnp.dtype(jnp.float32):
        raise ValueError(f"k_channel must be float32 {list(channel_shape)} [layers, kv_heads, head_dim], "
                         f"got {k_channel.dtype} {list(k_channel.shape)}")
    fields = dict(
        k_pages=np.zeros(pool_shape, pool_dtype),
        v_pages=np.zeros(pool_shape, pool_dtype),
        k_scales=scales(),
        v_scales=scales(),
        k_channel=k_channel,
        page_table=i32(NULL_PAGE, (s, cfg.pages_per_seq)),
        active=np.zeros((s,), bool),
        finished=np.zeros((s,), bool),
        finish_reason=i32(0),
        request_id=i32(-1),
        length=i32(0),
        prefill_len=i32(0),
        last_token=i32(0),
        num_generated=i32(0),
        max_tokens=i32(0),
        temperature=f32(0),
        top_k=i32(0),
        top_p=f32(1),
        min_p=f32(0),
        rng=np.zeros((s, 2), np.uint32),
        stop_ids=i32(-1, (s, cfg.max_stop_ids)),
        min_tokens=i32(0),
        repetition_penalty=f32(1),
        presence_penalty=f32(0),
        frequency_penalty=f32(0),
        logprobs=i32(-1),
        seen=np.zeros((s, model_cfg.vocab_size), bool),
        counts=i32(0, (s, model_cfg.vocab_size)),
        grammar=i32(-1),
        grammar_state=i32(0),
        grammar_class=i32(0, (s, model_cfg.vocab_size)),
        grammar_next=i32(-1, (s, cfg.grammar_states, cfg.grammar_classes)),
        grammar_flags=i32(0, (s, cfg.grammar_states)),
    )
    alloc = allocator.init_arrays(cfg.num_pages, cfg.page_size)
    if mesh is None:
        fields, alloc = jax.device_put((fields, alloc))
    else:
        pool = ("k_pages", "v_pages", "k_scales", "v_scales", "k_channel")
        fields = {k: jax.device_put(v, NamedSharding(mesh, pool_spec(v) if k in pool else P())) for k, v in fields.items()}
        alloc = jax.device_put(alloc, NamedSharding(mesh, P()))
    return EngineState(alloc=PageAllocator(**alloc), **fields)
