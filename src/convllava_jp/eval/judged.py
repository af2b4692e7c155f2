"""Judged metrics on tasks: build the judge's questions per sample and run, summarise across runs.

`as_judge_run` accepts what callers pass as `judge` (a `JudgeConfig`, a `JudgeRun`, or None).
`llm_judge_records` scores samples with eval-mm's `llm-as-a-judge` (1-5; an empty answer is 0
and never sent); `run_spread` gives the mean and spread of a per-run score (`--judge-runs N`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .judge import JudgeConfig, JudgeJob, JudgeRun
from .judge_prompts import first_digit, llm_judge_messages, prompt_sha

__all__ = ["as_judge_run", "judge_settings", "llm_judge_records", "run_spread", "verdicts_by_sample"]


def as_judge_run(judge: Any) -> JudgeRun | None:
    """A `JudgeRun` for `judge` (None stays None; a bare config is judged once, not logged)."""
    if judge is None or isinstance(judge, JudgeRun):
        return judge
    if isinstance(judge, JudgeConfig):
        return JudgeRun(judge)
    raise TypeError(f"judge must be a JudgeConfig or JudgeRun, got {type(judge).__name__}")


def judge_settings(judge: Any, metric: str) -> dict[str, Any] | None:
    """What moves a judged number: judge model and decoding, the prompt's hash, the number of runs."""
    run = as_judge_run(judge)
    if run is None:
        return None
    return {**run.config.describe(), "metric": metric, "prompt_sha": prompt_sha(metric), "runs": run.runs}


def verdicts_by_sample(run: JudgeRun, jobs: Sequence[JudgeJob]) -> dict[str, list[dict[str, Any]]]:
    """Ask every job; {question_id: [verdict of run 0, run 1, ...]}."""
    got = run.ask(jobs)
    out: dict[str, list[dict[str, Any]]] = {}
    for job in sorted(jobs, key=lambda j: j.run):
        out.setdefault(job.question_id, []).append(got[job.key(run.config)])
    return out


def llm_judge_records(
    run: JudgeRun,
    items: Sequence[tuple[str, str, str, str]],
    metric: str = "llm-as-a-judge",
    messages: Callable[[str, str, str], list[dict]] = llm_judge_messages,
    parse: Callable[[str], Any] = first_digit,
    max_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{question_id: {metric: mean over runs, f"{metric}_runs": [...], "judge_errors": [...]}}.

    `items` are (question_id, question, reference, prediction). An empty prediction scores 0 in
    every run without a request (eval-mm). A run whose request failed is None in the runs list and
    left out of the mean; all runs failed = None.
    """
    jobs = [
        JudgeJob(qid, r, metric, messages(q, ref, pred), parse, max_tokens)
        for qid, q, ref, pred in items
        if pred != ""
        for r in range(run.runs)
    ]
    verdicts = verdicts_by_sample(run, jobs) if jobs else {}
    out: dict[str, dict[str, Any]] = {}
    for qid, _, _, pred in items:
        if pred == "":
            values: list[Any] = [0] * run.runs
            errors: list[Any] = [None] * run.runs
        else:
            values = [v["value"] if v["error"] is None else None for v in verdicts[qid]]
            errors = [v["error"] for v in verdicts[qid]]
        valid = [float(v) for v in values if v is not None]
        versions = sorted(
            {str(v["judge_model_version"]) for v in verdicts.get(qid, []) if v.get("judge_model_version")}
        )
        out[qid] = {
            metric: sum(valid) / len(valid) if valid else None,
            f"{metric}_runs": values,
            "judge_errors": errors if any(errors) else [],
            "judge_model_versions": versions,
        }
    return out


def run_spread(per_run: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of one score across judge runs (None = failed run)."""
    values = [float(v) for v in per_run if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"runs": list(per_run), "mean": None, "std": None, "min": None, "max": None}
    return {
        "runs": list(per_run),
        "mean": sum(values) / len(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def per_run_means(records: Sequence[Mapping[str, Any]], metric: str, runs: int) -> list[float | None]:
    """For each run, the mean of `metric` over the samples that have a value in that run."""
    out: list[float | None] = []
    for r in range(runs):
        values = [
            float(rec[f"{metric}_runs"][r])
            for rec in records
            if len(rec.get(f"{metric}_runs") or []) > r and rec[f"{metric}_runs"][r] is not None
        ]
        out.append(sum(values) / len(values) if values else None)
    return out
