"""JaWildText (llm-jp/jawildtext, its only split `train`): board VQA, handwriting OCR, receipt KIE.

As eval-mm: ids are row numbers; each task appends or uses eval-mm's fixed Japanese instruction.
- board VQA: the question + "answer in \\boxed{...}"; the last \\boxed{} of the reply (else the whole
  reply) goes to an LLM grader (`correct: yes|no`, 256 tokens); an empty one scores 0 unasked.
- handwriting OCR: the reference is the annotated lines sorted by their polygon's centroid (top to
  bottom, then left to right) joined by newlines; score = CER similarity.
- receipt KIE: the reference is the annotated fields as JSON; score = field:value token F1.
Local copy: one config's rows (save_to_disk / parquet / .json(l)), as `--data TASK=PATH`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import DataError
from .. import text_metrics
from .base import RowSource, Sample, Task, _mean, required_image
from .registry import register_task

BOARD_SUFFIX = (
    "\n画像を参照して回答してください。推論過程は出力しても構いませんが、"
    "最終回答は必ず \\boxed{...} で囲み、ボックス内には最終回答のみを1つだけ記載してください。"
)
HANDWRITING_PROMPT = (
    "OCR:\n画像内の文字をすべて読んでください。 改行されている部分には必ず\\nを挿入してください。"
)
RECEIPT_PROMPT = (
    "レシート画像からキー情報を抽出し、JSON形式で返してください。 "
    "フィールド: store_name, store_address, receipt_id, date, time, "
    "total_amount, tax_amount, line_items[]. "
    "値は画像の文字をそのまま出力してください（推測・正規化・整形しない）。"
    "無い項目は null にしてください。 "
    'line_items は {"item_name": "", "item_price": "", "item_quantity": ""} の配列で返してください。'
)
_LAYOUT = "one config of llm-jp/jawildtext ({}) as save_to_disk / hub parquet folder / .parquet / .json(l)"


def boxed_answer(text: str) -> str:
    """The content of the last balanced \\boxed{...} in `text` (stripped), else `text` stripped."""
    found, i = [], 0
    while (pos := text.find("\\boxed{", i)) != -1:
        start = j = pos + len("\\boxed{")
        depth = 1
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            found.append(text[start : j - 1].strip())
        i = j
    return found[-1] if found else text.strip()


def ocr_reference(polygons: Any) -> str:
    """Annotated lines ordered by centroid (mean y, then mean x; no points = (0, 0)), joined by newlines."""
    if not polygons:
        return ""

    def centroid(ann: Mapping) -> tuple[float, float]:
        points = ann.get("polygon") or []
        if not points:
            return 0.0, 0.0
        return sum(p[1] for p in points) / len(points), sum(p[0] for p in points) / len(points)

    return "\n".join(a["text"] for a in sorted(polygons, key=centroid) if a.get("text"))


def kie_reference(fields: Any) -> str:
    """The gold JSON eval-mm compares with: the seven fields' `value`s and the line items."""
    if not fields:
        return json.dumps(dict.fromkeys(text_metrics.KIE_FIELDS), ensure_ascii=False)
    gold: dict[str, Any] = {}
    for name in text_metrics.KIE_FIELDS:
        cell = fields.get(name, {})
        gold[name] = cell.get("value") if isinstance(cell, Mapping) else None
    items = []
    for item in fields.get("line_items") or []:
        if isinstance(item, Mapping):
            items.append(
                {
                    k: (item.get(k) or {}).get("value") if isinstance(item.get(k), Mapping) else None
                    for k in ("item_name", "item_price", "item_quantity")
                }
            )
    gold["line_items"] = items
    return json.dumps(gold, ensure_ascii=False)


class _JaWildText(Task):
    hub_id = "llm-jp/jawildtext"
    split = "train"

    def rows(self, source: RowSource) -> list[tuple[str, Mapping[str, Any], Any]]:
        return [
            (
                f"{source.origin} row {i}",
                row,
                required_image(row["image"], source.base_dir, f"{source.origin} row {i}"),
            )
            for i, row in enumerate(source)
        ]


@register_task
class BoardVQA(_JaWildText):
    name = "jawildtext-board-vqa"
    title = "JaWildText Board VQA"
    hub_config = "board_vqa"
    metric = "jawildtext-board-vqa"
    needs_judge = True
    primary = "accuracy"
    required_columns = ("question", "answer", "image")
    layout = _LAYOUT.format("board_vqa: question, answer, image")

    def build_samples(self, source: RowSource) -> list[Sample]:
        out = []
        for i, (where, row, image) in enumerate(self.rows(source)):
            question = row["question"] or ""
            answer = row["answer"] or ""
            q, a = self.text(question, where, "question"), self.text(answer, where, "answer")
            out.append(Sample(str(i), q + BOARD_SUFFIX, a, [image]))
        return out

    def score(self, samples, predictions, *, judge=None, previous=None, show_progress=True) -> list[dict]:
        from ..judge_prompts import board_vqa_messages, grader_verdict
        from ..judged import as_judge_run, llm_judge_records

        run = as_judge_run(judge)
        if run is None:
            return [
                {"question_id": s.id, self.metric: None, "error": "not judged: no --judge-url given"}
                for s in samples
            ]
        items = [(s.id, s.question, s.reference, boxed_answer(predictions[s.id])) for s in samples]
        judged = llm_judge_records(
            run, items, self.metric, board_vqa_messages, grader_verdict, max_tokens=256
        )
        return [{"question_id": qid, "extracted": pred, **judged[qid]} for qid, _, _, pred in items]

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        judged = [r for r in records if r.get(self.metric) is not None]
        out: dict[str, Any] = {"n": len(records), "not_judged": len(records) - len(judged)}
        out["accuracy"] = _mean(float(r[self.metric]) for r in judged) if judged else None
        spread = self.judged_summary(judged) if judged else {}
        if spread:
            out["accuracy"] = spread[self.metric.replace("-", "_")]
            out["accuracy_runs"] = spread[f"{self.metric.replace('-', '_')}_runs"]
        return out


@register_task
class HandwritingOCR(_JaWildText):
    name = "jawildtext-handwriting-ocr"
    title = "JaWildText Handwriting OCR"
    hub_config = "handwriting_ocr"
    metric = "cer-similarity"
    primary = "cer_similarity"
    required_columns = ("image", "polygons")
    layout = _LAYOUT.format("handwriting_ocr: image, polygons = list of {polygon: [[x, y], ...], text}")

    def build_samples(self, source: RowSource) -> list[Sample]:
        out = []
        for i, (where, row, image) in enumerate(self.rows(source)):
            polygons = row["polygons"]
            if polygons is not None and not isinstance(polygons, (list, tuple)):
                raise DataError(f"{where}: 'polygons' must be a list of {{polygon, text}}")
            out.append(Sample(str(i), HANDWRITING_PROMPT, ocr_reference(polygons), [image]))
        return out

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["cer_similarity"] = out["score"] if records else 0.0
        return out


@register_task
class ReceiptKIE(_JaWildText):
    name = "jawildtext-receipt-kie"
    title = "JaWildText Receipt KIE"
    hub_config = "receipt_kie"
    metric = "receipt-kie"
    primary = "f1"
    required_columns = ("image", "fields")
    layout = _LAYOUT.format("receipt_kie: image, fields = {store_name: {value}, ..., line_items: [...]}")

    def build_samples(self, source: RowSource) -> list[Sample]:
        out = []
        for i, (where, row, image) in enumerate(self.rows(source)):
            fields = row["fields"]
            if fields is not None and not isinstance(fields, Mapping):
                raise DataError(f"{where}: 'fields' must be a mapping of field -> {{value}}")
            out.append(Sample(str(i), RECEIPT_PROMPT, kie_reference(fields), [image]))
        return out

    def score(self, samples, predictions, *, judge=None, previous=None, show_progress=True) -> list[dict]:
        return [
            {"question_id": s.id, **text_metrics.receipt_kie(predictions[s.id], s.reference)} for s in samples
        ]

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """eval-mm's summary: mean F1 / precision / recall, parse errors, field accuracy over parsed answers."""
        n = len(records)
        out: dict[str, Any] = {
            k: _mean(r[k] for r in records) if n else 0.0 for k in ("f1", "precision", "recall")
        }
        out["parse_error_count"] = sum(1 for r in records if r["parse_error"])
        valid = [r for r in records if not r["parse_error"]]
        for name in text_metrics.KIE_FIELDS:
            key = f"field_{name}"
            out[key] = _mean(r["field_accuracy"][key] for r in valid) if valid else 0.0
        out["n"] = n
        return out
