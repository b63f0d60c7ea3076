"""Host side: an `Engine` puts a continuous-batching scheduler (jaxinfer/scheduler.py) in front
of the pure jitted steps (jaxinfer/steps.py); each request's host-side life is
jaxinfer/request.py.

One `Engine.step()` is schedule -> run -> hand out:
1. schedule: read the pool's free-page count and the slot lengths (one small device->host
   transfer); preempt the newest requests while the running slots' next `decode_steps` tokens
   could need more pages than are free (a resumed request re-prefills prompt + output so far,
   mostly prefix-cache hits, and continues exactly where it stopped); admit waiting requests
   FIFO while slots and pages allow;
2. run: `admit` the new requests (one more small transfer: how much of each prompt was cached),
   `prefill` one chunk per prefilling slot (`prefill_chunk` tokens, or the whole rest), `fork`
   the samples of `n > 1` requests whose prefill just finished, `decode_steps` decode steps;
3. hand out: fetch everything the step produced in ONE device-to-host transfer, give tokens to
   their samples (detokenizing, matching stop strings), evict the finished slots (dispatched
   without waiting) and return the deltas.

Compilations: `admit` and `prefill` once per (batch bucket, length bucket) pair actually used,
`fork`, `decode_steps`, `evict` and the free-page count once each.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import signal
import threading
import time
import typing
from typing import Iterable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import aot, grammar, kv_smoothing, snapshot, structured
from jaxinfer.attention import uses_views
from jaxinfer.errors import InvalidRequestError
from jaxinfer.model import Model
from jaxinfer.request import Request, RequestOutput, Sequence, StreamDelta, make_request
from jaxinfer.sampling import SamplingParams, sample_key
from jaxinfer.scheduler import Scheduler
from jaxinfer.sharding import check_mesh, dp_size
from jaxinfer.state import (
    FINISH_REASONS, KV_DTYPES, EngineConfig, init_state, kv_bytes_per_token, kv_pool_dtype, pages_for_memory,
)
from jaxinfer.steps import (
    SpeculativeConfig, admit, decode_steps, draft_prefill, evict, fork, init_draft_state, load_grammar, make_chunk,
    make_grammar_load, make_requests, num_free_pages, permute_slots, prefill, spec_decode_steps,
)


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
    `profile`: block on every jitted call and time it; `engine.profile()` reports the time
    per step function (without it, host and device work overlap and nothing is timed).
    `allow_long_context`: accept a max_seq_len beyond the model's max_position_embeddings
    (refused by default, as vLLM does).
    `precompile`: True compiles every program of `bucket_plan()` now; "background" on a worker
    thread while the engine serves (a program it needs first is compiled on the spot); False
    only when first needed; None (default): load, in the background, the programs of the plan
    that the disk cache holds (compiled by earlier processes), and compile the rest when first
    needed (on 2 cores a background compile slows the programs the first requests need more
    than it saves; a background load does not).
    """

    # jaxinfer.replicas.ReplicatedEngine, registered by that module (it imports this one).
    _replicated_cls = None

    def __new__(cls, *args, mesh=None, **kwargs):
        # A mesh with data-parallel replicas is served by one engine per replica behind a facade.
        if cls is Engine and mesh is not None and dp_size(mesh) > 1:
            if Engine._replicated_cls is None:
                raise RuntimeError("import jaxinfer (or jaxinfer.replicas) to serve a mesh with a 'data' axis")
            return Engine._replicated_cls(*args, mesh=mesh, **kwargs)
        return super().__new__(cls)

    @typing.no_type_check  # the explicit checks below name the argument and what was expected
    def __init__(
        self,
        model: Model,
        max_slots: int = 4,
        page_size: int = 16,
        num_pages: int = 256,
        max_seq_len: int = 512,
        *,
        tokenizer=None,
        prefill_buckets: Seq[int] = (),
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
        profile: bool = False,
        precompile: bool | str | None = None,
        allow_long_context: bool = False,
        speculative: SpeculativeConfig | None = None,
        draft_model: Model | None = None,
        grammar_states: int = 256,
        grammar_classes: int = 256,
        kv_dtype: str = "auto",
        kv_memory_gb: float | None = None,
        kv_calibration: Seq | None = None,
        mesh=None,
    ):
        model, mesh = _on_mesh(model, mesh)
        self.mesh = mesh
        if mesh is not None and speculative is not None:
            raise ValueError("speculative decoding is not supported on a mesh yet; use Engine(mesh=None)")
        if isinstance(speculative, dict):  # from a snapshot's saved arguments
            speculative = SpeculativeConfig(**speculative)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        # The pool's element type: "auto" keeps float32 on the XLA path (see init_state below).
        pool_dtype = kv_pool_dtype(kv_dtype, jnp.float32 if uses_views(attention_backend) else model.dtype) \
            if isinstance(model, Model) else None
        if kv_memory_gb is not None and pool_dtype is not None:  # a memory budget sizes the pool
            num_pages = pages_for_memory(kv_memory_gb, model.config, page_size, pool_dtype)
        # Everything but the models and tokenizer: what a snapshot needs to rebuild this engine.
        self._init_kwargs = dict(kv_dtype=kv_dtype,
            max_slots=max_slots, page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len,
            prefill_buckets=list(prefill_buckets), max_prefill_batch=max_prefill_batch, decode_steps=decode_steps,
            max_stop_ids=max_stop_ids, attention_backend=attention_backend, max_logprobs=max_logprobs, mode=mode,
            seed=seed, add_bos=add_bos, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching,
            batch_invariant=batch_invariant, allow_long_context=allow_long_context, grammar_states=grammar_states,
            grammar_classes=grammar_classes, speculative=None if speculative is None else dataclasses.asdict(speculative))
        if speculative is not None and not isinstance(speculative, SpeculativeConfig):
            raise TypeError(f"speculative must be None or a jaxinfer.SpeculativeConfig, got {type(speculative).__name__}")
        self.speculative = speculative
        self._spec_pending = None  # the last burst's SpecStats (on device until the hand-out)
        if (speculative is not None and speculative.method == "draft") != (draft_model is not None):
            raise ValueError("draft_model= goes with speculative=SpeculativeConfig(method='draft'), and only with it")
        if draft_model is not None:
            if not isinstance(draft_model, Model):
                raise TypeError(f"draft_model must be a jaxinfer Model, got {type(draft_model).__name__}")
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                                 f"target's ({model.config.vocab_size}); speculation needs the same tokenizer")
        if not isinstance(model, Model):
            raise TypeError(f"Engine(model=...) must be a jaxinfer Model (jaxinfer.load_model / dummy_model), "
                            f"got {type(model).__name__}{' ' + repr(model) if isinstance(model, str) else ''}")
        if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "decode", "detokenizer")):
            raise TypeError(f"Engine(tokenizer=...) must be None or a tokenizer (jaxinfer.load_tokenizer(dir), "
                            f"ByteTokenizer()), got {type(tokenizer).__name__}"
                            f"{' ' + repr(tokenizer) if isinstance(tokenizer, str) else ''}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, numbers.Integral)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}")
        if isinstance(max_seq_len, numbers.Integral) and max_seq_len > model.config.max_position_embeddings \
                and not allow_long_context:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings "
                f"({model.config.max_position_embeddings}): positions past it were never trained and RoPE "
                f"extrapolates badly; lower max_seq_len or pass allow_long_context=True")
        # On the XLA (CPU) attention path the layers run as a Python loop over per-layer weights:
        # XLA:CPU copies a weight it reads out of a stacked array (see Model.unstacked).
        # (A sharded model keeps its stacked layers: splitting them goes through the host.)
        self.model = model.unstacked() if uses_views(attention_backend) and mesh is None else model
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.prefill_chunk = prefill_chunk
        self.batch_invariant = batch_invariant
        if prefix_caching is None:  # a cached page was computed in some other request's batch
            prefix_caching = not batch_invariant
        self.cfg = EngineConfig(
            max_slots=max_slots, page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len,
            prefill_buckets=tuple(prefill_buckets), max_prefill_batch=max_prefill_batch,
            max_stop_ids=max_stop_ids, decode_steps=decode_steps, attention_backend=attention_backend,
            max_logprobs=max_logprobs, prefix_caching=prefix_caching, kv_dtype=kv_dtype,
            # Fixed decode shapes: a row's arithmetic must not depend on how many rows run.
            decode_slot_buckets=(max_slots,) if batch_invariant else (),
            decode_span_buckets=(-(-max_seq_len // page_size) * page_size,) if batch_invariant else (),
            grammar_states=grammar_states, grammar_classes=grammar_classes,
        )
        self.scheduler = Scheduler(self.cfg, mode)
        self.mode = mode
        # The XLA path keeps the pool in float32 whatever the compute dtype (bf16 values are exact
        # in it, and attention reads float32 anyway): XLA:CPU has no bf16 scatter and would
        # convert the whole pool to float32 and back for every token written.
        state_dtype = jnp.float32 if uses_views(attention_backend) else model.dtype
        if pool_dtype == jnp.dtype(jnp.int8):  # per-channel K smoothing
            k_channel = kv_smoothing.k_channel_scale(model, max_seq_len, kv_calibration)
        elif kv_calibration is not None:
            raise ValueError(f"kv_calibration calibrates an int8 KV pool; this engine's kv_dtype is {kv_dtype!r}")
        else:
            k_channel = None
        self.state = init_state(self.cfg, model.config, state_dtype, mesh, k_channel)
        self.eos_ids = tuple(
            tokenizer.eos_ids if tokenizer is not None and tokenizer.eos_ids else model.config.eos_token_ids
        )
        self._seeds = np.random.default_rng(seed)
        self._next_id = 0
        self._id_stride = 1  # a replica of a ReplicatedEngine takes every dp-th id
        self._counters = collections.Counter()
        self._live: dict[int, Request] = {}  # unfinished requests by id
        # Outputs the engine reports (`outputs()`): add_request requests, and after a restore all.
        self._outputs: dict[int, RequestOutput] = {}
        self._aborted: list[Sequence] = []  # aborted samples whose final delta is still due
        # Delivery: every delta goes to its request's consumer (a stream() or generate() call);
        # deltas of requests added with add_request() collect here and step() returns them.
        self._unowned: collections.deque[StreamDelta] = collections.deque()
        self._closed: collections.deque[_Consumer] = collections.deque()  # abandoned streams to abort
        # Structured output: what each constraint-table entry holds (an automaton's key, or
        # ("host", sample) for a host-mask fallback sample), how many samples in slots use it,
        # and when it was last used (LRU reuse of loaded automata).
        self._grammar_keys: list[tuple | None] = [None] * max_slots
        self._grammar_users = [0] * max_slots
        self._grammar_used = [0] * max_slots
        self._profile = {} if profile else None  # step function -> [calls, seconds]
        self._steps = aot.steps()
        self.draft_model = self.draft_state = None
        if draft_model is not None:
            self.draft_model = draft_model.unstacked() if uses_views(attention_backend) else draft_model
            self.draft_state = init_draft_state(
                self.cfg, draft_model.config, jnp.float32 if uses_views(attention_backend) else draft_model.dtype)
        self._signature = aot.signature_key(self.model, self.state, self.draft_model, self.draft_state)
        if precompile not in (True, False, "background", None):
            raise ValueError(f"precompile must be True, False, 'background' or None, got {precompile!r}")
        if precompile is None:  # load what earlier processes compiled, on the second core
            self.precompile(background=True, only_cached=True)
        elif precompile:
            self.precompile(background=precompile == "background")

    # ------------------------------------------------------------------ device calls
    # The steps the engine runs: name -> (function, static argument positions, donated ones:
    # the state, so the KV pool is updated in place).
    _STEPS = {
        "admit": (admit, (0,), (1,)), "prefill": (prefill, (0,), (2,)), "fork": (fork, (0,), (1,)),
        "decode_steps": (decode_steps, (0, 3, 4, 5), (2,)), "evict": (evict, (0,), (1,)),
        "num_free_pages": (num_free_pages, (), ()), "permute_slots": (permute_slots, (0,), (1,)),
        "spec_decode_steps": (spec_decode_steps, (0, 1, 4), (3, 6)), "draft_prefill": (draft_prefill, (0,), (2,)),
        "load_grammar": (load_grammar, (0,), (1,)),
    }

    def _call(self, name: str, *args, shape=None):
        """Every jitted step goes through here: its compiled executable comes from the process's
        StepCache (jaxinfer/aot.py; compiled once, kept on disk), keyed by the model and state
        signature and `shape`, the bucket of the non-static arguments; `profile=True` times it.
        Small arguments are NumPy arrays: an eager jnp conversion would compile a program."""
        fn, static, donated = self._STEPS[name]
        key = (self._signature, shape)
        if self._profile is None:
            return self._steps.call(name, fn, args, static, donated, key)
        t = time.perf_counter()
        out = jax.block_until_ready(self._steps.call(name, fn, args, static, donated, key))
        entry = self._profile.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - t
        return out

    def bucket_plan(self) -> dict[str, list]:
        """Every program this engine can run, by step: the bucket of its non-static arguments
        (admit: the requests block; prefill: (batch bucket, length bucket); decode_steps:
        (slot bucket, span bucket)). Their number bounds the compilations of any workload."""
        cfg = self.cfg
        # In the order a first run needs them (precompile submits them so): the fixed programs,
        # decode from the shortest span, prefill from the shortest prompts.
        return {
            "num_free_pages": [None], "admit": [self._admit_shape()], "evict": [None], "permute_slots": [None],
            "fork": [None], "load_grammar": [None],
            "decode_steps": [(b, t) for t in cfg.decode_span_buckets for b in reversed(cfg.decode_slot_buckets)],
            "prefill": [(b, t) for t in cfg.prefill_buckets for b in cfg.batch_buckets],
        }

    def precompile(self, background: bool = False, steps: Iterable[str] | None = None,
                   only_cached: bool = False) -> dict[str, list]:
        """Compile (or load from the disk cache) every program of `bucket_plan()` (or of the named
        steps) on a worker thread; with `background`, return at once and let the engine pick
        each one up when it is ready (a program it needs before that it compiles itself). With
        `only_cached`, load only the programs the disk cache holds. Returns the plan."""
        plan = {k: v for k, v in self.bucket_plan().items() if steps is None or k in steps}
        cfg, model, state = self.cfg, self.model, self.state  # only their shapes are taken
        i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        for name, shapes in plan.items():
            fn, static, donated = self._STEPS[name]
            for shape in shapes:
                if name == "admit":
                    args = (cfg, state, make_requests(cfg, [], [], [], *shape))
                elif name == "prefill":
                    args = (cfg, model, state, make_chunk(cfg, [], *shape))
                elif name == "decode_steps":
                    args, shape = (cfg, model, state, cfg.decode_steps, *shape), None
                elif name == "fork":
                    args = (cfg, state, i32(1), i32(1), np.zeros((1, 2), np.uint32))
                elif name == "evict":
                    args = (cfg, state, np.zeros((cfg.max_slots,), bool))
                elif name == "permute_slots":
                    args = (cfg, state, i32(cfg.max_slots))
                elif name == "load_grammar":
                    args = (cfg, state, make_grammar_load(cfg, model.config.vocab_size))
                else:
                    args = (state,)
                self._steps.submit(name, fn, args, static, donated, (self._signature, shape), only_cached)
        if not background:
            self._steps.wait()
        return plan

    def _admit_shape(self) -> tuple[int, int]:
        """One admit program: every admission batch is padded to the largest block (the prefix
        lookup it runs is cheap next to a compile per (batch, length) bucket)."""
        return self.cfg.max_prefill_batch, self.cfg.prefill_buckets[-1]

    def profile(self) -> dict[str, dict[str, int | float]]:
        """With `Engine(profile=True)`: {step function: {"calls", "seconds"}} since construction
        (each call blocked on, so this is device time plus dispatch)."""
        if self._profile is None:
            raise RuntimeError("construct the Engine with profile=True to time its step functions")
        return {name: {"calls": c, "seconds": s} for name, (c, s) in self._profile.items()}

    def _evict(self, slots: list[int]) -> None:
        """Free these slots on device (dispatched, not waited for). The mask is explicit (always,
        so evict compiles once): a slot stopped by a stop string still runs on device."""
        if slots:
            mask = np.zeros(self.cfg.max_slots, bool)
            mask[slots] = True
            self.state = self._call("evict", self.cfg, self.state, mask)

    def _vacate(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._grammar_release(seq)
        self._evict(self.scheduler.release(seqs))

    # ------------------------------------------------------------------ structured output
    def _fits_table(self, auto) -> bool:
        return auto.fits(self.cfg.grammar_states, self.cfg.grammar_classes)

    def _grammar_acquire(self, seq: Sequence, key: tuple, auto=None) -> int:
        """A constraint-table entry for `seq`: the one already holding `key`, else the least
        recently used free entry (loaded with `auto` if given). There are max_slots entries and
        each sample in a slot holds at most one, so a free entry always exists."""
        if key in self._grammar_keys:
            e = self._grammar_keys.index(key)
        else:
            free = [i for i in range(self.cfg.max_slots) if self._grammar_users[i] == 0]
            e = min(free, key=lambda i: (self._grammar_keys[i] is not None, self._grammar_used[i]))
            self._grammar_keys[e] = key
            if auto is not None:
                flags = np.where(auto.accepting, grammar.ACCEPTING, grammar.NONE).astype(np.int32)
                g = make_grammar_load(self.cfg, self.model.config.vocab_size, e, auto.class_of, auto.next, flags)
                self.state = self._call("load_grammar", self.cfg, self.state, g)
        self._grammar_users[e] += 1
        self._counters["grammar_clock"] += 1
        self._grammar_used[e] = self._counters["grammar_clock"]
        seq.grammar_entry = e
        return e

    def _grammar_release(self, seq: Sequence) -> None:
        if seq.grammar_entry is not None:
            e = seq.grammar_entry
            self._grammar_users[e] -= 1
            if self._grammar_keys[e] is not None and self._grammar_keys[e][0] == "host":
                self._grammar_keys[e] = None  # a fallback sample's private mask
            seq.grammar_entry, seq.host_loaded = None, None

    def _grammar_place(self, seq: Sequence, tokens: list[int]) -> tuple[int, int]:
        """(entry, automaton state after `tokens`) for a constrained sample entering a slot."""
        auto = seq.req.constraint
        if self._fits_table(auto):
            return self._grammar_acquire(seq, auto.key, auto), auto.walk(tokens)
        state = auto.index.get_initial_state()
        for t in tokens:
            state = auto.index.get_next_state(state, int(t))
        seq.host_state = state
        return self._grammar_acquire(seq, ("host", id(seq))), 0

    def _grammar_refresh(self) -> None:
        """Host-mask fallback: before a burst, write each fallback sample's allowed tokens at its
        host-side state into its entry as a two-state automaton (allowed -> STALL), so the sample
        decodes one token and then sits out the rest of the burst until the host advances it."""
        for slot, seq in enumerate(self.scheduler.slots):
            if seq is None or seq.slot is None or seq.grammar_entry is None or seq.host_state is None:
                continue
            if seq.host_loaded == (slot, seq.host_state) or seq.finished or seq.stopped:
                continue
            index, st, e = seq.req.constraint.index, seq.host_state, seq.grammar_entry
            class_of = np.zeros((self.model.config.vocab_size,), np.int32)
            allowed = [t for t in (index.get_allowed_tokens(st) or []) if t < len(class_of)]
            class_of[allowed] = 1
            class_of[list(self.eos_ids)] = 0  # EOS: the stop ids, allowed in accepting states
            final = grammar.ACCEPTING if index.is_final_state(st) else grammar.NONE
            g = make_grammar_load(self.cfg, len(class_of), e, class_of, np.array([[-1, 1], [-1, -1]], np.int32),
                                  np.array([final, grammar.STALL], np.int32), {slot: (e, 0)})
            self.state = self._call("load_grammar", self.cfg, self.state, g)
            seq.host_loaded = (slot, st)
            self._counters["grammar_host_masks"] += 1

    def _grammar_resync(self) -> None:
        """After a restore: compile every live request's constraint again and give the samples
        in slots their entries and states (the host-side table bookkeeping is not saved)."""
        for req in self._live.values():
            if req.params.constraint is not None and req.constraint is None:
                req.constraint = structured.compile_constraint(*req.params.constraint, self.tokenizer,
                                                               self.model.config.vocab_size, self.eos_ids)
        for slot, seq in enumerate(self.scheduler.slots):
            if seq is not None and seq.slot is not None and seq.req.constraint is not None:
                e, st = self._grammar_place(seq, seq.out.token_ids)
                g = make_grammar_load(self.cfg, self.model.config.vocab_size, slot_assign={slot: (e, st)})
                self.state = self._call("load_grammar", self.cfg, self.state, g)

    def _free_pages(self) -> int:
        return int(self._call("num_free_pages", self.state))

    # ------------------------------------------------------------------ one step
    def step(self) -> list[StreamDelta]:
        """One scheduling iteration (see the module docstring). Returns the new output of the
        requests added with `add_request` (including output produced while a `generate` or
        `stream` call drove the engine); output of `stream`/`generate` requests goes to those
        calls. A Ctrl-C (SIGINT) arriving during the step is held until the step is complete, so
        the engine is always left consistent (see `_deferred_sigint`)."""
        self._advance()
        out = list(self._unowned)
        self._unowned.clear()
        return out

    def _advance(self) -> None:
        """One step, its deltas delivered: to the request's consumer, dropped if that consumer is
        gone, else (add_request) kept for `step()` to return."""
        with _deferred_sigint():
            self._close_abandoned()
            for req, d in self._run_step():
                if req.consumer is None:
                    self._unowned.append(d)
                elif not req.consumer.released:
                    req.consumer.queue.append(d)

    def _run_step(self) -> list[tuple[Request, StreamDelta]]:
        batch, lengths = self._schedule()
        if batch:
            self._run_admit(batch)
        prefills = self._run_prefill()
        forks = self._run_forks()
        dec = None
        if any(s is not None for s in self.scheduler.slots):
            self._grammar_refresh()
            dec = self._run_decode(lengths)
        return self._hand_out(prefills, forks, dec)

    def _schedule(self) -> tuple[list[Sequence], np.ndarray]:
        """Preempt until the running slots' next chunk fits, then pick the admissions."""
        free, lengths = jax.device_get(
            (self._call("num_free_pages", self.state), self.state.length))
        free = int(free)
        while self.scheduler.need(lengths) > free:
            victim = self.scheduler.victim()
            if victim is None:
                break
            self._vacate(victim)
            self._counters["preemptions"] += 1
            self.scheduler.requeue(victim[0])
            free = self._free_pages()
        return self.scheduler.admissions(free, lengths), lengths

    def _run_admit(self, batch: list[Sequence]) -> None:
        cfg = self.cfg
        reqs = make_requests(
            cfg, [s.tokens for s in batch],
            # Resumed with output: its prompt logprobs were delivered already.
            [s.req.params if not s.out.token_ids else dataclasses.replace(s.req.params, prompt_logprobs=None)
             for s in batch],
            [s.req.rid for s in batch], *self._admit_shape(),
            num_generated=[len(s.out.token_ids) for s in batch], sample_index=[s.index for s in batch],
            slots=[s.slot for s in batch],
            grammars=[self._grammar_place(s, s.out.token_ids) if s.req.constraint is not None else None
                      for s in batch],
        )
        self.state, res = self._call("admit", cfg, self.state, reqs, shape=reqs.tokens.shape)
        res = jax.device_get(res)
        for row, seq in enumerate(batch):
            if not res.accepted[row]:  # cannot happen with the accounting above; requeue
                self._grammar_release(seq)
                self._vacate([seq] + [f for f in seq.forks if not f.forked])
                self.scheduler.requeue(seq)
                continue
            self.scheduler.admitted(seq, int(res.cached[row]))
            self._counters["prompt_tokens"] += len(seq.tokens)
            self._counters["cached_tokens"] += int(res.cached[row])
            if seq.req.params.prompt_logprobs is not None and seq.req.out.prompt_logprobs is None:
                seq.req.out.prompt_logprobs = [None] * len(seq.req.prompt)

    def _run_prefill(self) -> list[tuple]:
        """One chunk for every prefilling slot; returns (result, [(seq, start, n)]) per call."""
        cfg = self.cfg
        rows = self.scheduler.prefill_rows()
        groups = [[s] for s in rows] if self.batch_invariant else ([rows] if rows else [])
        out = []
        for group in groups:
            limit = self.prefill_chunk or cfg.max_seq_len
            n = [min(s.prefill_len - s.prefill_pos, limit) for s in group]
            chunk = make_chunk(cfg, [
                (s.slot, s.tokens, s.prefill_pos, k,
                 min(s.req.params.prompt_logprobs, cfg.max_logprobs)
                 if s.req.out.prompt_logprobs is not None and not s.out.token_ids else -1)
                for s, k in zip(group, n)], cfg.batch_bucket(len(group)), cfg.prefill_bucket(max(n)))
            if self.draft_model is not None:  # the draft's K/V of the same chunk, before the state is donated
                st = self.state
                self.draft_state = self._call("draft_prefill", cfg, self.draft_model, self.draft_state, chunk,
                                              st.page_table, st.length, st.prefill_len, st.active, st.finished,
                                              shape=chunk.tokens.shape)
            self.state, res = self._call("prefill", cfg, self.model, self.state, chunk, shape=chunk.tokens.shape)
            out.append((res, [(s, s.prefill_pos, k) for s, k in zip(group, n)]))
            for s, k in zip(group, n):
                self.scheduler.prefilled(s, k)
                self._counters["prefill_tokens"] += k
        return out

    def _run_decode(self, lengths: np.ndarray):
        """One burst of decode_steps on the smallest (slots, span) buckets that hold the work,
        after packing the occupied slots at the bottom when that shrinks the slot bucket."""
        perm = self.scheduler.compaction()
        if perm is not None:
            self.state = self._call("permute_slots", self.cfg, self.state, np.asarray(perm, np.int32))
            lengths = lengths[perm]
        slots, span = self.scheduler.decode_shape(lengths, self.cfg.decode_steps)
        if self.speculative is not None:  # rounds of propose + verify; reads the pool, not views
            self.state, dec, self._spec_pending, self.draft_state = self._call(
                "spec_decode_steps", self.cfg, self.speculative, self.model, self.state, slots, self.draft_model,
                self.draft_state, shape=slots)
            return dec
        self.state, dec = self._call("decode_steps", self.cfg, self.model, self.state, self.cfg.decode_steps,
                                     slots, span)
        return dec

    def _run_forks(self) -> list[tuple]:
        """Fork the samples of requests whose prefill completed; returns (seq, ok) per fork."""
        out = []
        for src, seq, slot in self.scheduler.ready_forks():
            self.state, ok = self._call(
                "fork", self.cfg, self.state, np.asarray([src.slot], np.int32),
                np.asarray([slot], np.int32), sample_key(src.req.params.seed, seq.index)[None])
            self.scheduler.forked(src, seq, slot)
            if src.req.constraint is not None:  # the copied row points at src's entry and state
                if src.host_state is not None:
                    seq.host_state = src.host_state
                    self._grammar_acquire(seq, ("host", id(seq)))
                else:
                    self._grammar_acquire(seq, src.req.constraint.key)
            out.append((seq, ok))
        return out

    def _hand_out(self, prefills, forks, dec) -> list[tuple[Request, StreamDelta]]:
        pre_res, fork_ok, dec, active, finished, reason = jax.device_get(
            ([r for r, _ in prefills], [ok for _, ok in forks], dec, self.state.active, self.state.finished,
             self.state.finish_reason)
        )
        finished = active & finished  # on the host: an eager device op would compile
        if self._spec_pending is not None:
            sp = jax.device_get(self._spec_pending)
            self._counters["spec_proposed"] += int(sp.proposed.sum())
            self._counters["spec_accepted"] += int(sp.accepted.sum())
            self._counters["spec_rounds"] += int(sp.rounds.sum())
            self._spec_pending = None
        now = time.perf_counter()
        touched: dict[int, Sequence] = {id(s): s for s in self._aborted}
        self._aborted = []
        top = self.cfg.max_logprobs
        for res, (_, rows) in zip(pre_res, prefills):
            for i, (seq, start, k) in enumerate(rows):
                if seq.req.out.prompt_logprobs is not None and not seq.out.token_ids:
                    seq.record_prompt_logprobs(start, k, res.prompt_logprob[i], res.prompt_top_ids[i],
                                               res.prompt_top_logprobs[i], min(seq.req.params.prompt_logprobs, top))
        for (seq, _), ok in zip(forks, fork_ok):
            if not ok[0]:  # no page for the copy (cannot happen with the accounting): retry later
                self._vacate([seq])
                self.scheduler.requeue(seq)
        if dec is not None:
            slots = self.scheduler.slots
            for t in range(dec.token.shape[0]):
                for s in np.nonzero(dec.emitted[t])[0]:
                    seq = slots[s]
                    tok = int(dec.token[t, s])
                    if seq.host_state is not None and tok not in seq.req.params.stop_token_ids:
                        seq.host_state = seq.req.constraint.index.get_next_state(seq.host_state, tok)
                    seq.append_token(tok, now, (dec.logprob[t, s], dec.top_ids[t, s], dec.top_logprobs[t, s]))
                    touched[id(seq)] = seq
        done = []
        for s, seq in enumerate(self.scheduler.slots):
            if seq is not None and seq.slot is not None and (finished[s] or seq.stopped):
                # A stop string wins over whatever the device decided later in the same chunk.
                seq.out.finish_reason = "stop" if seq.stopped else FINISH_REASONS[int(reason[s])]
                self._grammar_release(seq)
                touched[id(self.scheduler.finished(s))] = seq
                done.append(s)
        self._evict(done)  # the next step's work queues behind it on device
        deltas = [(seq.req, seq.take_delta(now)) for seq in touched.values()]
        for seq in touched.values():
            if seq.req.out.finished:
                self._live.pop(seq.req.rid, None)
        return deltas

    # ------------------------------------------------------------------ user API
    def _make(self, prompt, params) -> Request:
        if self.speculative is not None and isinstance(params, SamplingParams) and (
                params.json_schema is not None or params.regex is not None or params.choice):
            # The verify step does not apply the constraint mask at each proposed position yet.
            raise InvalidRequestError("structured output (json_schema / regex / choice) is not supported together "
                                      "with speculative decoding; use an engine without speculative=")
        req = make_request(self._next_id, prompt, params, cfg=self.cfg, vocab_size=self.model.config.vocab_size,
                           tokenizer=self.tokenizer, add_bos=self.add_bos, eos_ids=self.eos_ids, seeds=self._seeds)
        self._next_id += self._id_stride
        return req

    def _queue(self, reqs: list[Request], consumer: _Consumer | None = None) -> None:
        with _deferred_sigint():  # all of the requests are queued, or none
            for r in reqs:
                r.consumer = consumer
            self.scheduler.waiting.extend(r.seqs[0] for r in reqs)
            self._live.update((r.rid, r) for r in reqs)

    @typing.no_type_check  # make_request's validation gives the user a specific message
    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Its output comes back from `step()`. Bad input
        raises InvalidRequestError and leaves the engine (and every other request) untouched."""
        req = self._make(prompt, params if params is not None else SamplingParams())
        self._queue([req])
        self._outputs[req.rid] = req.out
        return req.rid

    def outputs(self) -> list[RequestOutput]:
        """The outputs of every `add_request` request (finished or not, in request-id order) the
        engine has not been told to `forget`; after `Engine.restore`, of every request the
        snapshot held, including those finished before it."""
        return [self._outputs[rid] for rid in sorted(self._outputs)]

    def forget(self, request_id: int) -> None:
        """Stop keeping a finished request's output (a long-running server calls this)."""
        out = self._outputs.get(request_id)
        if out is not None and out.finished:
            del self._outputs[request_id]

    # ------------------------------------------------------------------ live weight updates
    UPDATE_POLICIES = ("recompute", "keep")

    def update_params(self, params, on_update: str = "recompute") -> None:
        """Replace the weights of the running engine, without recompiling anything.

        `params`: a `Model` or its `params`, as `load_model` gives them (stacked layers; the
        engine's own per-layer layout is accepted too), with exactly the current tree, shapes
        and dtypes; anything else is refused with a ValueError naming the leaf. The prefix cache
        is dropped either way (its pages hold K/V of the old weights). `on_update`:
        - "recompute" (default): every request in flight is preempted and requeued in order,
          so its prompt and the tokens generated so far are recomputed under the new weights and
          it continues from there; no request is lost or restarted from scratch;
        - "keep": requests in flight keep their KV cache, computed by the old weights, and
          continue under the new ones (what an RL rollout with a stale cache does: fast, but
          their continuation mixes both weights; a request admitted later sees only the new).
        Call it between steps."""
        if on_update not in self.UPDATE_POLICIES:
            raise ValueError(f"on_update must be one of {self.UPDATE_POLICIES}, got {on_update!r}")
        if isinstance(params, Model):
            params = params.params
        new = Model(self.model.config, params, self.model.compute_dtype)
        new = new.unstacked() if isinstance(self.model.params["layers"], tuple) else new.stacked()
        old_leaves = dict(jax.tree_util.tree_leaves_with_path(self.model.params))
        new_leaves = dict(jax.tree_util.tree_leaves_with_path(new.params))
        name = jax.tree_util.keystr
        for path in old_leaves.keys() - new_leaves.keys():
            raise ValueError(f"update_params: the new params lack {name(path)}")
        for path in new_leaves.keys() - old_leaves.keys():
            raise ValueError(f"update_params: the new params have an extra leaf {name(path)}")
        for path, a in old_leaves.items():
            b = new_leaves[path]
            if getattr(b, "shape", None) != a.shape or getattr(b, "dtype", None) != a.dtype:
                raise ValueError(f"update_params: {name(path)} is {getattr(b, 'dtype', type(b).__name__)}"
                                 f"{list(getattr(b, 'shape', []))}, expected {a.dtype}{list(a.shape)} (same shapes "
                                 "and dtypes, or the compiled steps would not apply)")
        with _deferred_sigint():
            if on_update == "recompute":
                while (victim := self.scheduler.victim()) is not None:  # newest first: FIFO order is kept
                    self._vacate(victim)
                    self._counters["preemptions"] += 1
                    self.scheduler.requeue(victim[0])
            # Through the host: a device-side reset would be one more program to compile.
            alloc = self.state.alloc
            self.state = self.state.replace(alloc=alloc.replace(
                cached=jax.device_put(np.zeros(alloc.cached.shape, bool)),
                hash=jax.device_put(np.zeros(alloc.hash.shape, alloc.hash.dtype))))
            self.scheduler._prefilled_keys.clear()
            self.model = self.model.replace(params=jax.device_put(new.params))
            self._counters["weight_updates"] += 1

    # ------------------------------------------------------------------ snapshot / resume
    def snapshot(self, path) -> str:
        """Write the whole engine (device state and host side) under directory `path`,
        atomically: a crash mid-write leaves the previous snapshot there valid. Call it between
        steps. Returns the snapshot's directory. See jaxinfer/snapshot.py."""
        with _deferred_sigint():
            return str(snapshot.write(self, path))

    @classmethod
    def restore(cls, path, model: Model, tokenizer=None, **overrides) -> "Engine":
        """A new engine that continues the snapshot under `path` exactly where it stopped.
        `model` must be the snapshot's (same config and weights) and the engine configuration
        (saved in the snapshot; `overrides` may change constructor arguments) must match it,
        else a SnapshotError says what differs. Every request is then reported like an
        `add_request` one: `step()` returns its deltas, `outputs()` its output."""
        snap, manifest = snapshot.read_manifest(path)
        kwargs = {**manifest["engine_kwargs"], **overrides, "precompile": False}
        engine = cls(model, tokenizer=tokenizer, **kwargs)
        snapshot.restore_into(engine, snap, manifest)
        engine._grammar_resync()
        return engine

    def output(self, request_id: int) -> RequestOutput | None:
        """The live output of an unfinished request (prompt_token_ids, samples so far); None
        once it has finished (its final state came with its last deltas) or if unknown. The
        engine keeps filling it in as it steps: read it from the thread that steps the engine."""
        req = self._live.get(request_id)
        return None if req is None else req.out

    def _add_all(self, prompts, params) -> list[Request]:
        prompts, plist = prompt_list(prompts, params)
        # Validate everything first: a bad request rejects the call before any request is queued.
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                reqs.append(self._make(p, sp))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"request {i}: {e}") from None
        return reqs

    def abort(self, request_id: int) -> bool:
        """Stop a request (every sample) now: waiting samples leave the queue, running ones free
        their slots. Unfinished samples finish with reason "abort"; their final deltas come with
        the next `step()`. Returns False if the id is unknown or the request already finished."""
        with _deferred_sigint():
            req = self._live.pop(request_id, None)
            if req is None:
                return False
            waiting = self.scheduler.waiting
            for seq in [s for s in waiting if s.req is req]:
                waiting.remove(seq)
            self._vacate(req.seqs)
            for seq in req.seqs:
                if not seq.finished:
                    seq.out.finish_reason = "abort"
                    self._aborted.append(seq)
            return True

    def _release(self, consumer: _Consumer) -> None:
        """A consumer is gone (stream closed or dropped, generate interrupted): abort what it still
        has in flight; its undelivered and later deltas are dropped."""
        consumer.released = True
        consumer.queue.clear()
        for r in consumer.requests:
            if not r.out.finished:
                self.abort(r.rid)

    def _close_abandoned(self) -> None:
        while self._closed:
            self._release(self._closed.popleft())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    def stream(self, prompts, params=None) -> Stream:
        """Queue the prompts now (bad input raises here) and return an iterator of their deltas
        as tokens reach the host: `delta.index` is the prompt's position in `prompts`,
        `delta.sample` the sample (n > 1). Iterating drives the engine (`step()`) whenever none
        of this stream's deltas is waiting; every consumer gets exactly its own deltas, so several
        streams, `generate` calls and `add_request` users can interleave on one engine. Closing
        the stream (`close()`, `with`, leaving the `for` loop, or dropping it) aborts its
        unfinished requests and frees their pages."""
        reqs = self._add_all(prompts, params)
        consumer = _Consumer(reqs)
        self._queue(reqs, consumer)
        return Stream(self, consumer)

    def generate(self, prompts, params=None) -> list[RequestOutput]:
        """Run the prompts to completion; outputs in prompt order. If the call is interrupted
        (KeyboardInterrupt, an exception), its unfinished requests are aborted: the engine stays
        clean and keeps serving."""
        reqs = self._add_all(prompts, params)
        consumer = _Consumer(reqs)
        with _deferred_sigint() as held:  # Ctrl-C lands only at held.poll(), between steps
            self._queue(reqs, consumer)
            try:
                while not all(r.out.finished for r in reqs):
                    held.poll()
                    self._advance()
                    consumer.queue.clear()  # generate returns whole outputs, not deltas
            finally:
                self._release(consumer)
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
            "spec_proposed": c["spec_proposed"], "spec_accepted": c["spec_accepted"],
            "spec_acceptance_rate": c["spec_accepted"] / c["spec_proposed"] if c["spec_proposed"] else 0.0,
            # tokens per verification forward and slot (1 = no gain; k + 1 at most)
            "spec_mean_accepted_length": (c["spec_accepted"] + c["spec_rounds"]) / c["spec_rounds"]
            if c["spec_rounds"] else 0.0,
            "running": sum(s is not None for s in self.scheduler.slots),
            "waiting": len(self.scheduler.waiting),
            # The KV pool: its element type, bytes per token (K and V of every layer, with
            # int8's per-token scales) and in all (pages, null page included, and scales).
            "kv_dtype": str(self.state.k_pages.dtype),
            "kv_bytes_per_token": kv_bytes_per_token(self.model.config, self.state.k_pages.dtype),
            "kv_pool_bytes": int(sum(x.nbytes for x in (self.state.k_pages, self.state.v_pages,
                                                        self.state.k_scales, self.state.v_scales))),
        }


def prompt_list(prompts, params) -> tuple[list, list]:
    """(prompts, one SamplingParams per prompt) of a generate / stream call, or InvalidRequestError."""
    if isinstance(prompts, (str, bytes, bytearray, dict, set, frozenset)) or not isinstance(prompts, Iterable):
        raise InvalidRequestError(
            f"prompts must be a list of prompts (strings or token-id lists), got {type(prompts).__name__}")
    prompts = list(prompts)
    if params is None:
        params = SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise InvalidRequestError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    return prompts, plist


def _on_mesh(model, mesh):
    """(model, mesh) for a tensor-parallel engine: a one-device model is laid out on `mesh`
    (through the host; `load_model(path, mesh=mesh)` reads only each device's slices); a sharded
    model brings its own mesh."""
    if not isinstance(model, Model):
        return model, mesh  # refused below with the engine's own message
    if mesh is None:
        return model, model.mesh
    check_mesh(mesh)
    if dp_size(mesh) > 1:
        raise ValueError("Engine(mesh=) with a 'data' axis > 1 is served by jaxinfer.ReplicatedEngine "
                         "(Engine(...) builds one for you); this engine runs one replica")
    if model.mesh is None:
        return model.on_mesh(mesh), mesh
    if model.mesh != mesh:
        raise ValueError("Engine(mesh=): the model is laid out on another mesh "
                         f"({dict(model.mesh.shape)}); pass that mesh or the one-device model")
    return model, mesh


class _Consumer:
    """One `stream()` or `generate()` call: its requests and the deltas waiting for it."""

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.index = {r.rid: i for i, r in enumerate(requests)}
        self.queue: collections.deque[StreamDelta] = collections.deque()
        self.released = False  # closed, dropped or interrupted: deltas for it are dropped

    @property
    def finished(self) -> bool:
        return all(r.out.finished for r in self.requests)


class Stream:
    """The iterator `Engine.stream` returns; see there. Also a context manager."""

    def __init__(self, engine, consumer: _Consumer):  # an Engine or a ReplicatedEngine
        self._engine, self._consumer, self._closed = engine, consumer, False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamDelta:
        c = self._consumer
        while not c.queue:
            if self._closed or c.finished:
                self.close()
                raise StopIteration
            self._engine._advance()
        d = c.queue.popleft()
        return dataclasses.replace(d, index=c.index[d.request_id])

    @property
    def outputs(self) -> list[RequestOutput]:
        """The requests' outputs so far, in prompt order (complete once the stream is exhausted)."""
        return [r.out for r in self._consumer.requests]

    def close(self) -> None:
        """Abort this stream's unfinished requests (their pages are freed) and stop iterating."""
        if not self._closed:
            self._closed = True
            self._engine._release(self._consumer)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Dropped without close(): the engine aborts its requests at its next step (not here: a
        # garbage collection can run in the middle of any engine call).
        if not getattr(self, "_closed", True):
            self._closed = True
            self._engine._closed.append(self._consumer)


class _deferred_sigint:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block; deliver it at `poll()` or when the
    block ends.

    The engine's steps donate the state: a KeyboardInterrupt that landed between a jitted call
    and the assignment of its result would leave the engine holding deleted buffers ("Buffer
    has been deleted or donated"), and one between fetching a burst's tokens and handing them
    out would lose tokens. So every engine operation is atomic with respect to Ctrl-C; the
    interrupt is raised right after it (the original handler runs then). `generate` holds it
    for its whole call and polls between steps, so its clean-up cannot itself be interrupted.
    Only the main thread receives signals, so elsewhere this does nothing; blocks nest (the
    outermost one holds and delivers)."""

    _depth = 0  # main-thread nesting

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread() and not _deferred_sigint._depth
        if self.active:
            self.caught = []
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.caught.append((signum, frame)))
            _deferred_sigint._depth = 1
        return self

    def poll(self) -> None:
        """Raise a held interrupt now (the original handler runs), at a point chosen by the caller."""
        if self.active and self.caught:
            self._deliver(self.caught.pop())
            self.caught.clear()

    def _deliver(self, caught) -> None:
        if callable(self.previous):
            self.previous(*caught)  # default_int_handler raises KeyboardInterrupt here
        elif self.previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)  # (only after the handler is restored)

    def __exit__(self, *exc):
        if self.active:
            _deferred_sigint._depth = 0
            signal.signal(signal.SIGINT, self.previous)
            if self.caught:
                self._deliver(self.caught[0])
        return False
