"""The engine behind the HTTP server: one thread owns the `Engine` and steps it while there is
work; HTTP handlers (on the asyncio loop) submit requests and read per-request queues.

Design. The Engine is not thread-safe and its steps block on the device, so exactly one
thread calls it. Handlers reach that thread through a command queue (submit, abort, shutdown);
the thread drains the commands between steps, so a request submitted while others run joins
the running batch at the next step (continuous batching over HTTP), and nobody waits for
anybody else's completion. Requests go in with `Engine.add_request`; the deltas `step()`
returns for them are routed by request id into each request's `asyncio.Queue` with
`loop.call_soon_threadsafe` (the engine's own per-consumer delivery, issue 13: deltas of
add_request requests belong to whoever steps the engine, here this thread).

Faults. A bad request fails its own `submit` (InvalidRequestError, re-raised in the handler).
If a step raises, the requests in flight at that moment receive the exception (a 500 for them),
are aborted, and the thread carries on serving the others and new ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

from jaxinfer.engine import Engine
from jaxinfer.request import RequestOutput, StreamDelta
from jaxinfer.sampling import SamplingParams

log = logging.getLogger("jaxinfer.server")


class EngineStepError(RuntimeError):
    """The engine step that was serving this request raised; the request was aborted."""


@dataclasses.dataclass
class Handle:
    """One submitted request as a handler sees it: its id, its output object (complete once its
    last delta has arrived) and the queue of its deltas (a StreamDelta, or an EngineStepError)."""

    rid: int
    output: RequestOutput
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float  # perf_counter at submission
    open_samples: int  # samples whose final delta has not arrived yet

    async def deltas(self):
        """The request's deltas in order until every sample has finished."""
        while self.open_samples:
            d = await self.queue.get()
            if isinstance(d, BaseException):
                raise d
            if d.finish_reason is not None:
                self.open_samples -= 1
            yield d


@dataclasses.dataclass
class StepRecord:
    """One engine step, as the step log shows it."""

    running: int
    waiting: int
    tokens: int
    seconds: float


class EngineThread:
    """Owns `engine` on a daemon thread. `metrics` (optional) is told on that thread of every
    accepted request (`observe_submit(handle)`) and every step
    (`observe_step(deltas, handles, engine.stats())`)."""

    def __init__(self, engine: Engine, metrics=None, step_log: int = 4096):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}
        self._open: dict[int, int] = {}  # samples of each request whose final delta is still to come
        self.steps: list[StepRecord] = []  # the most recent `step_log` steps
        self._step_log = step_log
        self._stopping = threading.Event()
        self._failures = 0  # consecutive failed steps
        self.broken: EngineStepError | None = None  # set when the engine cannot step any more
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from handlers
    async def submit(self, prompt, params: SamplingParams) -> Handle:
        """Queue a request; raises what `Engine.add_request` raises for bad input."""
        loop = asyncio.get_running_loop()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("submit", (prompt, params, loop, time.perf_counter()), done))
        return await asyncio.wrap_future(done)

    def abort(self, rid: int) -> None:
        """Abort a request (client gone); its pages are freed at the next step. Thread-safe."""
        self._commands.put(("abort", rid, None))

    def abort_all(self) -> None:
        """Abort everything in flight (shutdown): every stream ends with finish_reason "abort"."""
        self._commands.put(("abort_all", None, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        self.abort_all()
        self._stopping.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished() and self.broken is None
            if self._stopping.is_set() and not busy:
                return
            try:  # block only when idle: a running batch never waits for the next request
                cmd = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._command(*cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_unfinished() and self.broken is None:
                self._step()

    def _command(self, kind: str, arg, done: concurrent.futures.Future | None) -> None:
        if kind == "submit":
            prompt, params, loop, arrival = arg
            if self.broken is not None:
                done.set_exception(self.broken)
                return
            try:
                rid = self.engine.add_request(prompt, params)
            except Exception as e:  # bad input: the handler re-raises it, the engine is untouched
                done.set_exception(e)
                return
            h = Handle(rid, self.engine.output(rid), asyncio.Queue(), loop, arrival, params.n)
            self._handles[rid] = h
            self._open[rid] = params.n
            if self.metrics is not None:
                self.metrics.observe_submit(h)
            done.set_result(h)
        elif kind == "abort":
            if arg in self._handles:
                self.engine.abort(arg)
        elif kind == "abort_all":
            for rid in list(self._handles):
                self.engine.abort(rid)

    def _step(self) -> None:
        t = time.perf_counter()
        running = sum(s is not None for s in self.engine.scheduler.slots)
        waiting = len(self.engine.scheduler.waiting)
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a step fault must not take the server down
            log.exception("engine step failed; aborting the %d requests in flight", len(self._handles))
            self._fail_all(e)
            return
        self._failures = 0
        record = StepRecord(running, waiting, sum(len(d.token_ids) for d in deltas), time.perf_counter() - t)
        self.steps.append(record)
        del self.steps[:-self._step_log]
        log.debug("step: %d running, %d waiting, %d new tokens, %.4f s", running, waiting, record.tokens,
                  record.seconds)
        if self.metrics is not None:
            try:
                self.metrics.observe_step(deltas, self._handles, self.engine.stats())
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("metrics failed")
        for d in deltas:
            h = self._handles.get(d.request_id)
            if h is None:
                continue
            if d.finish_reason is not None:
                self._open[d.request_id] -= 1
                if not self._open[d.request_id]:
                    del self._handles[d.request_id], self._open[d.request_id]
                    self.engine.forget(d.request_id)  # the handle holds the output; the engine need not
            _deliver(h, d)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineStepError(f"the engine step serving this request failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        for rid, h in list(self._handles.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("abort of request %d after a failed step", rid)
            _deliver(h, failure)
        self._handles.clear()
        self._open.clear()
        self._failures += 1
        if self._failures >= 2:  # it failed again with nothing new in it: the engine itself is broken
            self.broken = EngineStepError(f"the engine cannot step any more ({type(error).__name__}: {error}); "
                                          "restart the server")


def _deliver(h: Handle, item) -> None:
    try:
        h.loop.call_soon_threadsafe(h.queue.put_nowait, item)
    except RuntimeError:  # the handler's event loop is closed (server stopped): nobody is listening
        pass
