"""JA-VG-VQA-500 (SakanaAI/JA-VG-VQA-500, split test): Japanese Visual Genome VQA, ROUGE-L.

Each row is one image with a `qas` list of question/answer pairs; as llm-jp-eval-mm does, the list
is flattened to one sample per pair, the pair's `qa_id` being the question id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import DataError
from .base import IMAGE_TAG, RowSource, Sample, Task, raw_text_field, required_image
from .registry import register_task

QA_KEYS = ("qa_id", "question", "answer")


def _qa_list(qas: Any, where: str) -> list[Mapping[str, Any]]:
    """`qas` as a list of dicts; datasets' `Sequence(struct)` gives a dict of lists instead."""
    if isinstance(qas, Mapping):
        lengths = {len(v) for v in qas.values()}
        if len(lengths) > 1:
            raise DataError(f"{where}: 'qas' columns have different lengths")
        n = lengths.pop() if lengths else 0
        qas = [{k: v[i] for k, v in qas.items()} for i in range(n)]
    if not isinstance(qas, list):
        raise DataError(
            f"{where}: 'qas' must be a list of {{qa_id, question, answer}}, got {type(qas).__name__}"
        )
    return qas


@register_task
class JaVGVQA500(Task):
    name = "ja-vg-vqa-500"
    title = "JA-VG-VQA-500"
    hub_id = "SakanaAI/JA-VG-VQA-500"
    split = "test"
    metric = "rouge-l-ja"
    judge_metric = "llm-as-a-judge"  # eval-mm's second metric; asked only with --judge-url
    required_columns = ("image_id", "image", "qas")
    schema_hint = (
        "Expected (as on the hub): image_id, url, width, height, coco_id, flickr_id, image, and "
        "qas = list of {qa_id, question, answer, q_objects, a_objects}."
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            image = required_image(row["image"], source.base_dir, where)
            for j, qa in enumerate(_qa_list(row["qas"], where)):
                missing = [k for k in QA_KEYS if k not in qa]
                if missing:
                    raise DataError(f"{where}: qas[{j}] lacks {missing}; each needs {list(QA_KEYS)}")
                raw = self.text(qa["question"], where, "qas.question")
                question = raw.replace(IMAGE_TAG, "")
                samples.append(
                    Sample(
                        id=str(qa["qa_id"]),
                        question=question,
                        reference=self.text(qa["answer"], where, "qas.answer"),
                        images=[image],
                        fields={"image_id": row["image_id"], **raw_text_field(raw, question)},
                    )
                )
        return samples
