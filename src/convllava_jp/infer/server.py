"""OpenAI-compatible HTTP server: `/v1/chat/completions` (plain and SSE), `/v1/models`, `/health`.

Requests are parsed and their images decoded in a thread pool (`openai_api.RequestHandler`), then
queued on one `ContinuousBatcher`, so concurrent requests are decoded together. Every bad input
gets a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` and the server
keeps serving; a client that goes away mid-request frees its batch slot.

The `openai` Python client works unchanged: `OpenAI(base_url="http://HOST:PORT/v1", api_key=K)`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from .batching import ContinuousBatcher, Ticket
from .openai_api import APIError, Events, RequestHandler, ServerConfig, read_body, sse, usage

log = logging.getLogger(__name__)

__all__ = ["APIError", "ServerConfig", "bind_socket", "create_app", "run_app", "serve", "serve_model"]


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal server error: {type(err).__name__}", type="server_error").response()


def _check_key(config: ServerConfig, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (when a key is set)."""
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
        raise APIError(
            401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
        )


def _add_model_routes(app: FastAPI, batcher: ContinuousBatcher, config: ServerConfig) -> None:
    """/health, /v1/models and /v1/models/{id}."""

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "convllava-jp"}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": config.model_name,
            "running": batcher.active,
            "queued": batcher.queued,
            "stats": asdict(batcher.stats),
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        _check_key(config, request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        _check_key(config, request)
        if model_id != config.model_name:
            raise APIError(
                404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return model_card()


class _Completion:
    """One chat completion's identity, and its answer in OpenAI's shapes (whole or as SSE chunks)."""

    def __init__(self, model_name: str):
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model_name

    def body(self, result: Any) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(result),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if usage:
            data["usage"] = usage
        return sse(data)


async def _wait_result(ticket: Ticket, events: Events) -> Any:
    """The ticket's result (its error raised); the ticket is cancelled however this ends."""
    try:
        while True:
            event = await events.next()
            if event.error is not None:
                raise event.error
            if event.result is not None:
                return event.result
    finally:
        ticket.cancel()


async def _stream(
    ticket: Ticket, events: Events, completion: _Completion, include_usage: bool
) -> AsyncIterator[str]:
    """The SSE body: a role chunk, content chunks, a finish chunk (+ usage), then [DONE]."""
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while True:
            try:
                event = await events.next()
            except APIError as err:
                if err.status != 499:
                    yield sse(err.body())
                break
            if event.piece:
                yield completion.chunk({"content": event.piece})
            if event.error is not None:
                log.error("request %d failed: %s", ticket.id, event.error)
                yield sse(APIError(500, f"generation failed: {event.error}", type="server_error").body())
                break
            if event.result is not None:
                yield completion.chunk({}, finish_reason=event.result.finish_reason)
                if include_usage:
                    yield completion.chunk({}, usage=usage(event.result))
                break
        yield sse("[DONE]")
    finally:
        # Also reached when the client disconnects (the response task is cancelled).
        ticket.cancel()


def _add_chat_route(app: FastAPI, handler: RequestHandler, config: ServerConfig) -> None:
    """POST /v1/chat/completions, plain or streamed."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(config, request)
        deadline = time.monotonic() + config.request_timeout_s
        raw = await read_body(request, config.max_body_bytes)
        body, encoded, gen_config = await run_in_threadpool(handler.prepare, raw)
        ticket, queue = handler.submit(encoded, gen_config, pieces=body.stream)
        events = Events(queue, request, deadline, config.request_timeout_s)
        completion = _Completion(config.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(ticket, events, completion, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return completion.body(await _wait_result(ticket, events))


def create_app(
    batcher: ContinuousBatcher, config: ServerConfig | None = None, manage_batcher: bool = True
) -> FastAPI:
    """The FastAPI app over a batcher; with `manage_batcher` the app starts and closes it."""
    config = config or ServerConfig()
    handler = RequestHandler(batcher, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_batcher:
            batcher.start()
        yield
        if manage_batcher:
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="ConvLLaVA-JP", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.handler = handler
    _add_error_handlers(app)
    _add_model_routes(app, batcher, config)
    _add_chat_route(app, handler, config)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    return sock


def run_app(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run an ASGI app with uvicorn until interrupted (port 0 picks a free port, logged)."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    log.info("serving on http://%s:%d", host, actual)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def serve(
    batcher: ContinuousBatcher, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Serve a (not yet started) batcher until interrupted (`convllava-jp serve`)."""
    run_app(create_app(batcher, config), host, port)


def serve_model(
    load_batcher: Callable[[], ContinuousBatcher],
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """`convllava-jp serve`: check the port and options first, then load the model and serve."""
    bind_socket(host, port).close()  # fail before loading the model if the port is taken
    if config.allow_local_files is not None:
        allow = Path(config.allow_local_files)
        if not allow.is_dir():
            raise ConfigError(f"--allow-local-files {allow}: not a directory")
        config.allow_local_files = allow.resolve()
    serve(load_batcher(), config, host, port)
