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

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxinfer import allocator
from jaxinfer.allocator import NULL_PAGE, PageAllocator
from jaxinfer.config import ModelConfig

# finish_reason codes stored in the state (names are the public strings).
FINISH_NONE, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = 0, 1, 2, 3
FINISH_REASONS = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_ABORT: "abort"}


def default_buckets(max_seq_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including max_seq_len."""
    out, b = [], smallest
    while b < max_seq_len:
        out.append(b)
        b *= 2
    out.append(max_seq_len)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static engine shapes: a jit static argument, so changing any of these recompiles.

    Prefill compiles once per (batch bucket, length bucket) pair: a prompt is padded to the
    smallest `prefill_buckets` entry that holds it and the insert batch to the next power of
    two up to `max_prefill_batch`.
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

    def __post_init__(self):
        for name in ("max_slots", "page_size", "num_pages", "max_seq_len", "max_stop_ids", "decode_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
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

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.page_size)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        out, b = [], 1
        while b < self.max_prefill_batch:
            out.append(b)
            b *= 2
        return tuple(out) + (self.max_prefill_batch,)

    def prefill_bucket(self, length: int) -> int:
        return next(b for b in self.prefill_buckets if b >= length)

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

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

    # KV pool: K and V pages for every layer.
    k_pages: Float[Array, "layers pages page_size kv_heads head_dim"]
    v_pages: Float[Array, "layers pages page_size kv_heads head_dim"]
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


def init_state(cfg: EngineConfig, model_cfg: ModelConfig, dtype=jnp.float32) -> EngineState:
    """An empty state: every slot free, every page but the null page free."""
    s = cfg.max_slots
    pool_shape = (model_cfg.num_layers, cfg.num_pages, cfg.page_size, model_cfg.num_kv_heads,
                  model_cfg.head_dim)
    # Distinct buffers per field: the jitted steps donate the state, and XLA refuses to donate
    # one buffer twice.
    zeros_i = lambda: jnp.zeros((s,), jnp.int32)  # noqa: E731
    return EngineState(
        k_pages=jnp.zeros(pool_shape, dtype),
        v_pages=jnp.zeros(pool_shape, dtype),
        alloc=allocator.init(cfg.num_pages, cfg.page_size),
        page_table=jnp.full((s, cfg.pages_per_seq), NULL_PAGE, jnp.int32),
        active=jnp.zeros((s,), bool),
        finished=jnp.zeros((s,), bool),
        finish_reason=zeros_i(),
        request_id=jnp.full((s,), -1, jnp.int32),
        length=zeros_i(),
        prefill_len=zeros_i(),
        last_token=zeros_i(),
        num_generated=zeros_i(),
        max_tokens=zeros_i(),
        temperature=jnp.zeros((s,), jnp.float32),
        top_k=zeros_i(),
        top_p=jnp.ones((s,), jnp.float32),
        min_p=jnp.zeros((s,), jnp.float32),
        rng=jnp.zeros((s, 2), jnp.uint32),
        stop_ids=jnp.full((s, cfg.max_stop_ids), -1, jnp.int32),
        min_tokens=zeros_i(),
        repetition_penalty=jnp.ones((s,), jnp.float32),
        presence_penalty=jnp.zeros((s,), jnp.float32),
        frequency_penalty=jnp.zeros((s,), jnp.float32),
        logprobs=jnp.full((s,), -1, jnp.int32),
        seen=jnp.zeros((s, model_cfg.vocab_size), bool),
        counts=jnp.zeros((s, model_cfg.vocab_size), jnp.int32),
    )
