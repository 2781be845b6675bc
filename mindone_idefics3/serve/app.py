"""The HTTP layer: FastAPI routes for /v1/chat/completions, /v1/models, /health, /ready and /metrics.

Requests are validated (protocol.py) and prepared (prepare.py) here, then handed to the engine; answers come
back as events on the job's queue. Every refusal goes through `errors.error_response` (OpenAI's error body).
Two ASGI middlewares stand between the network and the routes: `AccessLog` (a request id and one log line per
request, logs.py) and `ClientLimits` (what a client may cost: body size and time, how long it may leave an answer
unread).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol
from .engine import Delta, Engine, Failed, Finished, Job
from .errors import APIError, error_body, error_response
from .logs import log_access
from .prepare import Preparer

log = logging.getLogger("mindone_idefics3.serve")

CHAT_PATH = "/v1/chat/completions"


@dataclass
class Settings:
    served_model_name: str
    api_key: Optional[str] = None
    max_request_bytes: int = 32 * 2**20
    request_timeout: float = 30.0  # seconds for the body to arrive, and for each piece of an answer to be taken


class ClientLimits:
    """ASGI middleware, what one client may cost the server:
    - 413 for a request body over `limit` bytes (by Content-Length, or counted while it arrives);
    - 408 when the body has not fully arrived `timeout` seconds after the headers (a client sending slowly holds
      nothing but its own connection for that long);
    - a response message the client does not take within `timeout` seconds (it stopped reading) ends the response:
      the connection is closed and the request's row freed (the engine's side is bounded by the job's event queue);
    and counts chat-completion answers by status for /metrics."""

    def __init__(self, app, limit: int, timeout: float, metrics):
        self.app, self.limit, self.timeout, self.metrics = app, limit, timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        counted = scope["path"] == CHAT_PATH
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self.timeout
        body_done = False

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except asyncio.TimeoutError:
                raise _ClientNotReading() from None

        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(self._too_big())(scope, receive, counting_send)
        received = 0

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body: only http.disconnect can come, and it may take as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _Refused(APIError(408, f"the request body did not arrive within {self.timeout:g} s "
                                             "(--request-timeout)", code="request_timeout",
                                        headers={"Connection": "close"})) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    raise _Refused(self._too_big())
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except _ClientNotReading:
            log.warning("%s %s: the client did not take the answer for %g s (--request-timeout); connection "
                        "closed", scope.get("method"), scope["path"], self.timeout)
            scope.setdefault("state", {}).setdefault("access", {})["error"] = "client_not_reading"

    def _too_big(self) -> APIError:
        return APIError(413, f"the request body is over this server's limit of {self.limit} bytes "
                             "(--max-request-bytes); send smaller or fewer images", code="request_too_large",
                        headers={"Connection": "close"})


class _Refused(HTTPException):
    """An APIError raised while the body is read: FastAPI passes an HTTPException from the body on (any other
    exception there would become its generic 400); the app's handler answers with the APIError."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message, headers=error.headers)
        self.error = error


class _ClientNotReading(Exception):
    pass


class AccessLog:
    """ASGI middleware: gives every request an id (a chat completion's is its `id`; all answers carry it in
    `X-Request-Id`) and logs one line when it ends (logs.py). Routes add their fields to
    `request.state.access`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = protocol.completion_id() if scope["path"] == CHAT_PATH else f"req-{uuid.uuid4().hex[:24]}"
        client = scope.get("client")
        record = {"request_id": request_id, "method": scope.get("method"), "path": scope["path"], "status": None,
                  "client": client[0] if client else None, "start": start}
        scope.setdefault("state", {})["access"] = record

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record.pop("start")
            if record["status"] is None:
                record["status"] = 499  # the client went away before an answer started (nginx's code for it)
            record["total_s"] = time.perf_counter() - start
            log_access(record)


def create_app(engine: Engine, preparer_factory, settings: Settings) -> FastAPI:
    """preparer_factory: () -> Preparer, called once the engine is ready (the preparer's processor is loaded
    after the model's, on the engine's thread)."""
    state = {"preparer": None}
    preparer_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="mindone_idefics3 OpenAI-compatible server", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.add_middleware(ClientLimits, limit=settings.max_request_bytes, timeout=settings.request_timeout,
                       metrics=engine.metrics)
    app.add_middleware(AccessLog)  # added last: the outermost, it sees the answers of ClientLimits too

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(_validation_to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, _Refused):
            return error_response(exc.error)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; this server has POST {CHAT_PATH}, " \
                      "GET /v1/models, GET /health, GET /ready and GET /metrics"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with (--api-key)", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != settings.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves "
                                f"{settings.served_model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def prepare(body: protocol.ChatCompletionRequest):
        """On a pool thread: the preparer (made by the first request, after the model loaded), then the request."""
        with preparer_lock:
            if state["preparer"] is None:
                state["preparer"] = preparer_factory()
        return state["preparer"](body)

    @app.get("/health")
    async def health(request: Request):
        """Alive: 200 while the process serves (loading or ready); 503 only when the model failed to load.
        `/health?ready` is /ready."""
        if "ready" in request.query_params:
            return await ready()
        if engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": engine.load_error}, status_code=503)
        return {"status": "ok" if engine.ready.is_set() else "loading", "model": settings.served_model_name}

    @app.get("/ready")
    async def ready():
        """Ready for traffic: 200 once the model is loaded and warm (engine.ready), else 503 with Retry-After."""
        if engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": engine.load_error}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready", "model": settings.served_model_name, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return protocol.model_list(settings.served_model_name, created)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_auth(request)
        check_model(name)
        return protocol.model_list(settings.served_model_name, created)["data"][0]

    @app.post(CHAT_PATH)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        check_auth(request)
        check_model(body.model)
        record = request.state.access
        engine.begin_preparing()
        prepared = None
        try:
            prepared = await run_in_threadpool(prepare, body)
        finally:
            job = engine.submit(prepared, asyncio.get_running_loop())
        cid, now = record["request_id"], protocol.now()
        record.update(prompt_tokens=prepared.prompt_tokens, completion_tokens=0)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, cid, now, body.model, include_usage, record),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while True:
                event = await _next_event(job, record)
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    return protocol.completion(cid, now, body.model, "".join(pieces), event.reason,
                                               event.prompt_tokens, event.completion_tokens)
                else:
                    return JSONResponse(error_body(500, event.message), status_code=500)
        except asyncio.CancelledError:
            job.cancel()
            raise

    created = protocol.now()
    return app


async def _next_event(job: Job, record: dict):
    """The job's next event, noted in the access record (time to first token, completion tokens, finish)."""
    event = await job.events.get()
    if "ttft_s" not in record and isinstance(event, (Delta, Finished)):
        record["ttft_s"] = time.perf_counter() - record["start"]
    if isinstance(event, Finished):
        record.update(completion_tokens=event.completion_tokens, finish_reason=event.reason)
    elif isinstance(event, Failed):
        record.update(finish_reason="cancelled" if job.overflowed else "error",
                      error="client_not_reading" if job.overflowed else event.message[:200])
    return event


async def _sse(job: Job, cid: str, created: int, model: str, include_usage: bool,
               record: dict) -> AsyncIterator[str]:
    """The stream of a job as server-sent events: a role delta, content deltas, a last chunk with the
    finish_reason, the usage chunk (include_usage), `data: [DONE]`. A client that goes away cancels this
    generator; its row is freed at the next step."""
    def event(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield event(protocol.chunk(cid, created, model, {"role": "assistant", "content": ""},
                                   with_usage_field=include_usage))
        while True:
            item = await _next_event(job, record)
            if isinstance(item, Delta):
                yield event(protocol.chunk(cid, created, model, {"content": item.text},
                                           with_usage_field=include_usage))
            elif isinstance(item, Finished):
                yield event(protocol.chunk(cid, created, model, {}, item.reason, with_usage_field=include_usage))
                if include_usage:
                    yield event(protocol.usage_chunk(cid, created, model, item.prompt_tokens,
                                                     item.completion_tokens))
                break
            elif isinstance(item, Failed):
                yield event(error_body(500, item.message))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.cancelled.is_set() and "finish_reason" not in record:
            record["finish_reason"] = "cancelled"  # the client went away mid-stream
        job.cancel()  # a no-op once the row finished; frees it when the client went away mid-stream


def _validation_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # of a union's failed branches, report the deepest (e.g. the content part's unknown type, not "not a string")
    first = max(errors, key=lambda e: (e.get("type") == "union_tag_invalid", len(e.get("loc", ())))) if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}"
                             "); send a JSON object with Content-Type: application/json", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request body must be a JSON object like {\"model\": ..., \"messages\": [...]} "
                             "sent with Content-Type: application/json", code="invalid_json")
    # loc names the union branch tried ("str", "list[tagged-union[...]]"): keep the field names and indices only
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and
                                                                        (p == "str" or "[" in p))]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid request')}{more}", param=param,
                    code="invalid_request")
