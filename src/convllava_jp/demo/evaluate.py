"""Held-out exact match on the synthetic world: per question type, beside chance.

A thin layer over the registered `synthetic` eval task (`eval/tasks/synthetic.py`) for the demo,
which holds a loaded pipeline and wants the scores back without writing result files;
`convllava-jp eval --tasks synthetic` runs the same task through the cached runner.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..data.constants import IMAGE_TOKEN
from ..eval.metrics import exact_match_ja, get_metric
from ..eval.runner import generate_predictions
from ..eval.tasks.synthetic import SyntheticWorld

__all__ = ["evaluate_synthetic", "question_only_baseline", "score_synthetic"]


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


def _question(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


def question_only_baseline(world_dir: str | Path) -> dict:
    """What a model that ignores the image scores: each held-out question answered with the
    training set's most frequent answer to the same question (ties: the first seen).

    Returns `score_synthetic`'s layout (exact match per qtype and overall).
    """
    world_dir = Path(world_dir)
    answers: dict[str, Counter] = defaultdict(Counter)
    for record in json.loads((world_dir / "stage3.json").read_text(encoding="utf-8")):
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            answers[_question(question["value"])][answer["value"]] += 1
    records = [
        {
            "answer": r["answer"],
            "qtype": r["qtype"],
            "chance": r["chance"],
            "question": r["conversations"][0]["value"],
        }
        for r in json.loads((world_dir / "test.json").read_text(encoding="utf-8"))
    ]
    guesses = [(answers[_question(r["question"])].most_common(1) or [("", 0)])[0][0] for r in records]
    return score_synthetic(records, guesses)
