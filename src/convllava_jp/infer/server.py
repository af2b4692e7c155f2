"""OpenAI-compatible HTTP server: `/v1/chat/completions` (plain and SSE), `/v1/models`, `/health`.

Requests are parsed and their images decoded in a thread pool (`openai_api.RequestHandler`), then
queued on one `ContinuousBatcher`, so concurrent requests are decoded together. Every bad input
gets a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` and the server
keeps serving; a client that goes away mid-request frees its batch slot. A 5xx says "internal
error" and an id; what went wrong is in the log under that id, never in the answer. POST bodies
must be `application/json` (415: a web page cannot send one without a CORS preflight), and a
server bound to loopback answers only requests whose Host header names loopback (DNS rebinding).

The `openai` Python client works unchanged: `OpenAI(base_url="http://HOST:PORT/v1", api_key=K)`.
"""

from __future__ import annotations

import hmac
import ipaddress
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
from .batching import ContinuousBatcher, EngineClosedError, Ticket
from .compute_threads import call_in_passing_thread
from .openai_api import APIError, Events, RequestHandler, ServerConfig, sse, usage

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
        return internal_error(err, request.url.path).response()


def internal_error(err: BaseException, where: str) -> APIError:
    """A 500 whose body says only "internal error" and an id; the detail is logged under the id."""
    error_id = secrets.token_hex(6)
    detail = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        detail += f" (caused by {type(err.__cause__).__name__}: {err.__cause__})"
    log.error("internal error %s on %s: %s", error_id, where, detail, exc_info=err)
    return APIError(500, f"internal error (id {error_id})", type="server_error", code="internal_error")


def generation_error(err: BaseException, where: str) -> APIError:
    """A request's failure in the batcher as an HTTP error: 504, 503, or an internal error."""
    if isinstance(err, TimeoutError):
        return APIError(504, "no answer within the server's timeout", type="timeout", code="timeout")
    if isinstance(err, EngineClosedError):
        return APIError(503, str(err), type="server_error", code="shutting_down")
    return internal_error(err, where)


def _check_json(request: Request) -> None:
    """415 unless the body is declared `application/json` (what a page can send with no preflight is not)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {media_type or 'none'!r}",
            code="unsupported_media_type",
        )


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
    """The ticket's result (its error raised as an APIError); the ticket is cancelled however this ends."""
    try:
        while True:
            event = await events.next()
            if event.error is not None:
                raise generation_error(event.error, f"request {ticket.id}")
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
                yield sse(generation_error(event.error, f"request {ticket.id}").body())
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
        _check_json(request)
        deadline = time.monotonic() + config.request_timeout_s
        async with handler.admit():  # 503 before the body is read when every place is taken
            raw = await handler.read(request, deadline)
            async with handler.preparation():
                body, encoded, gen_config = await run_in_threadpool(handler.prepare, raw)
            ticket, queue = handler.submit(encoded, gen_config, pieces=body.stream, deadline=deadline)
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
    if config.bind_host is not None and is_loopback(config.bind_host):
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)
    _add_error_handlers(app)
    _add_model_routes(app, batcher, config)
    _add_chat_route(app, handler, config)
    return app


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without the port."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: 400 unless the Host header names loopback or an allowed host.

    A page on another site that rebinds its DNS name to 127.0.0.1 still sends its own name as Host.
    """

    def __init__(self, app, allowed: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = _host_name(header)
            if header and not is_loopback(name) and name not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = APIError(
                    400,
                    f"Host {header!r} is not served here (a loopback server answers loopback names; "
                    "start it with --allow-host NAME for a proxy that keeps the client's Host)",
                    code="invalid_host",
                ).body()
                response = JSONResponse(body, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def warn_if_exposed(host: str, api_key: str | None) -> None:
    """A loud start-up warning when anyone on the network can use the server without a key."""
    if api_key or is_loopback(host):
        return
    line = "!" * 78
    log.warning(
        "\n%s\nlistening on %s with NO API KEY: anyone who can reach this address can use the model.\n"
        "Set --api-key or CONVLLAVA_API_KEY, or bind to 127.0.0.1 behind a proxy (docs/serving.md).\n%s",
        line,
        host,
        line,
    )


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
    if config.bind_host is None:
        config.bind_host = host
    run_app(create_app(batcher, config), host, port)


def serve_model(
    load_batcher: Callable[[], ContinuousBatcher],
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """`convllava-jp serve`: check the port and options first, then load the model and serve."""
    bind_socket(host, port).close()  # fail before loading the model if the port is taken
    config.bind_host = host
    warn_if_exposed(host, config.api_key)
    if config.allow_local_files is not None:
        allow = Path(config.allow_local_files)
        if not allow.is_dir():
            raise ConfigError(f"--allow-local-files {allow}: not a directory")
        config.allow_local_files = allow.resolve()
    # Loaded in a thread that ends: its OpenMP workers must not linger beside the engine's.
    serve(call_in_passing_thread(load_batcher), config, host, port)
