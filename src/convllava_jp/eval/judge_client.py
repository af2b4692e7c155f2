"""One request to an OpenAI-compatible `/v1/chat/completions` judge: where, with which key, retries.

httpx rather than the `openai` package: the same retry policy (429/408/409/5xx, `Retry-After`,
jitter) in a few lines, and no runtime dependency on a vendor SDK.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["JudgeConfig", "ask_judge"]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_SNIPPET_CHARS = 500
_ITEM_KEYS = ("context", "question", "reference", "answer")
_MAX_RETRY_AFTER_S = 120.0


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class JudgeConfig:
    """Where and how to ask the judge.

    `url` is a server root (`http://host:8000`), its `/v1`, or the full `/v1/chat/completions`.
    The API key is `api_key`, else the env var named by `api_key_env`; with neither, no
    Authorization header is sent (fine for local servers). A key is never sent over plain http
    to a host other than loopback (ConfigError). Up to `max_retries` retries on
    429/408/409/5xx/connection errors, sleeping `backoff_s * 2**i` (or the server's
    `Retry-After`, whichever is longer) plus up to 25% jitter before retry i.
    """

    url: str
    model: str
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    max_tokens: int = 1024
    seed: int | None = 0
    max_workers: int = 4

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"JudgeConfig.url must start with http:// or https://, got {self.url!r}.")
        if not self.model:
            raise ConfigError(
                "JudgeConfig.model is empty; give the judge model name (e.g. gpt-4o-2024-05-13)."
            )
        if self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.max_workers < 1:
            raise ConfigError(
                f"JudgeConfig needs max_retries >= 0, backoff_s >= 0, timeout_s > 0, max_workers >= 1; "
                f"got {self.max_retries}, {self.backoff_s}, {self.timeout_s}, {self.max_workers}."
            )

    @property
    def endpoint(self) -> str:
        """The full chat-completions URL."""
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        if url.endswith("/v1"):
            return url + "/chat/completions"
        return url + "/v1/chat/completions"

    def headers(self) -> dict[str, str]:
        """Request headers, with `Authorization` when a key is known (and the URL is safe for it)."""
        key = self.api_key or os.environ.get(self.api_key_env)
        headers = {"Content-Type": "application/json"}
        if key:
            parts = urlsplit(self.url)
            if parts.scheme != "https" and not _is_loopback(parts.hostname or ""):
                raise ConfigError(
                    f"refusing to send the judge API key over plain http to {parts.hostname!r}: use an "
                    f"https:// URL, a loopback address, or unset {self.api_key_env} for a keyless server."
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def describe(self) -> dict[str, Any]:
        """The settings recorded beside every judged score (no key, no credentials in the URL)."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return {
            "model": self.model,
            "url": f"{parts.scheme}://{netloc}{parts.path}",
            "temperature": self.temperature,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "max_retries": self.max_retries,
        }


def _read_completion(response: httpx.Response) -> tuple[str | None, str | None]:
    """(message content, server-reported model) from a chat-completions reply; None where missing."""
    try:
        data = response.json()
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    version = data.get("model") if isinstance(data.get("model"), str) else None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, version
    return (content if isinstance(content, str) else None), version


def _retry_after(response: httpx.Response | None) -> float:
    """Seconds a `Retry-After` header asks for (number or HTTP date), capped; 0 when absent or bad."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 0.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds != seconds or seconds <= 0:  # NaN or in the past
        return 0.0
    return min(seconds, _MAX_RETRY_AFTER_S)


def _payload(cfg: JudgeConfig, messages: list[dict], max_tokens: int | None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": max_tokens or cfg.max_tokens,
    }
    if cfg.seed is not None:
        payload["seed"] = cfg.seed
    return payload


def ask_judge(
    cfg: JudgeConfig,
    messages: list[dict],
    parse: Callable[[str], Any],
    *,
    client: httpx.Client,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Ask the judge once (with retries); {"value", "raw", "error", "judge_model_version", "attempts"}.

    `parse(text)` reads the value from the reply, None when it cannot; an unreadable reply is
    asked once more, then recorded as error "parse". A parser that raises is recorded the same
    way (its exception in `error`). Transport and HTTP failures end as "connection: ..." or
    "http <status>: ...". Never raises for anything the server sends.
    """
    payload = _payload(cfg, messages, max_tokens)
    headers = cfg.headers()
    out: dict[str, Any] = {"value": None, "raw": None, "error": None}
    out.update(judge_model_version=None, attempts=0)
    retries = parse_failures = 0
    while True:
        out["attempts"] += 1
        response = None
        try:
            response = client.post(cfg.endpoint, json=payload, headers=headers, timeout=cfg.timeout_s)
        except httpx.TransportError as exc:
            error = f"connection: {type(exc).__name__}: {exc}"
        else:
            status = response.status_code
            if status < 400:
                content, version = _read_completion(response)
                out["raw"] = content if content is not None else response.text[:_SNIPPET_CHARS]
                out["judge_model_version"] = version or out["judge_model_version"]
                try:
                    value = parse(content or "")
                except Exception as exc:  # a parser bug or a hostile number: this item's result
                    value, why = None, f"parse: {type(exc).__name__}: {str(exc)[:200]}"
                else:
                    why = "parse"
                if value is not None:
                    out.update(value=value, error=None)
                    return out
                parse_failures += 1
                if parse_failures >= 2:
                    logger.warning("judge reply has no readable verdict after a retry: %r", out["raw"][:200])
                    out["error"] = why
                    return out
                continue
            error = f"http {status}: {response.text[:_SNIPPET_CHARS]}"
            if status < 500 and status not in _RETRYABLE_STATUS:
                logger.error("judge request failed, not retrying: %s", error)
                out["error"] = error
                return out
        if retries >= cfg.max_retries:
            logger.error("judge request failed after %d attempts: %s", out["attempts"], error)
            out["error"] = error
            return out
        delay = max(cfg.backoff_s * 2**retries, _retry_after(response))
        delay += random.uniform(0, 0.25 * delay)
        logger.warning(
            "judge request failed (%s); retry %d/%d in %.2fs", error, retries + 1, cfg.max_retries, delay
        )
        time.sleep(delay)
        retries += 1
