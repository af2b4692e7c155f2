"""Reading tasks: CC-OCR (Japanese subset) and JIC-VQA.

CC-OCR (wulipc/CC-OCR, config multi_lan_ocr, test; rows whose `l2-category` is "Japanese"): the
image is a base64 string; the score is eval-mm's character-bag F1 per sample, averaged (the
leaderboard's "macro_f1" label notwithstanding, eval-mm's overall number is this mean; macro and
micro F1 are in the summary beside it). JIC-VQA: eval-mm's own parquet (built by its
`scripts/prepare_jic_vqa.py` from line-corporation/JIC-VQA, which holds image URLs only): the
answer scores 1 when it contains the reference; the overall score is the mean of the per-domain
means.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError
from .. import text_metrics
from .base import RowSource, Sample, Task, _mean, image_source, required_image
from .registry import register_task


def _base64_image(value: Any, source: RowSource, where: str) -> Any:
    """The hub's base64 text as bytes; an image cell, or a path to an existing file, as usual."""
    if isinstance(value, str):
        path = (
            Path(value) if Path(value).is_absolute() or source.base_dir is None else source.base_dir / value
        )
        if len(value) < 1024 and path.is_file():
            return str(path)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(
                f"{where}: 'image' is neither base64 image data nor an existing image path"
            ) from None
    image = image_source(value, source.base_dir, where)
    if image is None:
        raise DataError(f"{where}: 'image' is empty")
    return image


@register_task
class CCOCRJapanese(Task):
    name = "cc-ocr"
    title = "CC-OCR (ja)"
    hub_id = "wulipc/CC-OCR"
    hub_config = "multi_lan_ocr"
    split = "test"
    metric = "cc-ocr"
    required_columns = ("question", "answer", "image")
    schema_hint = "Expected (as on the hub, multi_lan_ocr): l2-category, question, answer, image (base64); only l2-category == 'Japanese' is used."
    layout = (
        "the multi_lan_ocr test split (all languages or Japanese only) as save_to_disk / parquet / .json(l)"
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            if "l2-category" in source.columns and row["l2-category"] != "Japanese":
                continue
            where = f"{source.origin} row {i}"
            samples.append(
                Sample(
                    id=str(len(samples)),
                    question=self.text(row["question"], where, "question"),
                    reference=self.text(row["answer"], where, "answer"),
                    images=[_base64_image(row["image"], source, where)],
                )
            )
        return samples

    def score(self, samples, predictions, *, judge=None, previous=None, show_progress=True) -> list[dict]:
        records = []
        for s in samples:
            right, n_gt, n_pred = text_metrics.cc_ocr_counts(predictions[s.id], s.reference)
            f1 = text_metrics.cc_ocr_f1(predictions[s.id], s.reference)
            records.append({"question_id": s.id, self.metric: f1, "counts": [right, n_gt, n_pred]})
        return records

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["score"] = out["score"] if records else 0.0
        out["mean_sample_f1"] = out["score"]
        out.update(text_metrics.cc_ocr_corpus([tuple(r["counts"]) for r in records]))
        return out


@register_task
class JICVQA(Task):
    name = "jic-vqa"
    title = "JIC-VQA"
    hub_id = None  # the hub copy holds URLs only; eval-mm downloads and builds a parquet
    split = "train"
    metric = "contains"
    required_columns = ("question_id", "input_text", "answer", "image", "domain")
    primary = "average"
    schema_hint = (
        "Expected (eval-mm's dataset/jic_vqa.parquet): question_id, input_text, answer, image, domain."
    )
    layout = "eval-mm's dataset/jic_vqa.parquet (scripts/prepare_jic_vqa.py), or the same columns as .json(l)"

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            samples.append(
                Sample(
                    id=str(row["question_id"]),
                    question=self.text(row["input_text"], where, "input_text"),
                    reference=self.text(row["answer"], where, "answer"),
                    images=[required_image(row["image"], source.base_dir, where)],
                    fields={"domain": self.text(row["domain"], where, "domain")},
                )
            )
        return samples

    def score_fields(self, sample: Sample) -> dict[str, Any]:
        return {"domain": sample.fields["domain"]}

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """Per-domain accuracy and `average`, the mean of the domain means (eval-mm's overall)."""
        by_domain: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_domain[r["domain"]].append(float(r[self.metric]))
        out: dict[str, Any] = {d: _mean(v) for d, v in by_domain.items()}
        out["average"] = _mean(out.values()) if by_domain else 0.0
        out["n"] = len(records)
        return out
