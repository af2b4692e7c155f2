"""OpenAI's chat-completions protocol as this server speaks it: the server's limits, the request
schema, errors in OpenAI's shape, body reading and SSE framing. `openai_api.py` turns requests into
batcher tickets with these; `server.py` holds the routes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass
class ServerConfig:
    """Limits and options of the HTTP server.

    model_name: the id clients send as `model` (and /v1/models lists).
    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>`.
    allow_local_files: a directory whose files may be named as image URLs (`file://...` or an
        absolute path); None: only base64 `data:` URLs.
    max_body_bytes / max_images: per request.
    max_image_pixels / max_request_pixels: width x height of one image / of all a request's images
        together, checked from each image's header before it is decoded.
    max_preparing: requests whose body is parsed and images decoded at the same time; more wait.
    request_timeout_s: from arrival to the last token, queue wait included.
    default_max_tokens / default_temperature: when a request gives no `max_tokens` / `temperature`.
    bind_host / allowed_hosts: when bound to a loopback address, requests must name a loopback host
        or one of `allowed_hosts` in their Host header (a DNS-rebinding page cannot).
    """

    model_name: str = "convllava-jp"
    api_key: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 20 * 2**20
    max_images: int = 4
    max_image_pixels: int = 16_000_000
    max_request_pixels: int = 32_000_000
    max_preparing: int = 4
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default when a request sets none
    bind_host: str | None = None
    allowed_hosts: tuple[str, ...] = ()


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
    # below GenerationConfig's TEMPERATURE_FLOOR (0.01) decoding is greedy
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    # not OpenAI (extra_body); the range transformers' own penalty keeps finite
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10, allow_inf_nan=False)


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


def validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return APIError(400, f"invalid value for {param or 'the body'}: {first.get('msg')}", param=param)


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
