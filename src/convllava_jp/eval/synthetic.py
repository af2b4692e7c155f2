"""Held-out exact match on the synthetic world (section 4): per question type, beside chance.

A thin layer over the `synthetic` task (`tasks/synthetic.py`) for the demo, which holds a loaded
pipeline and wants the scores back without writing result files; `convllava-jp eval --tasks
synthetic` runs the same task through the cached runner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .metrics import exact_match_ja, get_metric
from .runner import generate_predictions
from .tasks.synthetic import SyntheticWorld

log = logging.getLogger(__name__)

__all__ = ["evaluate_synthetic", "load_synthetic_test", "score_synthetic"]


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


def load_synthetic_test(world_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The world's `test.json` records (question, answer, qtype, chance, image path made absolute)."""
    return _records(SyntheticWorld().load(world_dir, limit))


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
