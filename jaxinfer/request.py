"""One request's host-side life: validation and tokenizing, its `n` samples (each a `Sequence`,
the unit the scheduler places in a slot), token hand-out, stop-string matching on the
detokenized text, the stream hold-back, and the outputs the user sees (`RequestOutput`,
`SampleOutput`, `StreamDelta`).

Nothing here touches the device: the engine passes in what a step produced.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing

import numpy as np

from jaxinfer import structured
from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import EngineConfig


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
class Request:
    """A validated request: its prompt ids, its settings (seed drawn, EOS in stop_token_ids), its
    output, and one Sequence per sample."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    out: RequestOutput
    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    consumer: object | None = None  # the engine's stream()/generate() call that receives its deltas
    # Structured output: the compiled constraint (jaxinfer/structured.py), None when unconstrained.
    constraint: structured.Automaton | None = None


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of a request: the token sequence the scheduler places in a slot."""

    req: Request
    index: int
    out: SampleOutput
    detok: object | None
    slot: int | None = None
    order: int = 0  # admission counter: larger = newer (preemption victims first)
    prefill_pos: int = 0  # prompt tokens in the pool (host mirror, exact)
    tokens: list[int] = dataclasses.field(default_factory=list)  # what admit got: prompt (+ output when resumed)
    forks: list[Sequence] = dataclasses.field(default_factory=list)  # samples to fork after prefill (index 0 only)
    forked: bool = False  # for samples > 0: created from sample 0 (or on their own after a failed fork)
    pending: list[int] = dataclasses.field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    stopped: bool = False  # a stop string matched: later tokens are dropped, the slot is freed
    sent: int = 0  # characters of out.text already handed out in deltas
    # Structured output: the constraint-table entry this sample holds while in a slot; with the
    # host-mask fallback also its automaton state (outlines-core's id) and what was last loaded.
    grammar_entry: int | None = None
    host_state: int | None = None
    host_loaded: tuple | None = None

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    @property
    def prefill_len(self) -> int:
        """Tokens prefill writes: all but the last of what admit got (decode feeds that one)."""
        return len(self.tokens) - 1

    @property
    def resume_tokens(self) -> list[int]:
        """What admission feeds: the prompt, plus the output so far for a preempted sample."""
        return self.req.prompt + self.out.token_ids

    def append_token(self, token: int, now: float, lp=None) -> None:
        """Hand one decoded token to this sample (`lp`: the step's (logprob, top ids, top
        logprobs) for it). Tokens decoded after a stop string in the same chunk are dropped."""
        if self.stopped:
            return
        self.out.token_ids.append(token)
        self.out.token_times.append(now)
        self.pending.append(token)
        params = self.req.params
        if params.logprobs is not None and lp is not None:
            entry = logprob_dict(token, *lp, params.logprobs)
            self.out.logprobs.append(entry)
            self.pending_logprobs.append(entry)
        if self.detok is not None:
            # One token at a time (the detokenizer does that internally anyway), so a stop string
            # is attributed to the token that completed it.
            self._add_text(self.detok.push([token]))

    def _add_text(self, new: str) -> None:
        if not new:
            return
        self.out.text += new
        stop = self.req.params.stop
        if stop:
            text = self.out.text
            # Only a match overlapping the new characters is new (vLLM's search window).
            hits = [i for st in stop if (i := text.find(st, max(0, len(text) - len(new) - len(st) + 1))) >= 0]
            if hits:
                self.out.text = text[: min(hits)]  # include_stop_str_in_output=False, as vLLM
                self.stopped = True

    def take_delta(self, now: float) -> StreamDelta:
        """Everything new since the last delta. While running, the last (longest stop string - 1)
        characters are held back: they may be the start of a stop string that must never show."""
        text = ""
        stop = self.req.params.stop
        if self.detok is not None:
            if self.finished and not self.stopped:
                self._add_text(self.detok.flush())
            hold = 0 if self.finished or not stop else max(map(len, stop)) - 1
            end = max(self.sent, len(self.out.text) - hold)
            text, self.sent = self.out.text[self.sent:end], end
        lps = self.pending_logprobs if self.req.params.logprobs is not None else None
        rid = self.req.rid
        delta = StreamDelta(rid, rid, self.pending, text, self.out.finish_reason, now, lps, self.index)
        self.pending, self.pending_logprobs = [], []
        return delta

    def record_prompt_logprobs(self, start: int, n: int, logprob, top_ids, top_logprobs, top: int) -> None:
        """Prompt scores of one prefill chunk at positions [start, start + n): column c scores
        prompt token start + c + 1 given the tokens before it."""
        plp = self.req.out.prompt_logprobs
        for c in range(n):
            p = start + c + 1
            if p < len(self.req.prompt):
                plp[p] = logprob_dict(self.tokens[p], logprob[c], top_ids[c], top_logprobs[c], top)


def logprob_dict(token: int, logprob, top_ids, top_logprobs, k: int) -> dict[int, float]:
    """vLLM's per-token logprobs entry: the token itself plus the top k, id -> logprob."""
    entry = {int(i): float(v) for i, v in zip(top_ids[:k], top_logprobs[:k])}
    entry.setdefault(int(token), float(logprob))
    return entry


def tokenize(prompt, tokenizer, add_bos: bool) -> list[int]:
    """Token ids of a prompt: a `str` (encoded; BOS prepended when the tokenizer does not add it
    and `add_bos`), or a list / tuple / 1-D integer NumPy array of integer ids (used as given;
    NumPy integer scalars are fine). Anything else is an InvalidRequestError naming what it got:
    bytes (a byte string is not a token list, even though it iterates as ints), dicts, sets,
    bools or numeric strings inside a token list, non-integral or float ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError("a text prompt needs a tokenizer; pass token ids or Engine(tokenizer=...)")
        ids = list(tokenizer.encode(prompt))
        # Some tokenizer.json files (stories260K's, Llama 2's) do not add BOS although the
        # model was trained with it; make sure a text prompt starts with exactly one.
        bos = tokenizer.bos_id
        if add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not (np.issubdtype(prompt.dtype, np.integer) or prompt.size == 0):
            raise InvalidRequestError(
                f"a token-id array prompt must be 1-D of an integer dtype, got {prompt.dtype}{list(prompt.shape)}")
        return [int(t) for t in prompt]
    if not isinstance(prompt, (list, tuple)):
        raise InvalidRequestError(
            f"a prompt must be a string or a list of integer token ids, got {type(prompt).__name__}")
    for i, t in enumerate(prompt):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
            raise InvalidRequestError(
                f"token ids must be integers: position {i} of the prompt is {t!r} ({type(t).__name__})")
    return [int(t) for t in prompt]


@typing.no_type_check  # explicit validation below gives the user a specific message
def make_request(rid: int, prompt, params, *, cfg: EngineConfig, vocab_size: int, tokenizer, add_bos: bool,
                 eos_ids: tuple[int, ...], seeds: np.random.Generator) -> Request:
    """Validate one request completely and build it; raises InvalidRequestError (changing nothing)
    for anything the engine could not serve exactly as asked."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    params.validate(vocab_size, cfg.max_logprobs)
    ids = tokenize(prompt, tokenizer, add_bos)
    if not ids:
        raise InvalidRequestError("empty prompt: at least one token is needed")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) + 1 > cfg.max_seq_len:
        raise InvalidRequestError(
            f"prompt has {len(ids)} tokens; max_seq_len {cfg.max_seq_len} leaves room for prompts of "
            f"at most {cfg.max_seq_len - 1} tokens (one position is needed for a generated token)"
        )
    if params.n > cfg.max_slots:
        raise InvalidRequestError(f"SamplingParams.n = {params.n} exceeds the engine's max_slots ({cfg.max_slots})")
    stop_ids = tuple(dict.fromkeys([*(() if params.ignore_eos else eos_ids), *params.stop_token_ids]))
    if len(stop_ids) > cfg.max_stop_ids:
        raise InvalidRequestError(f"{len(stop_ids)} stop token ids (EOS included) exceed max_stop_ids={cfg.max_stop_ids}")
    worst = cfg.request_pages(len(ids), params.max_tokens, params.n)
    if worst > cfg.num_pages - 1:
        raise InvalidRequestError(
            f"request needs up to {worst} pages (prompt {len(ids)} + max_tokens {params.max_tokens}, "
            f"n={params.n}) but the pool has {cfg.num_pages - 1}; lower max_tokens or raise num_pages"
        )
    if params.stop and tokenizer is None:
        raise InvalidRequestError("SamplingParams.stop (stop strings) needs a tokenizer: Engine(tokenizer=...)")
    if params.seed is None:
        params = dataclasses.replace(params, seed=int(seeds.integers(0, 2**32)))
    params = dataclasses.replace(params, stop_token_ids=stop_ids)
    constraint = None
    if params.constraint is not None:
        constraint = structured.compile_constraint(*params.constraint, tokenizer, vocab_size, eos_ids)
    out = RequestOutput(rid, ids, [])
    req = Request(rid, ids, params, out, constraint=constraint)
    for i in range(params.n):
        sample = SampleOutput(i, [], "" if tokenizer is not None else None, None,
                              logprobs=[] if params.logprobs is not None else None)
        out.samples.append(sample)
        req.seqs.append(Sequence(req, i, sample, tokenizer.detokenizer(ids) if tokenizer is not None else None))
    req.seqs[0].forks = req.seqs[1:]
    return req
