"""Host-side scheduling decisions: which sequence waits, which slot it takes, who is preempted,
which slots prefill this step. The scheduler owns the waiting queue and the host's view of the
slot table; it never touches the device (the engine runs what it decides).

Policy (vLLM's defaults):
- admission is FIFO under a page budget: a request is admitted only if the pages its first
  step can take (prompt without cache hits, fork copies, decode growth) fit beside what the
  running slots may allocate; later requests never overtake a waiting one;
- preemption is by recomputation, newest first (LIFO), until the running slots' next
  `decode_steps` tokens fit; the victim goes back to the front of the queue;
- a request whose first page equals that of another request admitted in the same step (and not
  yet prefilled by anyone) waits one step, so it reuses those pages instead of recomputing them.
`mode="static"` admits only when every slot is empty (fill a batch, run it out).
"""

from __future__ import annotations

import collections
import itertools

from jaxinfer.request import Sequence
from jaxinfer.state import EngineConfig

MODES = ("continuous", "static")
_MAX_PREFILLED_KEYS = 4096


class Scheduler:
    def __init__(self, cfg: EngineConfig, mode: str = "continuous"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode = cfg, mode
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence | None] = [None] * cfg.max_slots
        self._order = itertools.count()
        # First pages (token tuples) some request has prefilled, newest last: a prompt starting
        # with one is likely cached, so identical prompts in one admission batch need not wait.
        self._prefilled_keys: collections.OrderedDict[tuple, None] = collections.OrderedDict()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def running(self) -> list[Sequence]:
        """Sequences placed in a slot (reserved fork targets excluded)."""
        return [s for s in self.slots if s is not None and s.slot is not None]

    # ------------------------------------------------------------------ pages
    def _growth(self, seq: Sequence, length: int) -> int:
        return self.cfg.decode_growth(len(seq.req.prompt), seq.req.params.max_tokens, length, len(seq.tokens))

    def need(self, lengths) -> int:
        """Pages the occupied slots may allocate this step (forks included)."""
        need = 0
        for s, seq in enumerate(self.slots):
            if seq is None:
                continue
            if seq.slot is None:  # reserved for a fork: one copied page + its own decode
                need += 1 + self._growth(seq, 0)
            else:
                need += self._growth(seq, int(lengths[s]))
        return need

    # ------------------------------------------------------------------ preemption
    def victim(self) -> list[Sequence] | None:
        """The newest running sequence and its unforked samples (which hold only reserved slots
        and requeue with it), or None when nothing runs."""
        live = self.running()
        if not live:
            return None
        newest = max(live, key=lambda s: s.order)
        return [newest] + [f for f in newest.forks if not f.forked]

    def release(self, seqs: list[Sequence]) -> list[int]:
        """Take `seqs` out of their slots (reserved or running); returns the slots that were
        running on device (the engine evicts those)."""
        freed = []
        for s, occupant in enumerate(self.slots):
            if occupant is not None and any(occupant is q for q in seqs):
                self.slots[s] = None
                if occupant.slot is not None:
                    freed.append(s)
                occupant.slot = None
        return freed

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue: the oldest waiting work, resumed first."""
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ admission
    def admissions(self, free: int, lengths) -> list[Sequence]:
        """Waiting sequences to admit now (FIFO under the page budget), each given a slot and
        its samples' reserved slots."""
        cfg = self.cfg
        free_slots = [i for i, r in enumerate(self.slots) if r is None]
        if self.mode == "static" and len(free_slots) < cfg.max_slots:
            return []
        budget = free - self.need(lengths)
        batch: list[Sequence] = []
        first_pages: set[tuple] = set()
        deferred = []
        while self.waiting and len(batch) < cfg.max_prefill_batch:
            seq = self.waiting[0]
            tokens = seq.resume_tokens
            samples = 1 + sum(not f.forked for f in seq.forks)
            if samples > len(free_slots):
                break
            cost = cfg.admission_pages(len(seq.req.prompt), seq.req.params.max_tokens, len(tokens), samples)
            if cost > budget:
                break  # FIFO: wait for pages rather than let later requests overtake
            self.waiting.popleft()
            key = tuple(tokens[: cfg.page_size])
            if (cfg.prefix_caching and len(tokens) > cfg.page_size and key in first_pages
                    and key not in self._prefilled_keys):
                deferred.append(seq)  # admitted next step, reusing the pages this one caches
                continue
            first_pages.add(key)
            budget -= cost
            seq.tokens = tokens
            seq.slot = free_slots.pop(0)
            self.slots[seq.slot] = seq
            if samples > 1:
                for f in seq.forks:
                    if not f.forked:
                        f.tokens = tokens
                        self.slots[free_slots.pop(0)] = f  # reserved; f.slot is set by the fork
            batch.append(seq)
        self.waiting.extendleft(reversed(deferred))
        return batch

    def admitted(self, seq: Sequence, cached: int) -> None:
        """`seq` is in its slot with `cached` prompt tokens from the prefix cache."""
        seq.order = next(self._order)
        seq.prefill_pos = cached

    # ------------------------------------------------------------------ prefill and fork
    def prefill_rows(self) -> list[Sequence]:
        """Prefilling sequences, oldest first, at most max_prefill_batch of them."""
        rows = [s for s in self.running() if s.prefill_pos < s.prefill_len]
        return sorted(rows, key=lambda s: s.order)[: self.cfg.max_prefill_batch]

    def prefilled(self, seq: Sequence, n: int) -> None:
        seq.prefill_pos += n
        if seq.prefill_pos >= self.cfg.page_size:
            key = tuple(seq.tokens[: self.cfg.page_size])
            self._prefilled_keys[key] = None
            self._prefilled_keys.move_to_end(key)
            if len(self._prefilled_keys) > _MAX_PREFILLED_KEYS:
                self._prefilled_keys.popitem(last=False)

    def ready_forks(self) -> list[tuple[Sequence, Sequence, int]]:
        """(source, sample, reserved slot) for the samples whose sample 0 finished prefill."""
        out = []
        for src in list(self.slots):
            if src is None or src.slot is None or src.index != 0 or src.prefill_pos < src.prefill_len:
                continue
            for f in src.forks:
                if not f.forked and f in self.slots:
                    out.append((src, f, self.slots.index(f)))
        return out

    def forked(self, src: Sequence, seq: Sequence, slot: int) -> None:
        seq.slot, seq.order, seq.forked = slot, next(self._order), True
        seq.tokens, seq.prefill_pos = src.tokens, src.prefill_len

    def compaction(self) -> list[int] | None:
        """A permutation (new slot i = old slot perm[i]) that packs the occupied slots at the
        bottom, keeping their order, when that lets decode run a smaller slot bucket; else None."""
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        if not occupied or self.cfg.decode_slots(occupied[-1] + 1) == self.cfg.decode_slots(len(occupied)):
            return None
        perm = occupied + [i for i, s in enumerate(self.slots) if s is None]
        self.slots = [self.slots[i] for i in perm]
        for i, seq in enumerate(self.slots):
            if seq is not None and seq.slot is not None:
                seq.slot = i
        return perm

    def decode_shape(self, lengths, steps: int) -> tuple[int, int]:
        """(slots, span) buckets for the next decode burst: every occupied slot, and every
        decoding slot's positions after `steps` more tokens. `lengths`: the device lengths
        read at the start of the step (a slot prefilled since is at its host mirror)."""
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        longest = max((max(int(lengths[i]), self.slots[i].prefill_pos) for i in occupied), default=0)
        return self.cfg.decode_slots(occupied[-1] + 1 if occupied else 1), self.cfg.decode_span(longest + steps)

    def finished(self, s: int) -> Sequence:
        """Slot `s` finished on device (or by a stop string): empty it."""
        seq = self.slots[s]
        self.slots[s] = None
        seq.slot = None
        return seq
