"""Evaluation as llm-jp-eval-mm scores it: tasks, metrics, judge, runner and summary tables.

The metric functions are imported here directly (they need only emoji / fugashi / rouge_score on
first use); the runner, tasks and report load on first access, so `from convllava_jp.eval import
rouge_l_ja` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metrics import (
    METRICS,
    Metric,
    exact_match_ja,
    get_metric,
    heron_aggregate,
    jdocqa_score,
    normalize_ja,
    parse_judge_response,
    rouge_l_ja,
    tokenize_ja,
)

_LAZY = {
    "JudgeConfig": "judge",
    "JudgeRun": "judge",
    "EvalSettings": "runner",
    "EvalModel": "runner",
    "run_eval": "runner",
    "run_task": "runner",
    "TASKS": "tasks",
    "Task": "tasks",
    "Sample": "tasks",
    "get_task": "tasks",
    "register_task": "tasks",
    "task_names": "tasks",
    "task_table": "tasks",
    "summary_tables": "report",
    "write_summary": "report",
    "collect_summaries": "report",
}

__all__ = [
    "METRICS",
    "Metric",
    "exact_match_ja",
    "get_metric",
    "heron_aggregate",
    "jdocqa_score",
    "normalize_ja",
    "parse_judge_response",
    "rouge_l_ja",
    "tokenize_ja",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
