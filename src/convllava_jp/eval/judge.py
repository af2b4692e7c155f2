"""LLM-as-judge over any OpenAI-compatible `/v1/chat/completions` endpoint, durable and resumable.

`ask_judge` (judge_client.py) asks one question (retries with backoff and jitter, honouring a server's
`Retry-After`); `JudgeRun` asks many, appending every verdict (the full prompt, the reply, the
parsed value or the error) to a JSONL log the moment it arrives, so a kill or Ctrl-C loses no
verdict already paid for and a rerun asks only what is missing or failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..io import JsonlAppender, read_jsonl
from .judge_client import JudgeConfig, ask_judge
from .judge_prompts import build_judge_messages, build_judge_prompt, heron_parse, prompt_sha

logger = logging.getLogger(__name__)

__all__ = [
    "JudgeConfig",
    "JudgeJob",
    "JudgeRun",
    "ask_judge",
    "build_judge_messages",
    "build_judge_prompt",
    "judge_many",
    "judge_one",
]

_ITEM_KEYS = ("context", "question", "reference", "answer")


# --- Heron-Bench's single-item API (kept for callers of the old module) --------------------------


def judge_one(
    cfg: JudgeConfig,
    context: str,
    question: str,
    reference: str,
    answer: str,
    *,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """Ask the judge to score one Heron-Bench item (eval-mm's prompt).

    Returns {"score_gpt", "score", "raw", "error", "judge_model", "judge_model_version",
    "attempts"}; on failure both scores are -1 and `error` says why.
    """
    if client is None:
        with httpx.Client(timeout=cfg.timeout_s) as own:
            return judge_one(cfg, context, question, reference, answer, client=own)
    messages = build_judge_messages(context, question, reference, answer)
    got = ask_judge(cfg, messages, heron_parse, client=client)
    scores = got.pop("value")
    result = {"score_gpt": -1, "score": -1} if scores is None else dict(scores)
    return {**result, **got, "judge_model": cfg.model}


def judge_many(
    cfg: JudgeConfig,
    items: Sequence[Mapping[str, str]],
    *,
    max_workers: int = 4,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """`judge_one` over items with keys context / question / reference / answer, in order (not logged)."""
    for i, item in enumerate(items):
        missing = [k for k in _ITEM_KEYS if k not in item]
        if missing:
            raise DataError(f"judge item {i} lacks {missing}; each item needs keys {list(_ITEM_KEYS)}.")
    with httpx.Client(timeout=cfg.timeout_s) as client, ThreadPoolExecutor(max(1, max_workers)) as pool:
        futures = [
            pool.submit(
                judge_one, cfg, it["context"], it["question"], it["reference"], it["answer"], client=client
            )
            for it in items
        ]
        return [f.result() for f in tqdm(futures, desc="judge", disable=not show_progress)]


# --- many questions, durably -----------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeJob:
    """One question for the judge: which sample, which run, the messages and how to read the reply."""

    question_id: str
    run: int
    metric: str
    messages: list[dict]
    parse: Callable[[str], Any]
    max_tokens: int | None = None

    def key(self, cfg: JudgeConfig) -> str:
        """Identifies the verdict: judge model and settings, the full prompt, the run index."""
        from .cache import digest

        return digest(
            cfg.model, cfg.temperature, cfg.seed, self.max_tokens or cfg.max_tokens, self.messages, self.run
        )


@dataclass
class JudgeRun:
    """Asks a judge many questions, logging each verdict to `log_path` as it arrives.

    `runs` is how many times each item is judged (`--judge-runs`); `reuse=False` asks again even
    where the log has a good verdict (the log keeps the old ones: it is only ever appended to).
    Without a `log_path` nothing is written (tests, one-off calls).
    """

    config: JudgeConfig
    log_path: Path | None = None
    runs: int = 1
    reuse: bool = True
    show_progress: bool = False
    _cache: dict[str, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"judge runs must be >= 1, got {self.runs}")

    def _logged(self) -> dict[str, dict]:
        if not self.reuse or self.log_path is None or not Path(self.log_path).exists():
            return {}
        done: dict[str, dict] = {}
        for rec in read_jsonl(self.log_path):
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                done[rec["key"]] = rec  # the latest line for a key wins
        return done

    def _record(self, job: JudgeJob, key: str, got: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "key": key,
            "question_id": job.question_id,
            "run": job.run,
            "metric": job.metric,
            "prompt_sha": prompt_sha(job.metric),
            "judge_model": self.config.model,
            "judge_model_version": got.get("judge_model_version"),
            "messages": job.messages,
            "raw": got.get("raw"),
            "value": got.get("value"),
            "error": got.get("error"),
            "attempts": got.get("attempts"),
        }

    def ask(self, jobs: Sequence[JudgeJob]) -> dict[str, dict]:
        """{key: verdict record} for every job: logged good verdicts reused, the rest asked now.

        Each new verdict is appended (flushed, fsynced) as it completes. On Ctrl-C or another
        exception, requests not yet sent are cancelled, those in flight are awaited and logged,
        then the exception propagates.
        """
        logged = self._logged()
        results: dict[str, dict] = {}
        todo: list[tuple[JudgeJob, str]] = []
        queued: set[str] = set()
        for job in jobs:
            key = job.key(self.config)
            old = logged.get(key) or self._cache.get(key)
            if old is not None and old.get("error") is None:
                results[key] = old
            elif key not in queued:
                queued.add(key)
                todo.append((job, key))
        if results:
            logger.info("judge: reusing %d logged verdicts, asking %d", len(results), len(todo))
        if todo:
            self.config.headers()  # refuse an unsafe key before anything is sent
            results.update(self._ask_all(todo))
        self._cache.update(results)
        return results

    def _ask_all(self, todo: Sequence[tuple[JudgeJob, str]]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        appender = JsonlAppender(self.log_path) if self.log_path is not None else None
        pool = ThreadPoolExecutor(self.config.max_workers)
        bar = tqdm(total=len(todo), desc="judge", disable=not self.show_progress)
        with httpx.Client(timeout=self.config.timeout_s) as client:
            futures: dict[Future, tuple[JudgeJob, str]] = {
                pool.submit(
                    ask_judge, self.config, job.messages, job.parse, client=client, max_tokens=job.max_tokens
                ): (
                    job,
                    key,
                )
                for job, key in todo
            }
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    self._collect(done, futures, out, appender, bar)
            except BaseException:
                for f in pending:
                    f.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                self._collect(
                    [f for f in pending if f.done() and not f.cancelled()], futures, out, appender, bar
                )
                raise
            finally:
                pool.shutdown(wait=True)
                bar.close()
                if appender is not None:
                    appender.close()
        return out

    def _collect(self, done, futures, out, appender, bar) -> None:
        """Log every finished future; a worker's KeyboardInterrupt is re-raised after the others are logged."""
        interrupt: BaseException | None = None
        for f in done:
            job, key = futures[f]
            try:
                got = f.result()
            except Exception as exc:  # anything unexpected is this item's result, not the run's end
                got = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "attempts": None}
            except BaseException as exc:  # noqa: BLE001 - Ctrl-C inside a worker: nothing to log for it
                interrupt = exc
                continue
            rec = self._record(job, key, got)
            if appender is not None:
                appender.write([rec])
            out[key] = rec
            bar.update(1)
        if interrupt is not None:
            raise interrupt
