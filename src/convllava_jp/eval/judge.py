"""LLM-as-judge for Heron-Bench over any OpenAI-compatible `/v1/chat/completions` endpoint.

httpx instead of the openai package: one POST with retries is all we need, and it keeps the
judge usable against vLLM / llama.cpp / our own server without another dependency.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm.auto import tqdm

from convllava_jp.errors import ConfigError, DataError
from convllava_jp.eval.metrics import parse_judge_response

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "JudgeConfig",
    "build_judge_messages",
    "build_judge_prompt",
    "judge_many",
    "judge_one",
]

JUDGE_SYSTEM_PROMPT = "You are a careful and impartial assistant who checks the quality of answers."

_JUDGE_INSTRUCTION = """\
You are an expert evaluator of answers to questions about an image. You cannot see the image;
its content is described in the context below.

You are given:
- Context: a description of the image.
- Question: a question about the image.
- Reference Answer: an answer written by a strong assistant.
- Model Answer: the answer of the model being evaluated.

Rate each answer on its own, from 1 to 10, by how correct, relevant and complete it is as an
answer to the question, given the context:
- 10: Perfect. Correct, relevant, and fully answers the question.
- 8-9: Very good. Mostly correct; only small inaccuracies or omissions.
- 6-7: Good. Broadly correct but with noticeable errors or missing details.
- 4-5: Poor. Significant errors or missing key points, though partly relevant.
- 1-3: Very poor. Mostly or entirely wrong, irrelevant, or nonsensical.
The texts are in Japanese; judge the content, not the language. Neither the order nor the
length of the answers should affect the scores.

Reply with this JSON object and nothing else, where "score_gpt" is the score of the Reference
Answer and "score" is the score of the Model Answer:
```json
{"score_gpt": <integer 1-10>, "score": <integer 1-10>}
```"""

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_SNIPPET_CHARS = 500
_ITEM_KEYS = ("context", "question", "reference", "answer")


@dataclass
class JudgeConfig:
    """Where and how to ask the judge.

    `url` is a server root (`http://host:8000`), its `/v1`, or the full `/v1/chat/completions`.
    The API key is `api_key`, else the env var named by `api_key_env`; with neither, no
    Authorization header is sent (fine for local servers). Up to `max_retries` retries on
    429/408/409/5xx/connection errors, sleeping `backoff_s * 2**i` before retry i.
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

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"JudgeConfig.url must start with http:// or https://, got {self.url!r}.")
        if not self.model:
            raise ConfigError(
                "JudgeConfig.model is empty; give the judge model name (e.g. gpt-4o-2024-05-13)."
            )
        if self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError(
                f"JudgeConfig needs max_retries >= 0, backoff_s >= 0, timeout_s > 0; got "
                f"{self.max_retries}, {self.backoff_s}, {self.timeout_s}."
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
        """Request headers, with `Authorization` when a key is known."""
        key = self.api_key or os.environ.get(self.api_key_env)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers


def build_judge_prompt(context: str, question: str, reference: str, answer: str) -> str:
    """The user message: instructions, then the context, question and both answers."""
    return (
        f"{_JUDGE_INSTRUCTION}\n\n"
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Reference Answer]\n{reference}\n[End of Reference Answer]\n\n"
        f"[Model Answer]\n{answer}\n[End of Model Answer]\n\n"
        "Output:"
    )


def build_judge_messages(context: str, question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """Chat messages (system + user) for one Heron-Bench item."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": build_judge_prompt(context, question, reference, answer)},
    ]


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


def _payload(cfg: JudgeConfig, messages: list[dict]) -> dict[str, Any]:
    """The chat-completions request body for the judge."""
    payload: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    if cfg.seed is not None:
        payload["seed"] = cfg.seed
    return payload


def judge_one(
    cfg: JudgeConfig,
    context: str,
    question: str,
    reference: str,
    answer: str,
    *,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """Ask the judge to score one Heron-Bench item.

    Returns {"score_gpt", "score", "raw", "error", "judge_model", "judge_model_version",
    "attempts"}. On success `error` is None and the scores are 1-10. On failure both scores are
    -1 and `error` says why: "parse" (the judge answered twice without readable scores),
    "http <status>: ..." or "connection: ...". `raw` is the judge's last reply text, if any.
    """
    if client is None:
        with httpx.Client(timeout=cfg.timeout_s) as own_client:
            return judge_one(cfg, context, question, reference, answer, client=own_client)

    payload = _payload(cfg, build_judge_messages(context, question, reference, answer))
    headers = cfg.headers()
    result: dict[str, Any] = dict(score_gpt=-1, score=-1, raw=None, error=None)
    result.update(judge_model=cfg.model, judge_model_version=None, attempts=0)
    retries = 0
    parse_failures = 0
    while True:
        result["attempts"] += 1
        try:
            response = client.post(cfg.endpoint, json=payload, headers=headers, timeout=cfg.timeout_s)
        except httpx.TransportError as exc:
            error = f"connection: {type(exc).__name__}: {exc}"
        else:
            status = response.status_code
            if status < 400:
                content, version = _read_completion(response)
                result["raw"] = content if content is not None else response.text[:_SNIPPET_CHARS]
                result["judge_model_version"] = version or result["judge_model_version"]
                scores = parse_judge_response(content or "")
                if scores is not None:
                    result.update(score_gpt=scores.score_gpt, score=scores.score, error=None)
                    return result
                parse_failures += 1
                if parse_failures >= 2:
                    logger.warning(
                        "judge reply has no readable scores after a retry: %r", result["raw"][:200]
                    )
                    result["error"] = "parse"
                    return result
                logger.info("judge reply has no readable scores; asking once more")
                continue
            error = f"http {status}: {response.text[:_SNIPPET_CHARS]}"
            if status < 500 and status not in _RETRYABLE_STATUS:
                logger.error("judge request failed, not retrying: %s", error)
                result["error"] = error
                return result
        if retries >= cfg.max_retries:
            logger.error("judge request failed after %d attempts: %s", result["attempts"], error)
            result["error"] = error
            return result
        delay = cfg.backoff_s * 2**retries
        logger.warning(
            "judge request failed (%s); retry %d/%d in %.2fs", error, retries + 1, cfg.max_retries, delay
        )
        time.sleep(delay)
        retries += 1


def judge_many(
    cfg: JudgeConfig,
    items: Sequence[Mapping[str, str]],
    *,
    max_workers: int = 4,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """`judge_one` over items with keys context / question / reference / answer, in order.

    Requests run `max_workers` at a time over one shared connection pool.
    """
    for i, item in enumerate(items):
        missing = [k for k in _ITEM_KEYS if k not in item]
        if missing:
            raise DataError(f"judge item {i} lacks {missing}; each item needs keys {list(_ITEM_KEYS)}.")
    with (
        httpx.Client(timeout=cfg.timeout_s) as client,
        ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool,
    ):
        futures = [
            pool.submit(
                judge_one, cfg, it["context"], it["question"], it["reference"], it["answer"], client=client
            )
            for it in items
        ]
        return [f.result() for f in tqdm(futures, desc="judge", disable=not show_progress)]
