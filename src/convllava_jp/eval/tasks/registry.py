"""Tasks by name: `register_task` (a class decorator), `get_task`, `task_names`."""

from __future__ import annotations

from typing import TypeVar

from ...errors import ConfigError

__all__ = ["TASK_ALIASES", "TASKS", "get_task", "register_task", "task_names", "task_table"]

TASKS: dict[str, type] = {}
# llm-jp-eval-mm's task ids, so their commands carry over.
TASK_ALIASES = {"japanese-heron-bench": "heron-bench"}
# The article's table order; tasks registered later follow in registration order.
_ORDER = (
    "ja-vg-vqa-500",
    "ja-vlm-bench-in-the-wild",
    "heron-bench",
    "jdocqa",
    "synthetic",
    # eval-mm's other Japanese tasks, in its leaderboard's order
    "cvqa",
    "cc-ocr",
    "jic-vqa",
    "ja-multi-image-vqa",
    "jmmmu",
    "mecha-ja",
    "jawildtext-board-vqa",
    "jawildtext-handwriting-ocr",
    "jawildtext-receipt-kie",
)

T = TypeVar("T", bound=type)


def register_task(cls: T) -> T:
    """Class decorator: make the task available under `cls.name`."""
    name = cls.name  # type: ignore[attr-defined]
    if name in TASKS and TASKS[name] is not cls:
        raise ConfigError(f"two tasks are registered as {name!r}: {TASKS[name].__name__} and {cls.__name__}")
    TASKS[name] = cls
    return cls


def task_names() -> list[str]:
    """Registered task names: the article's benchmarks first, then the rest as registered."""
    return sorted(
        TASKS, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), list(TASKS).index(n))
    )


def get_task(name: str):
    """A new instance of the task registered as `name` (or one of llm-jp-eval-mm's aliases)."""
    name = TASK_ALIASES.get(name, name)
    try:
        return TASKS[name]()
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None


def task_table() -> str:
    """One block per task: its name, metric(s), where its data comes from and the local layout expected."""
    lines = []
    for name in task_names():
        cls = TASKS[name]
        metric = cls.metric + (f" + {cls.judge_metric} (with --judge-url)" if cls.judge_metric else "")
        if cls.needs_judge:
            metric += " (needs --judge-url)"
        config = f", config {cls.hub_config}" if cls.hub_config else ""
        source = f"{cls.hub_id} [{cls.split}{config}]" if cls.hub_id else "local only (--data)"
        lines.append(f"{name}\n  metric: {metric}\n  data:   {source}")
        if cls.layout:
            lines.append(f"  layout: {cls.layout}")
        elif cls.schema_hint:
            lines.append(f"  layout: {cls.schema_hint}")
    return "\n".join(lines) + "\n"
