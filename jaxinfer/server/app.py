"""The OpenAI-compatible HTTP API (FastAPI): `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, `/health`, `/metrics`.

Handlers never touch the engine: they validate the body (protocol.py), submit each prompt to
the engine thread and turn the request's deltas into OpenAI's response objects, or into
server-sent events ending with `data: [DONE]` when `stream` is set. Errors are OpenAI's JSON
(`{"error": {"message", "type", "param", "code"}}`): 400 for a body that is not JSON, a wrong
type, an unknown field, a bad value or a prompt too long; 404 for an unknown model or route;
500 when the engine step serving the request failed (the others carry on); 503 once the engine
cannot step any more. A client that disconnects aborts its requests, which frees their pages
at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxinfer.errors import InvalidRequestError
from jaxinfer.server.chat_template import ChatTemplate
from jaxinfer.server.engine_thread import EngineStepError, EngineThread, Handle
from jaxinfer.server.metrics import ServerMetrics
from jaxinfer.server.protocol import ChatCompletionRequest, CompletionRequest, clean_message, error_param

log = logging.getLogger("jaxinfer.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    # A union's members appear in the location ("prompt.str", "stop.list[str]"): not a field name.
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    field = ".".join(loc) or None
    if err.get("type") == "json_invalid" or (not loc and isinstance(err.get("input"), (bytes, str))):
        return APIError(400, f"We could not parse the JSON body of your request: {err.get('msg')}", code="json_invalid")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {field}", param=field,
                        code="unrecognized_argument")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: {field}", param=field, code="missing_required_parameter")
    got = err.get("input")
    got = "" if isinstance(got, dict) and field is None else f" (got {json.dumps(got, default=repr)[:80]})"
    return APIError(400, f"Invalid value for {field or 'the body'}: {err.get('msg')}{got}", param=loc[0] if loc else None,
                    code="invalid_value")


def _is_type_tag(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "dict", "list", "none")
                                   or "[" in x or x.endswith("Part") or x.endswith("Options"))


def build_app(engine_thread: EngineThread, model_name: str, tokenizer, chat_template: ChatTemplate | None,
              metrics: ServerMetrics) -> FastAPI:
    """The API over one engine thread. `tokenizer` may be None (token-id prompts only)."""
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    engine = engine_thread.engine
    max_seq_len = engine.cfg.max_seq_len
    created = int(time.time())

    @lru_cache(maxsize=1 << 16)
    def token_text(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False) if tokenizer is not None else str(tid)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(InvalidRequestError)
    async def _bad_request(request, exc: InvalidRequestError):
        return _error_response(APIError(400, clean_message(str(exc)), param=error_param(str(exc))))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug of ours: the client still gets OpenAI's error shape
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind))

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`)",
                           param="model", code="model_not_found")

    async def submit(prompt, params) -> Handle:
        try:
            return await engine_thread.submit(prompt, params)
        except InvalidRequestError as e:
            raise APIError(400, clean_message(str(e)), param=error_param(str(e))) from e
        except EngineStepError as e:
            raise APIError(503, str(e), "server_error") from e

    def sampling(body, max_tokens, logprobs, prompt_logprobs=None):
        try:
            return body.sampling(max_tokens, logprobs, prompt_logprobs)
        except InvalidRequestError as e:
            raise APIError(400, clean_message(str(e)), param=error_param(str(e))) from e

    async def collect(request: Request, handles: list[Handle]) -> None:
        """Wait for every handle's last delta; a client gone meanwhile aborts them."""
        async def drain(h):
            async for _ in h.deltas():
                pass
        task = asyncio.gather(*(drain(h) for h in handles))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected; its requests were aborted")
        except EngineStepError as e:
            raise APIError(500, str(e), "server_error") from e
        finally:
            if not task.done():
                task.cancel()
                for h in handles:
                    engine_thread.abort(h.rid)

    def usage(handles: list[Handle]) -> dict:
        p = sum(len(h.output.prompt_token_ids) for h in handles)
        c = sum(len(s.token_ids) for h in handles for s in h.output.samples)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def log_request(kind: str, rid: str, handles: list[Handle], t0: float) -> None:
        u = usage(handles)
        reasons = sorted({s.finish_reason or "?" for h in handles for s in h.output.samples})
        log.info("%s %s: %d prompt + %d completion tokens, finish %s, %.3f s", kind, rid, u["prompt_tokens"],
                 u["completion_tokens"], "/".join(reasons), time.perf_counter() - t0)

    def legacy_logprobs(ids: list[int], lps: list[dict[int, float] | None], offset: int) -> dict:
        """Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(ids, lps):
            out["tokens"].append(token_text(tid))
            out["token_logprobs"].append(None if lp is None else lp[tid])
            out["top_logprobs"].append(None if lp is None else {token_text(k): v for k, v in lp.items()})
            out["text_offset"].append(offset)
            offset += len(token_text(tid))
        return out

    def chat_logprobs(ids: list[int], lps: list[dict[int, float]], k: int) -> dict:
        def entry(tid, lp):
            s = token_text(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**entry(tid, lp[tid]), "top_logprobs": [
            entry(t, v) for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:k]]} for tid, lp in zip(ids, lps)]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_events(request: Request, handles: list[Handle], chunk, options, first, done):
        """SSE from the handles' deltas, merged in arrival order; `chunk(i, handle, delta)` builds one
        event's object. Leaving early (client gone, server stopping) aborts what is unfinished."""
        final_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)

        async def events():
            q: asyncio.Queue = asyncio.Queue()

            async def pump(i, h):
                try:
                    async for d in h.deltas():
                        await q.put((i, h, d))
                except EngineStepError as e:
                    await q.put((i, h, e))
                await q.put((i, h, None))
            tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
            sent = [0] * len(handles)
            open_ = len(handles)
            try:
                if first is not None:
                    for obj in first():
                        yield sse(obj)
                while open_:
                    i, h, d = await q.get()
                    if d is None:
                        open_ -= 1
                    elif isinstance(d, EngineStepError):
                        yield sse(APIError(500, str(d), "server_error").body())
                    else:
                        obj = chunk(i, h, d)
                        if continuous:  # vLLM's continuous_usage_stats: the running usage in every chunk
                            sent[i] += len(d.token_ids)
                            p = len(h.output.prompt_token_ids)
                            obj["usage"] = {"prompt_tokens": p, "completion_tokens": sent[i],
                                            "total_tokens": p + sent[i]}
                        yield sse(obj)
                if final_usage:
                    yield sse({**chunk(None, None, None), "choices": [], "usage": usage(handles)})
                yield "data: [DONE]\n\n"
            finally:
                for t in tasks:
                    t.cancel()
                for h in handles:
                    if h.open_samples:
                        engine_thread.abort(h.rid)
                done()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        if not engine_thread.alive or engine_thread.broken is not None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "jaxinfer", "max_model_len": max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        check_model(body.model)
        prompts = body.prompts()
        if any(isinstance(p, str) for p in prompts) and tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        if body.echo and body.logprobs is not None and body.stream:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        params = sampling(body, max_seq_len if body.max_tokens is None else body.max_tokens, body.logprobs,
                          body.logprobs if body.echo and body.logprobs is not None else None)
        handles = []
        try:
            for p in prompts:
                handles.append(await submit(p, params))
        except APIError:
            for h in handles:
                engine_thread.abort(h.rid)
            raise
        rid, n = f"cmpl-{uuid.uuid4().hex}", params.n

        def prompt_text(h):
            return tokenizer.decode(h.output.prompt_token_ids) if tokenizer is not None else ""

        def base():
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        if body.stream:
            def first():
                if body.echo:
                    for i, h in enumerate(handles):
                        for s in range(n):
                            yield {**base(), "choices": [{"index": i * n + s, "text": prompt_text(h), "logprobs": None,
                                                          "finish_reason": None}]}

            def chunk(i, h, d):
                if d is None:
                    return base()
                lp = None if body.logprobs is None else legacy_logprobs(d.token_ids, d.logprobs, 0)
                return {**base(), "choices": [{"index": i * n + d.sample, "text": d.text, "logprobs": lp,
                                               "finish_reason": d.finish_reason}]}
            return stream_events(request, handles, chunk, body.stream_options, first,
                                 lambda: log_request("completion (stream)", rid, handles, t0))

        await collect(request, handles)
        choices = []
        for i, h in enumerate(handles):
            out = h.output
            for s in out.samples:
                text, lp = s.text or "", None
                if body.logprobs is not None:
                    ids, lps = list(s.token_ids), list(s.logprobs)
                    if body.echo:
                        ids, lps = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs) + lps
                    lp = legacy_logprobs(ids, lps, 0)
                if body.echo:
                    text = prompt_text(h) + text
                choices.append({"index": i * n + s.index, "text": text, "logprobs": lp,
                                "finish_reason": s.finish_reason})
        log_request("completion", rid, handles, t0)
        return {**base(), "choices": choices, "usage": usage(handles)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        check_model(body.model)
        if chat_template is None:
            raise APIError(400, f"the model `{model_name}` has no chat template (no chat_template in its "
                                "tokenizer_config.json or chat_template.jinja): use /v1/completions, or start the "
                                "server with --chat-template FILE", param="messages", code="no_chat_template")
        if tokenizer is None:
            raise APIError(400, "chat needs a tokenizer; this model has none", param="messages")
        try:
            text = chat_template.render([m.plain() for m in body.messages], body.add_generation_prompt)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = tokenizer.encode(text, add_special_tokens=False)
        max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None), max_seq_len)
        try:
            k = body.logprob_k()
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="top_logprobs") from e
        params = sampling(body, max_tokens, k)
        h = await submit(ids, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def base():
            return {"id": rid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                    "created": int(time.time()), "model": model_name}

        if body.stream:
            def first():
                for s in range(params.n):
                    yield {**base(), "choices": [{"index": s, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}

            def chunk(i, h_, d):
                if d is None:
                    return base()
                lp = None if k is None else chat_logprobs(d.token_ids, d.logprobs, k)
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                return {**base(), "choices": [{"index": d.sample, "delta": delta, "logprobs": lp,
                                               "finish_reason": d.finish_reason}]}
            return stream_events(request, [h], chunk, body.stream_options, first,
                                 lambda: log_request("chat (stream)", rid, [h], t0))

        await collect(request, [h])
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text or ""},
                    "logprobs": None if k is None else chat_logprobs(s.token_ids, s.logprobs, k),
                    "finish_reason": s.finish_reason} for s in h.output.samples]
        log_request("chat", rid, [h], t0)
        return {**base(), "choices": choices, "usage": usage([h])}

    return app
