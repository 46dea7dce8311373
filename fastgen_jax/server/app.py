"""The HTTP application: OpenAI-compatible routes over one `AsyncEngine`.

`build_app(engine, ...)` returns a FastAPI app whose lifespan starts and stops the engine thread.
Every request passes `HTTPGuard` first (API key, body limits, stalled peers, one access-log line);
handlers turn the body into engine requests with `RequestBuilder` (shared with the offline batch job),
which checks everything the engine would refuse, so that a bad request gets its 400 before a stream
starts. Costs are bounded before they are paid: the number of sequences a request asks for (prompts x
n) is checked before any prompt is tokenized, and tokenizing, chat templates and building a whole
response run on worker threads, never on the event loop. Errors of every kind leave as OpenAI-style
JSON bodies; a server-side failure says only that it happened and the request id, and the details go
to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastgen_jax.llm_engine import LLMEngine
from fastgen_jax.server.async_engine import (
    ClientTooSlowError,
    EngineStepError,
    EngineStoppedError,
    QueueFullError,
    RequestGroup,
)
from fastgen_jax.server.guard import HTTPGuard, check_api_key, loggable
from fastgen_jax.server.metrics import ServerMetrics
from fastgen_jax.server.openai_format import Choice, Formatter
from fastgen_jax.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fastgen_jax.server.replicas import ReplicaRouter
from fastgen_jax.server.request_builder import PreparedRequest, RequestBuilder, validation_error
from fastgen_jax.server.request_log import RequestLog
from fastgen_jax.sla import SLA

log = logging.getLogger("fastgen_jax.server")

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
DEFAULT_MAX_STREAM_LAG = 1024


class ServerState(RequestBuilder):
    """What the handlers share: the engine bridge (one replica or several), metrics and the served
    model's name. The replicas serve the same model, so the first one answers questions about it."""

    def __init__(
        self,
        engines: list[LLMEngine],
        model_name: str,
        max_queue: int,
        sla: SLA,
        request_log: str | None = None,
        cache_aware_routing: bool = True,
        max_seqs_per_request: int | None = None,
        max_stream_lag: int = DEFAULT_MAX_STREAM_LAG,
        step_timeout: float | None = None,
        on_stall=None,
        reasoning_parser: str = "auto",
    ):
        self.request_log = RequestLog(request_log) if request_log else None
        self.async_engine = ReplicaRouter(
            engines,
            max_queue,
            on_finish=self._finished,
            cache_aware=cache_aware_routing,
            step_timeout=step_timeout,
            on_stall=on_stall,
        )
        slots = min(e.engine_config.max_num_seqs for e in engines)
        max_seqs = min(max_seqs_per_request or max(slots // 2, 1), slots)
        super().__init__(engines[0], model_name, self.async_engine.capacity, max_seqs, reasoning_parser)
        self.metrics = ServerMetrics(self.async_engine.replicas, sla)
        self.created = int(time.time())
        self.max_stream_lag = max_stream_lag

    def _finished(self, tracked, out, now: float) -> None:
        own_sla = tracked.request.sla
        verdict = self.metrics.request_finished(out, now, own_sla)
        if self.request_log is not None:
            self.request_log.write(out, now, verdict, own_sla)


# ---------------------------------------------------------------------- generation routes


async def _run(request: Request, state: ServerState, body, prepared: PreparedRequest) -> Response:
    requests, formatter = prepared.requests, prepared.formatter
    lag = state.max_stream_lag * len(requests) if body.stream else None  # a plain request drains its queue
    group = state.async_engine.submit(requests, max_pending=lag)
    request.scope["fastgen.log"] = f"id={formatter.request_id} n={len(requests)}"
    if body.stream:
        return StreamingResponse(
            _event_stream(request, group, formatter, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    choices = [Choice() for _ in requests]
    try:
        if not await _until_disconnect(request, _collect(group, choices)):
            return Response(status_code=499)  # the client has gone; its requests were aborted
    except EngineStepError:
        raise _server_failure(formatter.request_id) from None
    finally:
        group.close()
    content, usage = await asyncio.to_thread(_render, formatter, choices)  # per-token work: off the loop
    _note_usage(request, usage, [c.finish_reason for c in choices])
    return Response(content, media_type="application/json")


def _render(formatter: Formatter, choices: list[Choice]) -> tuple[bytes, dict[str, Any]]:
    result = formatter.response(choices)
    return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode(), result["usage"]


def _server_failure(request_id: str) -> APIError:
    """What a client is told when generation failed on the server (the log has the details)."""
    return APIError(500, f"generation failed on the server (request {request_id})", type="server_error")


async def _collect(group: RequestGroup, choices: list[Choice]) -> None:
    async for index, out in group:
        choices[index].add(out)


async def _until_disconnect(request: Request, work) -> bool:
    """Runs `work`; False (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done() and not watcher.done():  # this handler itself was cancelled
            task.cancel()
    if task.done():
        task.result()  # raises the engine's error, if any
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _event_stream(
    request: Request, group: RequestGroup, formatter: Formatter, include_usage: bool
) -> AsyncIterator[str]:
    reasons = {}
    try:
        async for index, out in group:
            for chunk in formatter.chunks(index, out):
                yield _sse(chunk)
            if out.finished:
                reasons[index] = out.finish_reason
        if include_usage:
            yield _sse(formatter.usage_chunk())
        _note_usage(request, formatter.usage(), list(reasons.values()))
    except EngineStepError:
        yield _sse(_server_failure(formatter.request_id).body())
    except EngineStoppedError as e:
        yield _sse(APIError(503, str(e), type="server_error").body())
    except ClientTooSlowError as e:
        request.scope["fastgen.log"] = f"{request.scope.get('fastgen.log', '')} aborted: {e}"
        yield _sse(APIError(408, str(e), code="client_too_slow").body())
    finally:
        group.close()
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _note_usage(request: Request, usage: dict[str, int], reasons: list[str | None]) -> None:
    request.scope["fastgen.log"] = (
        f"{request.scope.get('fastgen.log', '')} prompt={usage['prompt_tokens']} "
        f"completion={usage['completion_tokens']} finish={','.join(str(r) for r in reasons)}"
    )


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prepared = await asyncio.to_thread(state.completion, body)  # tokenizing: off the event loop
        return await _run(request, state, body, prepared)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prepared = await asyncio.to_thread(state.chat, body)
        return await _run(request, state, body, prepared)


# ---------------------------------------------------------------------- other routes


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    def model_card() -> dict[str, Any]:
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "fastgen-jax",
            "max_model_len": state.engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        state.check_model(model)
        return model_card()

    @app.get("/health")
    async def health():
        """Liveness: the engine threads run. 503 means restart the process."""
        if not state.async_engine.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        return {"status": "ok"}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Forgets every cached prefix page (benchmarks start cold with it); behind the API key."""
        return {"status": "ok", "pages_forgotten": await state.async_engine.reset_prefix_cache()}

    @app.get("/ready")
    async def ready():
        """Readiness: some replica runs and its last forward pass (or probe) worked. 503 means send
        traffic elsewhere for now; the engine probes itself until a step works again."""
        replicas = state.async_engine.readiness()
        body = {"status": "ready" if any(r["ready"] for r in replicas) else "unready", "replicas": replicas}
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = await asyncio.to_thread(
                state.encode, body.prompt, "prompt", add_special_tokens=body.add_special_tokens
            )
        else:
            ids = await asyncio.to_thread(state.encode_chat, body, {})
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = state.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must lie in [0, {vocab}); got {bad[:5]}", "tokens")
        return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}


# ---------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    def reply(request: Request, error: APIError) -> JSONResponse:
        request.scope["fastgen.log"] = f"error: {error.message}"
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return reply(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return reply(request, APIError(429, str(exc), type="rate_limit_error", code="queue_full"))

    @app.exception_handler(EngineStoppedError)
    async def stopped(request: Request, exc: EngineStoppedError):
        return reply(request, APIError(503, str(exc), type="server_error"))

    @app.exception_handler(EngineStepError)
    async def step_failed(request: Request, exc: EngineStepError):
        return reply(request, _server_failure("unknown"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        error_id = f"err-{uuid.uuid4().hex[:12]}"
        log.error(
            "unexpected error %s in %s %s", error_id, request.method, loggable(request.url.path), exc_info=exc
        )
        return reply(request, APIError(500, f"internal error (id {error_id})", type="server_error"))


# ---------------------------------------------------------------------- the app


def build_app(
    engine: LLMEngine | list[LLMEngine],
    model_name: str,
    *,
    api_key: str | None = None,
    max_queue: int = 1024,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    sla: SLA | None = None,
    request_log: str | None = None,
    cache_aware_routing: bool = True,
    max_seqs_per_request: int | None = None,
    max_stream_lag: int = DEFAULT_MAX_STREAM_LAG,
    body_timeout: float = 30.0,
    send_timeout: float = 60.0,
    step_timeout: float | None = None,
    on_stall=None,
    reasoning_parser: str = "auto",
) -> FastAPI:
    """The server for one warmed-up engine, or for replicas of one model (a list of engines, each on
    its own devices, balanced by outstanding work); the app's lifespan runs the engine threads.
    `/metrics` judges finished requests by `sla` (default: FastGen's 512 prompt tokens/s, 4 tokens/s),
    `request_log` names a JSONL file that gets a line per finished request, and `cache_aware_routing`
    lets replicas keep the prompts whose prefixes they hold (`server.replicas`).

    Limits (the README lists them with their flags): a request asks for at most `max_seqs_per_request`
    sequences, prompts x n (default half the smallest replica's max_num_seqs); a stream whose client
    leaves more than `max_stream_lag` outputs per sequence unread is aborted; a body must arrive
    within `body_timeout` seconds and a client that reads nothing for `send_timeout` seconds is cut
    off. A forward pass running longer than `step_timeout` seconds (None: no watchdog) fails its
    replica's requests and calls `on_stall(replica_index)` (serve exits the process).
    `reasoning_parser` (auto, none or a name in `fastgen_jax.reasoning.REASONING_PARSERS`) splits a thinking
    model's chat answers into reasoning_content and content; auto does so for the Qwen3 families."""
    check_api_key(api_key)  # the middleware is only built at the first request: fail now
    engines = engine if isinstance(engine, list) else [engine]
    state = ServerState(
        engines,
        model_name,
        max_queue,
        sla or SLA(),
        request_log,
        cache_aware_routing=cache_aware_routing,
        max_seqs_per_request=max_seqs_per_request,
        max_stream_lag=max_stream_lag,
        step_timeout=step_timeout,
        on_stall=on_stall,
        reasoning_parser=reasoning_parser,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.async_engine.stop)
            if state.request_log is not None:
                state.request_log.close()

    app = FastAPI(title="fastgen-jax", lifespan=lifespan)
    app.state.server = state
    _add_generation_routes(app, state)
    _add_info_routes(app, state)
    _add_error_handlers(app)
    app.add_middleware(
        HTTPGuard,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
        body_timeout=body_timeout,
        send_timeout=send_timeout,
    )
    return app
