"""Host side: a request queue in front of the pure steps (continuous or static batching).

One `Engine.step()`:
1. admit waiting requests FIFO while a slot is free and the pool can hold the request's worst
   case (prompt + max_tokens pages; so decode never runs out of pages and nothing is
   preempted), and prefill them with one `insert` padded to a (batch, length) bucket,
2. run `decode_steps` decode steps on device,
3. fetch the insert and decode outputs in ONE device-to-host transfer and hand out tokens,
4. match stop strings on the detokenized text (host side; a match finishes the request with
   "stop", its text cut right before the stop string and later tokens dropped),
5. evict the slots that finished on device or by a stop string (one jitted call with a slot
   mask, dispatched without waiting).
In "static" mode step 2 only admits when every slot is empty (fill a batch, run it out).

Compilations: `insert` once per (batch bucket, prefill bucket) pair actually used, `decode_steps`
and `evict` once each. Nothing else touches the device from the host loop.
"""

from __future__ import annotations

import collections
import dataclasses
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
from jaxinfer.steps import decode_steps_jit, evict_jit, insert_jit, make_requests

MODES = ("continuous", "static")


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only; a stop token that ended the request is included
    text: str | None  # None without a tokenizer; special tokens are not rendered
    finish_reason: str | None  # "stop", "length", "abort" (pool exhausted), None while running
    token_times: list[float] = dataclasses.field(default_factory=list)  # perf_counter per token
    # With SamplingParams.logprobs=k: per generated token {token_id: logprob} for the token
    # itself and the top k, of the raw model distribution (before penalties / temperature).
    logprobs: list[dict[int, float]] | None = None
    # With prompt_logprobs=k: per prompt token the same, given the tokens before it (None for
    # the first, which has no prefix).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class StreamDelta:
    """New output of one request since its previous delta."""

    index: int  # position of the request in the generate/stream call (request_id for add_request)
    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    time: float  # perf_counter when the tokens reached the host
    logprobs: list[dict[int, float]] | None = None  # one per token in token_ids, with logprobs=k


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    reserve: int  # pages reserved for the worst case
    out: RequestOutput
    detok: object | None
    pending: list[int] = dataclasses.field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    stopped: bool = False  # a stop string matched: later tokens are dropped, the slot is freed
    sent: int = 0  # characters of out.text already handed out in deltas


class Engine:
    """Continuous-batching generation over the pure jitted steps.

    >>> engine = Engine(model, max_slots=4, page_size=16, num_pages=256, max_seq_len=512)
    >>> outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0.0))

    Prompts are token-id lists (used as given) or strings (need `tokenizer`; BOS is prepended
    when the tokenizer does not add it and `add_bos`). `decode_steps` decode steps run on device
    per host sync. `mode="static"` admits new requests only when every slot is empty.
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
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.mode = mode
        self.cfg = EngineConfig(
            max_slots=max_slots, page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len,
            prefill_buckets=tuple(prefill_buckets), max_prefill_batch=max_prefill_batch,
            max_stop_ids=max_stop_ids, decode_steps=decode_steps, attention_backend=attention_backend,
            max_logprobs=max_logprobs,
        )
        self.state = init_state(self.cfg, model.config, model.dtype)
        self.eos_ids = tuple(
            tokenizer.eos_ids if tokenizer is not None and tokenizer.eos_ids else model.config.eos_token_ids
        )
        self._seeds = np.random.default_rng(seed)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._slots: list[_Request | None] = [None] * max_slots
        self._reserved = 0
        self._next_id = 0

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
        stop_ids = tuple(dict.fromkeys([*(() if params.ignore_eos else self.eos_ids), *params.stop_token_ids]))
        if len(stop_ids) > cfg.max_stop_ids:
            raise InvalidRequestError(
                f"{len(stop_ids)} stop token ids (EOS included) exceed max_stop_ids={cfg.max_stop_ids}"
            )
        reserve = cfg.pages_for(min(len(ids) + params.max_tokens, cfg.max_seq_len))
        if reserve > cfg.num_pages - 1:
            raise InvalidRequestError(
                f"request needs up to {reserve} pages (prompt {len(ids)} + max_tokens {params.max_tokens}) but "
                f"the pool has {cfg.num_pages - 1}; lower max_tokens or raise num_pages"
            )
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(0, 2**32)))
        params = dataclasses.replace(params, stop_token_ids=stop_ids)
        rid = self._next_id
        self._next_id += 1
        detok = self.tokenizer.detokenizer(ids) if self.tokenizer is not None else None
        if params.stop and detok is None:
            raise InvalidRequestError("SamplingParams.stop (stop strings) needs a tokenizer: Engine(tokenizer=...)")
        out = RequestOutput(rid, ids, [], "" if detok is not None else None, None,
                            logprobs=[] if params.logprobs is not None else None)
        return _Request(rid, ids, params, stop_ids, reserve, out, detok)

    @typing.no_type_check  # explicit validation below gives the user a specific message
    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Bad input raises InvalidRequestError and leaves the
        engine (and every other request) untouched."""
        req = self._check(prompt, params if params is not None else SamplingParams())
        self._waiting.append(req)
        return req.rid

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> list[_Request]:
        cfg = self.cfg
        free = [i for i, r in enumerate(self._slots) if r is None]
        if self.mode == "static" and len(free) < cfg.max_slots:
            return []
        batch: list[_Request] = []
        while self._waiting and len(batch) < min(len(free), cfg.max_prefill_batch):
            req = self._waiting[0]
            if self._reserved + req.reserve > cfg.num_pages - 1:
                break  # FIFO: wait for pages rather than let later requests overtake
            self._waiting.popleft()
            self._reserved += req.reserve
            batch.append(req)
        return batch

    def step(self) -> list[StreamDelta]:
        """One scheduling iteration (admit + insert, decode_steps, evict); returns new output."""
        cfg = self.cfg
        batch = self._admit()
        ins = None
        if batch:
            seq = cfg.prefill_bucket(max(len(r.prompt) for r in batch))
            reqs = make_requests(cfg, [r.prompt for r in batch], [r.params for r in batch],
                                 [r.rid for r in batch], cfg.batch_bucket(len(batch)), seq)
            self.state, ins = insert_jit(cfg, self.model, self.state, reqs)
        dec = None
        if batch or any(r is not None for r in self._slots):
            self.state, dec = decode_steps_jit(cfg, self.model, self.state, cfg.decode_steps)
        ins, dec, finished, reason = jax.device_get(
            (ins, dec, self.state.active & self.state.finished, self.state.finish_reason)
        )
        now = time.perf_counter()
        touched: dict[int, _Request] = {}
        evict = False
        if ins is not None:
            for row, req in enumerate(batch):
                if not ins.accepted[row]:  # cannot happen with the reservations above; requeue
                    self._reserved -= req.reserve
                    self._waiting.appendleft(req)
                    continue
                self._slots[int(ins.slot[row])] = req
                if req.params.prompt_logprobs is not None:
                    req.out.prompt_logprobs = [None] + [
                        _logprob_dict(req.prompt[i], ins.prompt_logprob[row, i], ins.prompt_top_ids[row, i],
                                      ins.prompt_top_logprobs[row, i], req.params.prompt_logprobs)
                        for i in range(1, len(req.prompt))
                    ]
                self._emit(req, int(ins.token[row]), now, touched,
                           (ins.logprob[row], ins.top_ids[row], ins.top_logprobs[row]))
        if dec is not None:
            for t in range(dec.token.shape[0]):
                for s in np.nonzero(dec.emitted[t])[0]:
                    self._emit(self._slots[s], int(dec.token[t, s]), now, touched,
                               (dec.logprob[t, s], dec.top_ids[t, s], dec.top_logprobs[t, s]))
        mask = np.zeros(cfg.max_slots, bool)
        for s, req in enumerate(self._slots):
            if req is not None and (finished[s] or req.stopped):
                # A stop string wins over whatever the device decided later in the same chunk.
                req.out.finish_reason = "stop" if req.stopped else FINISH_REASONS[int(reason[s])]
                self._slots[s] = None
                self._reserved -= req.reserve
                mask[s] = evict = True
                touched[req.rid] = req
        if evict:  # dispatched asynchronously; the next step's work queues behind it
            # An explicit mask (always, so evict compiles once): a slot stopped by a stop string
            # is still running on device and is freed here like a finished one.
            self.state = evict_jit(cfg, self.state, jnp.asarray(mask))
        return [self._delta(req, now) for req in touched.values()]

    def _emit(self, req: _Request, token: int, now: float, touched: dict, lp=None) -> None:
        if req.stopped:  # decoded after a stop string in the same chunk: not part of the output
            return
        req.out.token_ids.append(token)
        req.out.token_times.append(now)
        req.pending.append(token)
        if req.params.logprobs is not None and lp is not None:
            entry = _logprob_dict(token, *lp, req.params.logprobs)
            req.out.logprobs.append(entry)
            req.pending_logprobs.append(entry)
        touched[req.rid] = req
        if req.detok is not None:
            # One token at a time (the detokenizer does that internally anyway), so a stop string
            # is attributed to the token that completed it.
            self._add_text(req, req.detok.push([token]))

    def _add_text(self, req: _Request, new: str) -> None:
        if not new:
            return
        req.out.text += new
        if req.params.stop:
            text = req.out.text
            # Only a match overlapping the new characters is new (vLLM's search window).
            hits = [i for st in req.params.stop
                    if (i := text.find(st, max(0, len(text) - len(new) - len(st) + 1))) >= 0]
            if hits:
                req.out.text = text[: min(hits)]  # include_stop_str_in_output=False, as vLLM
                req.stopped = True

    def _delta(self, req: _Request, now: float) -> StreamDelta:
        text = ""
        if req.detok is not None:
            done = req.out.finish_reason is not None
            if done and not req.stopped:
                self._add_text(req, req.detok.flush())
            # While running, hold back the last (longest stop string - 1) characters: they may
            # be the start of a stop string that must never be shown.
            hold = 0 if done or not req.params.stop else max(map(len, req.params.stop)) - 1
            end = max(req.sent, len(req.out.text) - hold)
            text, req.sent = req.out.text[req.sent:end], end
        lps = req.pending_logprobs if req.params.logprobs is not None else None
        delta = StreamDelta(req.rid, req.rid, req.pending, text, req.out.finish_reason, now, lps)
        req.pending, req.pending_logprobs = [], []
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
        self._waiting.extend(reqs)
        return reqs

    def stream(self, prompts, params=None) -> Iterator[StreamDelta]:
        """Yield per-request deltas as soon as tokens reach the host. `delta.index` is the
        prompt's position in `prompts`."""
        reqs = self._add_all(prompts, params)
        index = {r.rid: i for i, r in enumerate(reqs)}
        remaining = set(index)
        while remaining:
            for d in self.step():
                if d.request_id in index:
                    if d.finish_reason is not None:
                        remaining.discard(d.request_id)
                    yield dataclasses.replace(d, index=index[d.request_id])

    def generate(self, prompts, params=None) -> list[RequestOutput]:
        """Run the prompts to completion; outputs in prompt order."""
        reqs = self._add_all(prompts, params)
        pending = {r.rid for r in reqs}
        while pending:
            for d in self.step():
                if d.finish_reason is not None:
                    pending.discard(d.request_id)
        return [r.out for r in reqs]

    def run_until_idle(self) -> None:
        while self.has_unfinished():
            self.step()

    def stats(self) -> dict:
        refcount = np.asarray(self.state.page_refcount)
        return {
            "pages_total": self.cfg.num_pages - 1,
            "pages_used": int(np.sum(refcount[1:] > 0)),
            "pages_free": int(np.sum(refcount[1:] == 0)),
            "pages_reserved": self._reserved,
            "running": sum(r is not None for r in self._slots),
            "waiting": len(self._waiting),
        }


def _logprob_dict(token: int, logprob, top_ids, top_logprobs, k: int) -> dict[int, float]:
    """vLLM's per-token logprobs entry: the token itself plus the top k, id -> logprob."""
    entry = {int(i): float(v) for i, v in zip(top_ids[:k], top_logprobs[:k])}
    entry.setdefault(int(token), float(logprob))
    return entry
