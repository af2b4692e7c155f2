"""Tasks by name: `register_task` (a class decorator), `get_task`, `task_names`."""

from __future__ import annotations

from typing import TypeVar

from ...errors import ConfigError

__all__ = ["TASK_ALIASES", "TASKS", "get_task", "register_task", "task_names"]

TASKS: dict[str, type] = {}
# llm-jp-eval-mm's task ids, so their commands carry over.
TASK_ALIASES = {"japanese-heron-bench": "heron-bench"}
# The article's table order; tasks registered later follow in registration order.
_ORDER = ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild", "heron-bench", "jdocqa", "synthetic")

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
