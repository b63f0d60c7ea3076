"""Host side: a scheduler in front of the pure steps (continuous or static batching).

One `Engine.step()`:
1. read the pool's free-page count (one small device->host transfer),
2. preempt: if the running slots' next `decode_steps` tokens could need more pages than are
   free, evict the newest requests (LIFO) and queue them again at the front; a resumed request
   re-prefills prompt + output so far (mostly prefix-cache hits) and continues exactly where it
   stopped (same RNG step, penalties, max_tokens),
3. admit waiting requests FIFO while slots and pages allow (`admit`: prefix-cache lookup, one
   more small transfer to learn how much of each prompt was cached); a request sharing its
   first page with one admitted in the same step waits a step, so it can reuse those pages,
4. prefill one chunk per prefilling slot (`prefill_chunk` tokens, or the whole rest),
5. fork the samples of `n > 1` requests whose prefill just finished (copy-on-write),
6. run `decode_steps` decode steps on device,
7. fetch every output in ONE device-to-host transfer, hand out tokens, match stop strings on
   the detokenized text, and evict finished slots (dispatched without waiting).
In "static" mode step 3 only admits when every slot is empty (fill a batch, run it out).

Compilations: `admit` and `prefill` once per (batch bucket, length bucket) pair actually used,
`fork`, `decode_steps`, `evict` and the free-page count once each.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
import typing
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InvalidRequestError
from jaxinfer.model import Model
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import FINISH_REASONS, EngineConfig, init_state
from jaxinfer.steps import (
    Chunk, admit_jit, decode_steps_jit, evict_jit, fork_jit, make_requests, num_free_pages_jit, prefill_jit,
    sample_key,
)

MODES = ("continuous", "static")


@dataclasses.dataclass
class SampleOutput:
    """One of a request's `n` samples."""

    index: int
    token_ids: list[int]  # generated ids only; a stop token that ended the sample is included
    text: str | None  # None without a tokenizer; special tokens are not rendered
    finish_reason: str | None  # "stop", "length", "abort", None while running
    token_times: list[float] = dataclasses.field(default_factory=list)  # perf_counter per token
    # With SamplingParams.logprobs=k: per generated token {token_id: logprob} for the token
    # itself and the top k, of the raw model distribution (before penalties / temperature).
    logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class RequestOutput:
    """A request's result. `token_ids`, `text`, `finish_reason`, `token_times`, `logprobs` are
    sample 0's (the only one unless SamplingParams.n > 1); `samples` holds all n."""

    request_id: int
    prompt_token_ids: list[int]
    samples: list[SampleOutput]
    # With prompt_logprobs=k: per prompt token the same as logprobs, given the tokens before it
    # (None for the first, which has no prefix).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    token_ids = property(lambda self: self.samples[0].token_ids)
    text = property(lambda self: self.samples[0].text)
    finish_reason = property(lambda self: self.samples[0].finish_reason)
    token_times = property(lambda self: self.samples[0].token_times)
    logprobs = property(lambda self: self.samples[0].logprobs)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclasses.dataclass
class StreamDelta:
    """New output of one sample of one request since its previous delta."""

    index: int  # position of the request in the generate/stream call (request_id for add_request)
    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # of this sample
    time: float  # perf_counter when the tokens reached the host
    logprobs: list[dict[int, float]] | None = None  # one per token in token_ids, with logprobs=k
    sample: int = 0  # which of the request's n samples


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    out: RequestOutput
    seqs: list["_Seq"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Seq:
    """One sample of a request: the unit the scheduler places in a slot."""

    req: _Request
    index: int
    out: SampleOutput
    detok: object | None
    slot: int | None = None
    order: int = 0  # admission counter: larger = newer (preemption victims first)
    prefill_pos: int = 0  # prompt tokens in the pool (host mirror, exact)
    tokens: list[int] = dataclasses.field(default_factory=list)  # what admit got: prompt (+ output when resumed)
    forks: list["_Seq"] = dataclasses.field(default_factory=list)  # samples to fork after prefill (index 0 only)
    forked: bool = False  # for samples > 0: created from sample 0 (or on their own after a failed fork)
    pending: list[int] = dataclasses.field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    stopped: bool = False  # a stop string matched: later tokens are dropped, the slot is freed
    sent: int = 0  # characters of out.text already handed out in deltas

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    @property
    def prefill_len(self) -> int:
        """Tokens prefill writes: all but the last of what admit got (decode feeds that one)."""
        return len(self.tokens) - 1


def _decode_growth(cfg: EngineConfig, prompt_len: int, max_tokens: int, length: int, ntok: int) -> int:
    """Pages a sample may allocate in its next decode_steps tokens (an upper bound): it holds
    pages for max(ntok, length) positions (admit allocates the whole prompt of ntok tokens) and
    writes positions from max(length, ntok - 1), never past prompt_len - 1 + max_tokens."""
    start = max(length, ntok - 1)
    end = min(start + cfg.decode_steps, prompt_len - 1 + max_tokens, cfg.max_seq_len)
    return max(0, cfg.pages_for(end) - cfg.pages_for(max(ntok, length)))


def _admission_pages(cfg: EngineConfig, prompt_len: int, max_tokens: int, ntok: int, samples: int) -> int:
    """Pages an admission can take in its first step: the prompt's (no cache hit assumed), each
    extra sample's copied page, and every sample's decode growth."""
    g = _decode_growth(cfg, prompt_len, max_tokens, 0, ntok)
    return cfg.pages_for(ntok) + g + (samples - 1) * (1 + g)


class Engine:
    """Continuous-batching generation over the pure jitted steps.

    >>> engine = Engine(model, max_slots=4, page_size=16, num_pages=256, max_seq_len=512)
    >>> outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0.0))

    Prompts are token-id lists (used as given) or strings (need `tokenizer`; BOS is prepended
    when the tokenizer does not add it and `add_bos`). `decode_steps` decode steps run on device
    per host sync. `mode="static"` admits new requests only when every slot is empty.
    `prefill_chunk`: at most this many prompt tokens per slot per step (chunked prefill: a long
    prompt no longer stalls the running requests for its whole prefill); None = whole prompts.
    `prefix_caching`: reuse the KV pages of cached prompt prefixes (default: on, except with
    `batch_invariant`, since a cached page's K/V were computed in another request's batch).
    `batch_invariant`: prefill each prompt in a call of its own, so its computation never
    depends on what else was admitted with it (XLA's matmuls round differently for different row
    counts); with decode's fixed [max_slots] shape this makes a request's tokens and logprobs
    bitwise identical alone or in any batch (docs/architecture.md, "Batch invariance"). Costs
    prefill batching.
    """

    def __init__(
        self,
        model: Model,
        max_slots: int = 4,
        page_size: int = 16,
        num_pages: int = 256,
        max_seq_len: int = 512,
        *,
        tokenizer=None,
        prefill_buckets: Sequence[int] = (),
        max_prefill_batch: int = 0,
        decode_steps: int = 8,
        max_stop_ids: int = 4,
        attention_backend: str = "auto",
        max_logprobs: int = 5,
        mode: str = "continuous",
        seed: int | None = None,
        add_bos: bool = True,
        prefill_chunk: int | None = None,
        prefix_caching: bool | None = None,
        batch_invariant: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.mode = mode
        self.prefill_chunk = prefill_chunk
        self.batch_invariant = batch_invariant
        if prefix_caching is None:  # a cached page was computed in some other request's batch
            prefix_caching = not batch_invariant
        self.cfg = EngineConfig(
            max_slots=max_slots, page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len,
            prefill_buckets=tuple(prefill_buckets), max_prefill_batch=max_prefill_batch,
            max_stop_ids=max_stop_ids, decode_steps=decode_steps, attention_backend=attention_backend,
            max_logprobs=max_logprobs, prefix_caching=prefix_caching,
        )
        self.state = init_state(self.cfg, model.config, model.dtype)
        self.eos_ids = tuple(
            tokenizer.eos_ids if tokenizer is not None and tokenizer.eos_ids else model.config.eos_token_ids
        )
        self._seeds = np.random.default_rng(seed)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._slots: list[_Seq | None] = [None] * max_slots
        self._next_id = 0
        self._order = itertools.count()
        self._counters = collections.Counter()
        self._lengths = np.zeros(max_slots, np.int32)
        self._live: dict[int, _Request] = {}  # unfinished requests by id
        self._aborted: list[_Seq] = []  # aborted samples whose final delta is still due
        # First pages (token tuples) some request has prefilled, newest last: a prompt starting
        # with one is likely cached, so identical prompts in one admission batch need not wait.
        self._prefilled_keys: collections.OrderedDict[tuple, None] = collections.OrderedDict()

    # ------------------------------------------------------------------ requests
    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("a text prompt needs a tokenizer; pass token ids or Engine(tokenizer=...)")
            ids = list(self.tokenizer.encode(prompt))
            # Some tokenizer.json files (stories260K's, Llama 2's) do not add BOS although the
            # model was trained with it; make sure a text prompt starts with exactly one.
            bos = self.tokenizer.bos_id
            if self.add_bos and bos is not None and ids[:1] != [bos]:
                ids = [bos] + ids
            return ids
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise InvalidRequestError(f"a prompt must be a string or a sequence of ints, got {type(prompt).__name__}") from None
        if any(not float(t).is_integer() for t in prompt):
            raise InvalidRequestError("token ids must be integers")
        return ids

    @typing.no_type_check  # explicit validation below gives the user a specific message
    def _check(self, prompt, params) -> _Request:
        """Validate one request completely; raise InvalidRequestError without changing anything."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        params.validate(vocab, self.cfg.max_logprobs)
        ids = self._tokenize(prompt)
        cfg = self.cfg
        if not ids:
            raise InvalidRequestError("empty prompt: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) + 1 > cfg.max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; max_seq_len {cfg.max_seq_len} leaves room for prompts of "
                f"at most {cfg.max_seq_len - 1} tokens (one position is needed for a generated token)"
            )
        if params.n > cfg.max_slots:
            raise InvalidRequestError(f"SamplingParams.n = {params.n} exceeds the engine's max_slots ({cfg.max_slots})")
        stop_ids = tuple(dict.fromkeys([*(() if params.ignore_eos else self.eos_ids), *params.stop_token_ids]))
        if len(stop_ids) > cfg.max_stop_ids:
            raise InvalidRequestError(
                f"{len(stop_ids)} stop token ids (EOS included) exceed max_stop_ids={cfg.max_stop_ids}"
            )
        # One sample must fit the pool on its own (then preempting everything newer always lets
        # the oldest request progress), and all n samples must be admissible together.
        last = min(len(ids) - 1 + params.max_tokens, cfg.max_seq_len)
        worst = max(cfg.pages_for(last), _admission_pages(cfg, len(ids), params.max_tokens, len(ids), params.n))
        if worst > cfg.num_pages - 1:
            raise InvalidRequestError(
                f"request needs up to {worst} pages (prompt {len(ids)} + max_tokens {params.max_tokens}, "
                f"n={params.n}) but the pool has {cfg.num_pages - 1}; lower max_tokens or raise num_pages"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("SamplingParams.stop (stop strings) needs a tokenizer: Engine(tokenizer=...)")
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(0, 2**32)))
        params = dataclasses.replace(params, stop_token_ids=stop_ids)
        rid = self._next_id
        self._next_id += 1
        out = RequestOutput(rid, ids, [])
        req = _Request(rid, ids, params, stop_ids, out)
        for i in range(params.n):
            so = SampleOutput(i, [], "" if self.tokenizer is not None else None, None,
                              logprobs=[] if params.logprobs is not None else None)
            out.samples.append(so)
            detok = self.tokenizer.detokenizer(ids) if self.tokenizer is not None else None
            req.seqs.append(_Seq(req, i, so, detok))
        req.seqs[0].forks = req.seqs[1:]
        return req

    @typing.no_type_check  # explicit validation below gives the user a specific message
    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Bad input raises InvalidRequestError and leaves the
        engine (and every other request) untouched."""
        req = self._check(prompt, params if params is not None else SamplingParams())
        self._waiting.append(req.seqs[0])
        self._live[req.rid] = req
        return req.rid

    def abort(self, request_id: int) -> bool:
        """Stop a request (every sample) now: waiting samples leave the queue, running ones free
        their slots. Unfinished samples finish with reason "abort"; their final deltas come with
        the next `step()`. Returns False if the id is unknown or the request already finished."""
        req = self._live.get(request_id)
        if req is None:
            return False
        for seq in [q for q in self._waiting if q.req is req]:
            self._waiting.remove(seq)
        self._vacate(req.seqs)
        for seq in req.seqs:
            if not seq.finished:
                seq.out.finish_reason = "abort"
                self._aborted.append(seq)
        del self._live[request_id]
        return True

    def _vacate(self, seqs: list[_Seq]) -> None:
        """Take `seqs` out of their slots (reserved or running); the running ones are evicted on
        device (dispatched, not waited for)."""
        mask = np.zeros(self.cfg.max_slots, bool)
        for s, occupant in enumerate(self._slots):
            if occupant is not None and any(occupant is q for q in seqs):
                self._slots[s] = None
                mask[s] = occupant.slot is not None
                occupant.slot = None
        if mask.any():
            self.state = evict_jit(self.cfg, self.state, jnp.asarray(mask))

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots) or bool(self._aborted)

    # ------------------------------------------------------------------ scheduling
    def _growth(self, seq: _Seq, length: int) -> int:
        return _decode_growth(self.cfg, len(seq.req.prompt), seq.req.params.max_tokens, length, len(seq.tokens))

    def _need(self) -> int:
        """Pages the occupied slots may allocate this step (forks included)."""
        need = 0
        for s, seq in enumerate(self._slots):
            if seq is None:
                continue
            if seq.slot is None:  # reserved for a fork: one copied page + its own decode
                need += 1 + self._growth(seq, 0)
            else:
                need += self._growth(seq, int(self._lengths[s]))
        return need

    def _preempt(self, free: int) -> int:
        """Evict the newest slots until the running ones' next chunk fits; returns the new
        free-page count."""
        while self._need() > free:
            live = [q for q in self._slots if q is not None and q.slot is not None]
            if not live:
                break
            victim = max(live, key=lambda q: q.order)
            # Samples not forked yet hold only reserved slots: they requeue with sample 0.
            self._vacate([victim] + [f for f in victim.forks if not f.forked])
            self._counters["preemptions"] += 1
            self._waiting.appendleft(victim)  # the oldest waiting work: resumed first
            free = int(num_free_pages_jit(self.state))
        return free

    def _admit(self, free: int) -> list[_Seq]:
        cfg = self.cfg
        free_slots = [i for i, r in enumerate(self._slots) if r is None]
        if self.mode == "static" and len(free_slots) < cfg.max_slots:
            return []
        budget = free - self._need()
        batch: list[_Seq] = []
        first_pages: set[tuple] = set()
        deferred = []
        while self._waiting and len(batch) < cfg.max_prefill_batch:
            seq = self._waiting[0]
            tokens = seq.req.prompt + seq.out.token_ids  # a resumed sample re-enters with its output
            samples = 1 + sum(not f.forked for f in seq.forks)
            if samples > len(free_slots):
                break
            cost = _admission_pages(cfg, len(seq.req.prompt), seq.req.params.max_tokens, len(tokens), samples)
            if cost > budget:
                break  # FIFO: wait for pages rather than let later requests overtake
            self._waiting.popleft()
            key = tuple(tokens[: cfg.page_size])
            if (cfg.prefix_caching and len(tokens) > cfg.page_size and key in first_pages
                    and key not in self._prefilled_keys):
                deferred.append(seq)  # admitted next step, reusing the pages this one caches
                continue
            first_pages.add(key)
            budget -= cost
            seq.tokens = tokens
            seq.slot = free_slots.pop(0)
            self._slots[seq.slot] = seq
            if samples > 1:
                for f in seq.forks:
                    if not f.forked:
                        f.tokens = tokens
                        self._slots[free_slots.pop(0)] = f  # reserved; f.slot is set by the fork
            batch.append(seq)
        self._waiting.extendleft(reversed(deferred))
        return batch

    def step(self) -> list[StreamDelta]:
        """One scheduling iteration (see the module docstring); returns the new output."""
        cfg = self.cfg
        free, self._lengths = jax.device_get((num_free_pages_jit(self.state), self.state.length))
        free = self._preempt(int(free))
        batch = self._admit(free)
        if batch:
            self._run_admit(batch)
        pre, forks = self._run_prefill()
        dec = None
        if any(q is not None for q in self._slots):
            self.state, dec = decode_steps_jit(cfg, self.model, self.state, cfg.decode_steps)
        pre_res, fork_ok, dec, finished, reason = jax.device_get(
            ([r for r, _ in pre], [ok for _, ok in forks], dec, self.state.active & self.state.finished,
             self.state.finish_reason)
        )
        now = time.perf_counter()
        touched: dict[int, _Seq] = {id(q): q for q in self._aborted}
        self._aborted = []
        for res, (_, rows) in zip(pre_res, pre):
            self._collect_prefill(res, rows)
        for (seq, _), ok in zip(forks, fork_ok):
            if not ok[0]:  # no page for the copy (cannot happen with the accounting): retry later
                self._vacate([seq])
                self._waiting.appendleft(seq)
        if dec is not None:
            for t in range(dec.token.shape[0]):
                for s in np.nonzero(dec.emitted[t])[0]:
                    self._emit(self._slots[s], int(dec.token[t, s]), now, touched,
                               (dec.logprob[t, s], dec.top_ids[t, s], dec.top_logprobs[t, s]))
        mask = np.zeros(cfg.max_slots, bool)
        for s, seq in enumerate(self._slots):
            if seq is not None and seq.slot is not None and (finished[s] or seq.stopped):
                # A stop string wins over whatever the device decided later in the same chunk.
                seq.out.finish_reason = "stop" if seq.stopped else FINISH_REASONS[int(reason[s])]
                self._slots[s] = None
                seq.slot = None
                mask[s] = True
                touched[id(seq)] = seq
        if mask.any():  # dispatched asynchronously; the next step's work queues behind it
            # An explicit mask (always, so evict compiles once): a slot stopped by a stop string
            # is still running on device and is freed here like a finished one.
            self.state = evict_jit(cfg, self.state, jnp.asarray(mask))
        for seq in touched.values():
            if seq.req.out.finished:
                self._live.pop(seq.req.rid, None)
        return [self._delta(seq, now) for seq in touched.values()]

    def _run_admit(self, batch: list[_Seq]) -> None:
        cfg = self.cfg
        seq_len = cfg.prefill_bucket(max(len(q.tokens) for q in batch))
        reqs = make_requests(
            cfg, [q.tokens for q in batch],
            # Resumed with output: its prompt logprobs were delivered already.
            [q.req.params if not q.out.token_ids else dataclasses.replace(q.req.params, prompt_logprobs=None)
             for q in batch],
            [q.req.rid for q in batch], cfg.batch_bucket(len(batch)), seq_len,
            num_generated=[len(q.out.token_ids) for q in batch], sample_index=[q.index for q in batch],
            slots=[q.slot for q in batch],
        )
        self.state, res = admit_jit(cfg, self.state, reqs)
        res = jax.device_get(res)
        for row, q in enumerate(batch):
            if not res.accepted[row]:  # cannot happen with the accounting above; requeue
                self._vacate([q] + [f for f in q.forks if not f.forked])
                self._waiting.appendleft(q)
                continue
            q.order = next(self._order)
            q.prefill_pos = int(res.cached[row])
            self._counters["prompt_tokens"] += len(q.tokens)
            self._counters["cached_tokens"] += int(res.cached[row])
            if q.req.params.prompt_logprobs is not None and q.req.out.prompt_logprobs is None:
                q.req.out.prompt_logprobs = [None] * len(q.req.prompt)

    def _run_prefill(self):
        """One chunk for every prefilling slot (oldest first, max_prefill_batch rows), then the
        forks of the requests whose prefill completes with it."""
        cfg = self.cfg
        rows = sorted((q for q in self._slots if q is not None and q.slot is not None and q.prefill_pos < q.prefill_len),
                      key=lambda q: q.order)[: cfg.max_prefill_batch]
        pre = []
        groups = [[q] for q in rows] if self.batch_invariant else ([rows] if rows else [])
        for rows in groups:
            limit = self.prefill_chunk or cfg.max_seq_len
            n = [min(q.prefill_len - q.prefill_pos, limit) for q in rows]
            b, t = cfg.batch_bucket(len(rows)), cfg.prefill_bucket(max(n))
            tokens = np.zeros((b, t), np.int32)
            slot = np.full((b,), cfg.max_slots, np.int32)
            nn, look, plp = np.zeros((b,), np.int32), np.zeros((b,), np.int32), np.full((b,), -1, np.int32)
            for i, (q, k) in enumerate(zip(rows, n)):
                tokens[i, :k] = q.tokens[q.prefill_pos: q.prefill_pos + k]
                slot[i], nn[i], look[i] = q.slot, k, q.tokens[q.prefill_pos + k]
                if q.req.out.prompt_logprobs is not None and not q.out.token_ids:
                    plp[i] = min(q.req.params.prompt_logprobs, cfg.max_logprobs)
            self.state, res = prefill_jit(cfg, self.model, self.state,
                                          Chunk(slot=slot, tokens=tokens, n=nn, lookahead=look, prompt_logprobs=plp))
            pre.append((res, [(q, q.prefill_pos, k) for q, k in zip(rows, n)]))
            for q, k in zip(rows, n):
                q.prefill_pos += k
                self._counters["prefill_tokens"] += k
                if q.prefill_pos >= cfg.page_size:
                    self._prefilled_keys[tuple(q.tokens[: cfg.page_size])] = None
                    self._prefilled_keys.move_to_end(tuple(q.tokens[: cfg.page_size]))
                    if len(self._prefilled_keys) > 4096:
                        self._prefilled_keys.popitem(last=False)
        forks = []
        for q in list(self._slots):
            if q is None or q.slot is None or q.index != 0 or q.prefill_pos < q.prefill_len:
                continue
            for f in q.forks:
                if not f.forked and f in self._slots:
                    s = self._slots.index(f)
                    self.state, ok = fork_jit(cfg, self.state, jnp.asarray([q.slot], jnp.int32), jnp.asarray([s], jnp.int32),
                                              jnp.asarray(sample_key(q.req.params.seed, f.index)[None]))
                    f.slot, f.order, f.forked = s, next(self._order), True
                    f.tokens, f.prefill_pos = q.tokens, q.prefill_len
                    forks.append((f, ok))
        return pre, forks

    def _collect_prefill(self, res, rows) -> None:
        for i, (q, start, k) in enumerate(rows):
            plp = q.req.out.prompt_logprobs
            if plp is None or q.out.token_ids:
                continue
            top = min(q.req.params.prompt_logprobs, self.cfg.max_logprobs)
            for c in range(k):
                p = start + c + 1
                if p < len(q.req.prompt):
                    plp[p] = _logprob_dict(q.tokens[p], res.prompt_logprob[i, c], res.prompt_top_ids[i, c],
                                           res.prompt_top_logprobs[i, c], top)

    def _emit(self, seq: _Seq, token: int, now: float, touched: dict, lp=None) -> None:
        if seq.stopped:  # decoded after a stop string in the same chunk: not part of the output
            return
        seq.out.token_ids.append(token)
        seq.out.token_times.append(now)
        seq.pending.append(token)
        params = seq.req.params
        if params.logprobs is not None and lp is not None:
            entry = _logprob_dict(token, *lp, params.logprobs)
            seq.out.logprobs.append(entry)
            seq.pending_logprobs.append(entry)
        touched[id(seq)] = seq
        if seq.detok is not None:
            # One token at a time (the detokenizer does that internally anyway), so a stop string
            # is attributed to the token that completed it.
            self._add_text(seq, seq.detok.push([token]))

    def _add_text(self, seq: _Seq, new: str) -> None:
        if not new:
            return
        seq.out.text += new
        stop = seq.req.params.stop
        if stop:
            text = seq.out.text
            # Only a match overlapping the new characters is new (vLLM's search window).
            hits = [i for st in stop if (i := text.find(st, max(0, len(text) - len(new) - len(st) + 1))) >= 0]
            if hits:
                seq.out.text = text[: min(hits)]  # include_stop_str_in_output=False, as vLLM
                seq.stopped = True

    def _delta(self, seq: _Seq, now: float) -> StreamDelta:
        text = ""
        stop = seq.req.params.stop
        if seq.detok is not None:
            done = seq.out.finish_reason is not None
            if done and not seq.stopped:
                self._add_text(seq, seq.detok.flush())
            # While running, hold back the last (longest stop string - 1) characters: they may
            # be the start of a stop string that must never be shown.
            hold = 0 if done or not stop else max(map(len, stop)) - 1
            end = max(seq.sent, len(seq.out.text) - hold)
            text, seq.sent = seq.out.text[seq.sent:end], end
        lps = seq.pending_logprobs if seq.req.params.logprobs is not None else None
        rid = seq.req.rid
        delta = StreamDelta(rid, rid, seq.pending, text, seq.out.finish_reason, now, lps, seq.index)
        seq.pending, seq.pending_logprobs = [], []
        return delta

    # ------------------------------------------------------------------ user API
    @typing.no_type_check  # explicit validation below gives the user a specific message
    def _add_all(self, prompts, params) -> list[_Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise InvalidRequestError("prompts must be a list of prompts (strings or token-id lists)")
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        # Validate everything first: a bad request rejects the call before any request is queued.
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                reqs.append(self._check(p, sp))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"request {i}: {e}") from None
        self._waiting.extend(r.seqs[0] for r in reqs)
        self._live.update((r.rid, r) for r in reqs)
        return reqs

    def stream(self, prompts, params=None) -> Iterator[StreamDelta]:
        """Yield per-sample deltas as soon as tokens reach the host. `delta.index` is the
        prompt's position in `prompts`, `delta.sample` the sample (n > 1)."""
        reqs = self._add_all(prompts, params)
        index = {r.rid: i for i, r in enumerate(reqs)}
        by_id = {r.rid: r for r in reqs}
        remaining = set(index)
        while remaining:
            for d in self.step():
                if d.request_id in index:
                    if by_id[d.request_id].out.finished:
                        remaining.discard(d.request_id)
                    yield dataclasses.replace(d, index=index[d.request_id])

    def generate(self, prompts, params=None) -> list[RequestOutput]:
        """Run the prompts to completion; outputs in prompt order."""
        reqs = self._add_all(prompts, params)
        while not all(r.out.finished for r in reqs):
            self.step()
        return [r.out for r in reqs]

    def run_until_idle(self) -> None:
        while self.has_unfinished():
            self.step()

    def stats(self) -> dict:
        """Pool and scheduler counters. pages_free counts every page an allocation may take
        (including cached ones, which it evicts last); pages_cached counts registered full pages,
        in use or not. prefix_cache_hit_rate = prompt tokens reused / prompt tokens admitted."""
        refcount, cached = jax.device_get((self.state.alloc.refcount, self.state.alloc.cached))
        c = self._counters
        return {
            "pages_total": self.cfg.num_pages - 1,
            "pages_used": int(np.sum(refcount[1:] > 0)),
            "pages_free": int(np.sum(refcount[1:] == 0)),
            "pages_cached": int(np.sum(cached[1:])),
            "pages_cached_free": int(np.sum(cached[1:] & (refcount[1:] == 0))),
            "prompt_tokens": c["prompt_tokens"],
            "prefix_cache_hit_tokens": c["cached_tokens"],
            "prefix_cache_hit_rate": c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0,
            "prefill_tokens": c["prefill_tokens"],
            "preemptions": c["preemptions"],
            "running": sum(q is not None for q in self._slots),
            "waiting": len(self._waiting),
        }


def _logprob_dict(token: int, logprob, top_ids, top_logprobs, k: int) -> dict[int, float]:
    """vLLM's per-token logprobs entry: the token itself plus the top k, id -> logprob."""
    entry = {int(i): float(v) for i, v in zip(top_ids[:k], top_logprobs[:k])}
    entry.setdefault(int(token), float(logprob))
    return entry
