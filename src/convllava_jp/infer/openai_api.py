"""The OpenAI chat-completions protocol: request schema, errors in OpenAI's shape, request parsing.

`RequestHandler.prepare` turns a request body into the batcher's inputs (conversation with
`<image>` tags, decoded images, a GenerationConfig) or raises `APIError`: body too large (413),
malformed JSON / wrong types / bad images / too many images / `max_tokens` over the context (400),
unknown model (404); `submit` maps a full queue to 503. `Events` waits for a ticket's events,
watching the deadline (504) and the client (499). The routes are in `server.py`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.constants import IMAGE_TOKEN
from ..data.images import load_image
from ..errors import ConfigError, ImageError, TemplateError
from .batching import ContinuousBatcher, EngineClosedError, QueueFullError, StreamEvent, Ticket
from .generation import GenerationConfig, GenerationRequest

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_POLL_S = 0.25  # how often a waiting request checks for a client that went away


@dataclass
class ServerConfig:
    """Limits and options of the HTTP server.

    model_name: the id clients send as `model` (and /v1/models lists).
    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>`.
    allow_local_files: a directory whose files may be named as image URLs (`file://...` or an
        absolute path); None: only base64 `data:` URLs.
    max_body_bytes / max_images / max_image_pixels: per request.
    request_timeout_s: from arrival to the last token, queue wait included.
    default_max_tokens / default_temperature: when a request gives no `max_tokens` / `temperature`.
    """

    model_name: str = "convllava-jp"
    api_key: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 20 * 2**20
    max_images: int = 4
    max_image_pixels: int = 25_000_000
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default when a request sets none


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- request schema (OpenAI's chat completions, the fields this server uses) -------------------
class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | str | None = None


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)  # not OpenAI: extra_body


# --- helpers ------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    too_large = APIError(
        413,
        f"request body larger than the server's limit of {limit} bytes; send smaller images",
        param=None,
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return APIError(400, f"invalid value for {param or 'the body'}: {first.get('msg')}", param=param)


class RequestHandler:
    """Turns OpenAI requests into batcher tickets; one per app."""

    def __init__(self, batcher: ContinuousBatcher, config: ServerConfig):
        self.batcher = batcher
        self.config = config
        self.pipeline = batcher.pipeline

    # --- images ------------------------------------------------------------------------------
    def _image_source(self, url: str, param: str):
        """bytes or a path for an image_url, or APIError."""
        match = _DATA_URL.match(url)
        if match:
            data = "".join(match.group("data").split())
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(
                    400, f"{param}: invalid base64 in the data URL", param=param, code="invalid_base64"
                ) from None
        if url.startswith("data:"):
            raise APIError(
                400,
                f"{param}: only base64 data URLs are supported (data:image/png;base64,...)",
                param=param,
                code="invalid_image_url",
            )
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
            raise APIError(
                400,
                f"{param}: remote image URLs are not fetched; send the image as a base64 data URL",
                param=param,
                code="invalid_image_url",
            )
        root = self.config.allow_local_files
        if root is None:
            raise APIError(
                400,
                f"{param}: local image files are not allowed (start the server with --allow-local-files DIR); "
                "send the image as a base64 data URL",
                param=param,
                code="invalid_image_url",
            )
        path = Path(url[len("file://") :] if url.startswith("file://") else url)
        try:
            resolved = path.resolve(strict=False)
            allowed = resolved.is_relative_to(root.resolve())
        except (OSError, ValueError):
            allowed = False
        if not allowed:
            raise APIError(
                403, f"{param}: {path} is outside the allowed directory", param=param, code="forbidden_path"
            )
        return resolved

    def _load_image(self, url: str, param: str):
        source = self._image_source(url, param)
        try:
            return load_image(source, max_pixels=self.config.max_image_pixels, name=param)
        except ImageError as err:
            raise APIError(400, str(err), param=param, code="invalid_image") from None

    # --- request -> ticket inputs ------------------------------------------------------------
    def _messages(self, body: ChatCompletionRequest) -> tuple[list[dict], list[tuple[str, str]]]:
        """Conversation turns with `<image>` tags, and (url, param) of each image in tag order.

        A message's images go before its text, as in training ("<image>\\n質問").
        """
        turns: list[dict] = []
        image_urls: list[tuple[str, str]] = []
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                raise APIError(400, f"messages.{i}.content is required", param=f"messages.{i}.content")
            texts: list[str] = []
            n_images = 0
            if isinstance(content, str):
                texts.append(content)
            else:
                for j, part in enumerate(content):
                    param = f"messages.{i}.content.{j}"
                    if part.type == "text":
                        if part.text is None:
                            raise APIError(400, f"{param}.text is required", param=f"{param}.text")
                        texts.append(part.text)
                        continue
                    if part.image_url is None:
                        raise APIError(400, f"{param}.image_url is required", param=f"{param}.image_url")
                    if role != "user":
                        raise APIError(400, f"{param}: images are only allowed in user messages", param=param)
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    image_urls.append((url, f"{param}.image_url"))
                    n_images += 1
            text = "\n".join(texts)
            if IMAGE_TOKEN in text:
                raise APIError(
                    400,
                    f"messages.{i}: the text contains {IMAGE_TOKEN}; send images as image_url parts",
                    param=f"messages.{i}.content",
                )
            turns.append({"role": role, "content": (IMAGE_TOKEN + "\n") * n_images + text})
        if len(image_urls) > self.config.max_images:
            raise APIError(
                400,
                f"{len(image_urls)} images in the request; this server takes at most {self.config.max_images}",
                param="messages",
                code="too_many_images",
            )
        if turns[-1]["role"] != "user":
            raise APIError(400, "the last message must be a user message", param="messages")
        return turns, image_urls

    def _generation_config(self, body: ChatCompletionRequest, prompt_tokens: int) -> GenerationConfig:
        context = self.pipeline.max_context
        room = context - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the conversation has {prompt_tokens} tokens, the model's context is {context}; shorten it",
                param="messages",
                code="context_length_exceeded",
            )
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"max_tokens is {requested} but the prompt has {prompt_tokens} tokens and the model's "
                f"context is {context}: at most {room} new tokens fit",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")
        try:
            return GenerationConfig(
                max_new_tokens=requested or min(self.config.default_max_tokens, room),
                temperature=self.config.default_temperature if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                repetition_penalty=body.repetition_penalty or 1.0,
                stop=stop,
                seed=body.seed,
            ).validate()
        except ConfigError as err:
            raise APIError(400, str(err)) from None

    def prepare(self, raw: bytes) -> tuple[ChatCompletionRequest, Any, GenerationConfig]:
        """Body bytes -> (request, encoded conversation, generation config); runs in a thread."""
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            raise _validation_error(err) from None
        if body.model != self.config.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        turns, image_urls = self._messages(body)
        images = [self._load_image(url, param) for url, param in image_urls]
        try:
            encoded = self.pipeline.encode(GenerationRequest(turns, images))
        except TemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        except ImageError as err:
            raise APIError(400, str(err), param="messages", code="invalid_image") from None
        return body, encoded, self._generation_config(body, len(encoded.input_ids))

    def submit(self, encoded, config: GenerationConfig, pieces: bool) -> tuple[Ticket, asyncio.Queue]:
        """Queue on the batcher; events arrive on the returned queue (text pieces only if `pieces`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(event: StreamEvent) -> None:
            if pieces or event.final:
                loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            ticket = self.batcher.submit(encoded, config, sink)
        except QueueFullError as err:
            raise APIError(
                503, str(err), type="server_error", code="server_busy", headers={"Retry-After": "1"}
            ) from None
        except EngineClosedError as err:
            raise APIError(503, str(err), type="server_error", code="shutting_down") from None
        except ConfigError as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
        return ticket, events


class Events:
    """A ticket's events as the request handler waits for them, watching the clock and the client.

    `next()` raises APIError 504 at the deadline and 499 once the client has gone; the client is
    checked every `_POLL_S` even while pieces keep arriving.
    """

    def __init__(self, queue: asyncio.Queue, request: Request, deadline: float, timeout_s: float):
        self.queue, self.request, self.deadline, self.timeout_s = queue, request, deadline, timeout_s
        self.next_check = time.monotonic() + _POLL_S

    async def next(self) -> StreamEvent:
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise APIError(
                    504,
                    f"no answer within the server's timeout of {self.timeout_s:g} s",
                    type="timeout",
                    code="timeout",
                )
            if now >= self.next_check:
                self.next_check = now + _POLL_S
                if await self.request.is_disconnected():
                    raise APIError(499, "client closed the request", code="client_closed")
            try:
                return await asyncio.wait_for(
                    self.queue.get(), timeout=max(min(self.next_check, self.deadline) - now, 0.001)
                )
            except asyncio.TimeoutError:
                continue


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
