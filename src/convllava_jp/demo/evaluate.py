"""Held-out exact match on the synthetic world: per question type, beside chance.

A thin layer over the registered `synthetic` eval task (`eval/tasks/synthetic.py`) for the demo,
which holds a loaded pipeline and wants the scores back without writing result files;
`convllava-jp eval --tasks synthetic` runs the same task through the cached runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.metrics import exact_match_ja, get_metric
from ..eval.runner import generate_predictions
from ..eval.tasks.synthetic import SyntheticWorld

__all__ = ["evaluate_synthetic", "score_synthetic"]


def _records(samples: list) -> list[dict]:
    return [
        {
            "id": s.id,
            "image": s.images[0],
            "question": s.prompt,
            "answer": s.reference,
            "qtype": s.fields["qtype"],
            "chance": s.fields["chance"],
        }
        for s in samples
    ]


def score_synthetic(records: list[dict], predictions: list[str]) -> dict:
    """Exact match (the registered `exact-match` metric) per qtype and overall, with chance levels."""
    task = SyntheticWorld()
    metric = get_metric(task.metric)
    scored = [
        {task.metric: metric(p, r["answer"]), "qtype": r["qtype"], "chance": r["chance"]}
        for r, p in zip(records, predictions)
    ]
    return task.aggregate(scored)


def evaluate_synthetic(
    pipeline: Any,
    world_dir: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int | None = None,
) -> tuple[dict, list[dict]]:
    """Greedy answers to the held-out questions; returns (scores, per-sample predictions)."""
    samples = SyntheticWorld().load(world_dir, limit)
    results = generate_predictions(
        pipeline, samples, {"max_new_tokens": max_new_tokens}, batch_size, desc="synthetic eval"
    )
    records = _records(samples)
    predictions = [results[r["id"]]["text"] for r in records]
    scores = score_synthetic(records, predictions)
    samples_out = [
        {**r, "prediction": p, "correct": bool(exact_match_ja(p, r["answer"]))}
        for r, p in zip(records, predictions)
    ]
    return scores, samples_out
