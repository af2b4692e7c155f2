"""The synthetic world's held-out split (the built-in demo's task): exact match per question type.

`--data synthetic=DIR` takes a world written by `convllava-jp synth` / `demo` (its `test.json`),
or the `test.json` itself. Each record has one question (`conversations[0]`), the answer, its
question type and the chance level of that type, which the summary prints beside the score.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError
from .base import IMAGE_TAG, RowSource, Sample, Task, _mean, image_source
from .registry import register_task


@register_task
class SyntheticWorld(Task):
    name = "synthetic"
    title = "synthetic"
    hub_id = None
    split = "test"
    metric = "exact-match"
    required_columns = ("id", "image", "conversations", "qtype", "answer", "chance")
    default_max_new_tokens = 16  # answers are a few characters
    primary = "exact_match"
    schema_hint = (
        "Expected a world's test.json: id, image, conversations, qtype, answer, label, chance, scene."
    )

    def load(
        self,
        data: str | os.PathLike | None = None,
        limit: int | None = None,
        *,
        allow_other_split: bool = False,
    ) -> list[Sample]:
        if data is None:
            raise DataError(
                "the synthetic task needs the world: --data synthetic=DIR (a dir written by "
                "`convllava-jp synth` or `convllava-jp demo`, e.g. demo-output/world)"
            )
        path = Path(data)
        if path.is_dir():
            path = path / "test.json"
            if not path.exists():
                raise DataError(f"{data} has no test.json; is it a synthetic world dir?")
        return super().load(path, limit, allow_other_split=allow_other_split)

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} record {i}"
            turns = row["conversations"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
                raise DataError(f"{where}: 'conversations' must be a list of turns")
            question = self.text(turns[0].get("value"), where, "conversations[0].value")
            samples.append(
                Sample(
                    id=str(row["id"]),
                    question=question.replace(IMAGE_TAG + "\n", "").replace(IMAGE_TAG, ""),
                    reference=self.text(row["answer"], where, "answer"),
                    images=[image_source(row["image"], source.base_dir, where)],
                    fields={"qtype": row["qtype"], "chance": float(row["chance"])},
                )
            )
        return samples

    def score_fields(self, sample: Sample) -> dict[str, Any]:
        return {"qtype": sample.fields["qtype"], "chance": sample.fields["chance"]}

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """Exact match overall and per question type, each beside what guessing would score."""
        by_type: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_type[r["qtype"]].append(r)
        per_type = {
            q: {
                "exact_match": _mean(float(r[self.metric]) for r in rs),
                "chance": _mean(float(r["chance"]) for r in rs),
                "n": len(rs),
            }
            for q, rs in sorted(by_type.items())
        }
        n = len(records)
        return {
            "exact_match": _mean(float(r[self.metric]) for r in records) if n else 0.0,
            "chance": _mean(float(r["chance"]) for r in records) if n else 0.0,
            "n": n,
            "per_type": per_type,
        }
