"""OpenAI chat-completions requests -> batcher tickets (schema and errors: `openai_protocol.py`).

`RequestHandler.prepare` turns a request body into the batcher's inputs (conversation with
`<image>` tags, decoded images, a GenerationConfig) or raises `APIError`: body too large (413),
malformed or too deeply nested JSON / wrong types / values no sampler can honour / bad images /
too many images or pixels / text or `max_tokens` over the context (400), unknown model (404).
`admit` refuses (503) before the body is read when the batcher and the requests being prepared
already fill every place; `read` gives the body until the request's deadline (408);
`preparation` bounds how many are parsed and decoded at once; `submit` maps a full queue to 503. `Events` waits for a ticket's events, watching the deadline (504) and the client (499). The
routes are in `server.py`; the limits and their defaults are in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from ..data.constants import IMAGE_TOKEN
from ..data.images import load_image
from ..errors import ConfigError, ImageError, TemplateError
from ..model.templates import content_text
from .batching import ContinuousBatcher, EngineClosedError, QueueFullError, StreamEvent, Ticket
from .compute_threads import one_intra_op_thread
from .generation import GenerationConfig, GenerationRequest
from .openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ServerConfig,
    read_body,
    sse,
    usage,
    validation_error,
)

__all__ = ["APIError", "Events", "RequestHandler", "ServerConfig", "read_body", "sse", "usage"]

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string: each is searched for in the answer at every token

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_POLL_S = 0.25  # how often a waiting request checks for a client that went away


def _stops(body: ChatCompletionRequest) -> list[str]:
    """The request's stop strings, or 400 when there are too many or one is too long."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"a stop string has at most {MAX_STOP_CHARS} characters", param="stop")
    return stop


class RequestHandler:
    """Turns OpenAI requests into batcher tickets; one per app."""

    def __init__(self, batcher: ContinuousBatcher, config: ServerConfig):
        self.batcher = batcher
        self.config = config
        self.pipeline = batcher.pipeline
        self.preparing = 0  # admitted requests not yet queued on the batcher (event loop only)
        batcher.incoming = lambda: self.preparing  # an idle batcher waits for them to batch together
        self._prepare_slots: asyncio.Semaphore | None = None
        vocab = self.pipeline.tokenizer.get_vocab()
        # No token stands for more characters than its longest spelling (x2 for normalisation that
        # merges characters), so text longer than this cannot fit the context, untokenized.
        self.max_text_chars = 2 * max(map(len, vocab), default=1) * self.pipeline.max_context

    # --- admission ---------------------------------------------------------------------------
    def _busy(self) -> APIError:
        b = self.batcher
        return APIError(
            503,
            f"server busy: {b.active} requests running, {b.queued} waiting and {self.preparing} being "
            f"read (limit {b.capacity}); retry later",
            type="server_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        )

    @asynccontextmanager
    async def admit(self):
        """A place for one request, held while it is read and prepared: 503 at once when the
        batcher's places are all taken or promised."""
        b = self.batcher
        if b.active + b.queued + self.preparing >= b.capacity:
            b.purge()  # requests already given up on hold no place
            if b.active + b.queued + self.preparing >= b.capacity:
                b.stats.rejected += 1
                raise self._busy()
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    @asynccontextmanager
    async def preparation(self):
        """One of the `max_preparing` slots for parsing a body and decoding its images (CPU and
        memory); reading the body from the network does not hold one."""
        if self._prepare_slots is None:
            self._prepare_slots = asyncio.Semaphore(max(1, self.config.max_preparing))
        async with self._prepare_slots:
            yield

    async def read(self, request: Request, deadline: float) -> bytes:
        """The body (413 past the limit), or 408 when it has not all arrived by the deadline."""
        try:
            return await asyncio.wait_for(
                read_body(request, self.config.max_body_bytes), max(deadline - time.monotonic(), 0.001)
            )
        except asyncio.TimeoutError:
            raise APIError(
                408, "the request body did not arrive within the server's timeout", code="timeout"
            ) from None

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

    def _load_images(self, image_urls: list[tuple[str, str]]) -> list:
        """Decode a request's images; each is checked (from its header) against what is left of
        the request's pixel budget before it is decoded."""
        images, left = [], self.config.max_request_pixels
        for url, param in image_urls:
            source = self._image_source(url, param)
            limit = min(self.config.max_image_pixels, left)
            if limit < 1:
                raise APIError(
                    400,
                    f"{param}: the request's images have more than {self.config.max_request_pixels} "
                    "pixels together; send fewer or smaller images",
                    param=param,
                    code="invalid_image",
                )
            try:
                image = load_image(source, max_pixels=limit, name=param)
            except ImageError as err:
                raise APIError(400, str(err), param=param, code="invalid_image") from None
            left -= image.width * image.height
            images.append(image)
        return images

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
            # "<image>" tags as predict and the Python API place them (interleaved parts keep their order).
            parts = [] if isinstance(content, str) else [part.model_dump() for part in content]
            turns.append({"role": role, "content": text if isinstance(content, str) else content_text(parts)})
        chars = sum(len(t["content"]) for t in turns)
        if chars > self.max_text_chars:
            raise APIError(
                400,
                f"the messages have {chars} characters, more than the model's context of "
                f"{self.pipeline.max_context} tokens can hold; shorten them",
                param="messages",
                code="context_length_exceeded",
            )
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
        stop = _stops(body)
        try:
            return GenerationConfig(
                max_new_tokens=requested or min(self.config.default_max_tokens, room),
                temperature=self.config.default_temperature if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                repetition_penalty=body.repetition_penalty or 1.0,
                stop=stop,
                seed=body.seed,
            ).validate()
        except ConfigError as err:  # its message starts with the field's name
            raise APIError(400, str(err), param=str(err).split(" ", 1)[0]) from None

    def prepare(self, raw: bytes) -> tuple[ChatCompletionRequest, Any, GenerationConfig]:
        """Body bytes -> (request, encoded conversation, generation config); runs in a thread."""
        one_intra_op_thread()  # the engine's thread computes in parallel; this one only prepares
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from None
        if body.model != self.config.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        _stops(body)  # cheap checks before the costly image decoding
        turns, image_urls = self._messages(body)
        images = self._load_images(image_urls)
        try:
            encoded = self.pipeline.encode(GenerationRequest(turns, images))
        except TemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        except ImageError as err:
            raise APIError(400, str(err), param="messages", code="invalid_image") from None
        return body, encoded, self._generation_config(body, len(encoded.input_ids))

    def submit(
        self, encoded, config: GenerationConfig, pieces: bool, deadline: float | None = None
    ) -> tuple[Ticket, asyncio.Queue]:
        """Queue on the batcher; events arrive on the returned queue (text pieces only if `pieces`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(event: StreamEvent) -> None:
            if pieces or event.final:
                loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            ticket = self.batcher.submit(encoded, config, sink, deadline)
        except QueueFullError:
            raise self._busy() from None
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
