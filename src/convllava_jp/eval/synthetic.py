"""Held-out exact match on the synthetic world (section 4): per question type, beside chance."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from ..infer.generation import GenerationConfig, GenerationRequest, VLMPipeline

log = logging.getLogger(__name__)


def load_synthetic_test(world_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The world's `test.json` records (question, answer, qtype, chance, image path made absolute)."""
    world_dir = Path(world_dir)
    records = json.loads((world_dir / "test.json").read_text(encoding="utf-8"))
    out = []
    for r in records[:limit] if limit else records:
        question = r["conversations"][0]["value"]
        out.append(
            {
                "id": r["id"],
                "image": str(world_dir / r["image"]),
                "question": question,
                "answer": r["answer"],
                "qtype": r["qtype"],
                "chance": float(r["chance"]),
            }
        )
    return out


def score_synthetic(records: list[dict], predictions: list[str]) -> dict:
    """Exact match (after stripping whitespace) per qtype and overall, with chance levels."""
    by_type: dict[str, list[float]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    for r, p in zip(records, predictions):
        by_type[r["qtype"]].append(float(p.strip() == r["answer"].strip()))
        chance[r["qtype"]].append(r["chance"])
    per_type = {
        q: {"exact_match": sum(v) / len(v), "chance": sum(chance[q]) / len(chance[q]), "n": len(v)}
        for q, v in sorted(by_type.items())
    }
    n = len(records)
    return {
        "exact_match": sum(sum(v) for v in by_type.values()) / n if n else 0.0,
        "chance": sum(r["chance"] for r in records) / n if n else 0.0,
        "n": n,
        "per_type": per_type,
    }


def evaluate_synthetic(
    pipeline: VLMPipeline,
    world_dir: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int | None = None,
) -> tuple[dict, list[dict]]:
    """Greedy answers to the held-out questions; returns (scores, per-sample predictions)."""
    records = load_synthetic_test(world_dir, limit)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    predictions: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc="synthetic eval", unit="batch"):
        chunk = records[start : start + batch_size]
        requests = [
            GenerationRequest([{"role": "user", "content": r["question"]}], [r["image"]]) for r in chunk
        ]
        predictions += [res.text for res in pipeline.generate(requests, config, batch_size=batch_size)]
    samples = [
        {**r, "prediction": p, "correct": p.strip() == r["answer"].strip()}
        for r, p in zip(records, predictions)
    ]
    return score_synthetic(records, predictions), samples
