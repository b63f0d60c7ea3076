"""Starting and stopping the server: the engine thread, a warm-up, uvicorn.

`python -m jaxinfer serve` calls `run`; tests call `start` (uvicorn in a background thread on
a free port) and `Running.stop()`. Shutdown (SIGINT/SIGTERM, or `stop`) first aborts every
request in flight, so each open stream ends with finish_reason "abort" and `data: [DONE]`
instead of hanging, then lets uvicorn close the connections (at most `graceful_s` seconds).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time

import uvicorn

from jaxinfer.engine import Engine
from jaxinfer.sampling import SamplingParams
from jaxinfer.server.app import build_app
from jaxinfer.server.chat_template import ChatTemplate
from jaxinfer.server.engine_thread import EngineThread
from jaxinfer.server.metrics import ServerMetrics

log = logging.getLogger("jaxinfer.server")


def warm_up(engine: Engine) -> float:
    """Compile what serving needs before the server says it is ready: the whole bucket plan
    from the compiled-step cache where it is there, and one short request end to end (the
    programs a first request runs, compiled now if the cache had none). Returns seconds."""
    t = time.perf_counter()
    engine.precompile(only_cached=True)
    engine.generate([[engine.model.config.vocab_size - 1] * 3], SamplingParams(max_tokens=engine.cfg.decode_steps + 1,
                                                                      temperature=0.0, ignore_eos=True))
    return time.perf_counter() - t


def make_app(engine: Engine, model_name: str, tokenizer, chat_template: ChatTemplate | None):
    metrics = ServerMetrics()
    metrics.stats = engine.stats()
    thread = EngineThread(engine, metrics)
    return build_app(thread, model_name, tokenizer, chat_template, metrics), thread


class _Server(uvicorn.Server):
    """uvicorn's server, plus: a stop signal first aborts the engine's requests."""

    def __init__(self, config, engine_thread: EngineThread):
        super().__init__(config)
        self.engine_thread = engine_thread

    def handle_exit(self, sig, frame) -> None:
        log.info("signal %s: aborting %s requests in flight and shutting down", sig,
                 len(self.engine_thread._handles))
        self.engine_thread.abort_all()
        super().handle_exit(sig, frame)


@dataclasses.dataclass
class Running:
    """A server started by `start`: its URL, and `stop()`."""

    url: str
    server: _Server
    thread: threading.Thread
    engine_thread: EngineThread

    def stop(self, timeout: float = 10.0) -> None:
        self.engine_thread.abort_all()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.engine_thread.shutdown(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(app, host: str, port: int, graceful_s: float, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=graceful_s, lifespan="off")


def start(engine: Engine, model_name: str, tokenizer=None, chat_template: ChatTemplate | None = None,
          host: str = "127.0.0.1", port: int | None = None, graceful_s: float = 5.0) -> Running:
    """Serve in a background thread (tests, notebooks); returns once it accepts connections."""
    app, engine_thread = make_app(engine, model_name, tokenizer, chat_template)
    port = port or free_port(host)
    server = _Server(_config(app, host, port, graceful_s, "warning"), engine_thread)
    thread = threading.Thread(target=server.run, name="jaxinfer-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return Running(f"http://{host}:{port}", server, thread, engine_thread)


def run(engine: Engine, model_name: str, tokenizer=None, chat_template: ChatTemplate | None = None,
        host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 5.0, log_level: str = "info") -> None:
    """Warm up, then serve in the foreground until SIGINT/SIGTERM."""
    seconds = warm_up(engine)
    app, engine_thread = make_app(engine, model_name, tokenizer, chat_template)
    server = _Server(_config(app, host, port, graceful_s, log_level), engine_thread)
    log.info("warm-up done in %.1f s; serving %s on http://%s:%d (chat template: %s)", seconds, model_name, host,
             port, chat_template.origin if chat_template else "none")
    try:
        server.run()
    finally:
        engine_thread.shutdown(timeout=graceful_s)
