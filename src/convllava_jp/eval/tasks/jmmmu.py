"""JMMMU (JMMMU/JMMMU, every subject's test split): Japanese MMMU, multiple choice and open answers.

As eval-mm: multiple-choice questions list the options as "A. ..." lines and ask for the letter;
open ones ask for a word or short phrase. The images are the `image_N` columns the prompt refers
to ("<image N>", "<image1>" read as "<image 1>"), in name order. The reply is read as MMMU does
(`choice_metrics`); the score is the accuracy over all questions, with per-domain and per-subject
accuracies. eval-mm turns each "<image N>" into "<image>" inside the text; here the tags are
removed, our prompt having one "<image>" line per image first. Local copy: all subjects' test
rows in one file or folder (columns as on the hub).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ...errors import DataError
from ..choice_metrics import OPEN_ENDED_PROMPT, jmmmu_aggregate, options_prompt, subject_of
from .base import IMAGE_TAG, RowSource, Sample, Task, image_source
from .registry import register_task

_IMAGE_REF = re.compile(r"<image (\d+)>")


def jmmmu_prompt(question: str, question_type: str, options: Any) -> str:
    """The prompt eval-mm builds, still with its "<image N>" tags."""
    from ..choice_metrics import _options

    question = question.replace("<image1>", "<image 1>")
    if question_type == "multiple-choice":
        return options_prompt(question, _options(options))
    return f"{question}\n\n{OPEN_ENDED_PROMPT}"


@register_task
class JMMMU(Task):
    name = "jmmmu"
    title = "JMMMU"
    hub_id = "JMMMU/JMMMU"
    split = "test"
    metric = "jmmmu"
    required_columns = ("id", "question", "options", "answer", "question_type")
    primary = "overall"
    schema_hint = (
        "Expected (as on the hub, all subjects together): id (<split>_<Subject>_<n>), question, options "
        "(a list, or its Python repr), answer, question_type, image_1 .. image_7."
    )
    layout = "one .parquet/.json(l), a save_to_disk dir or a parquet folder holding every subject's test rows"

    def open_source(self, data, allow_other_split):
        if data is None:
            raise DataError(
                "jmmmu has one hub config per subject; save all subjects' test splits into one file "
                "(datasets: concatenate_datasets) and pass --data jmmmu=PATH"
            )
        return super().open_source(data, allow_other_split)

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            qtype = self.text(row["question_type"], where, "question_type")
            try:
                prompt = jmmmu_prompt(self.text(row["question"], where, "question"), qtype, row["options"])
                subject_of(str(row["id"]))
            except (ValueError, SyntaxError) as err:
                raise DataError(f"{where}: {err}") from None
            columns = sorted({f"image_{n}" for n in _IMAGE_REF.findall(prompt)})
            images = [image_source(row.get(c), source.base_dir, f"{where} {c}") for c in columns]
            if any(im is None for im in images):
                raise DataError(f"{where}: the question refers to {columns} but one of them is empty")
            samples.append(
                Sample(
                    id=str(row["id"]),
                    question=_IMAGE_REF.sub("", prompt).replace(IMAGE_TAG, ""),
                    reference=self.text(row["answer"], where, "answer"),
                    images=images,
                    fields={"question_type": qtype, "options": row["options"]},
                )
            )
        return samples

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        out = jmmmu_aggregate([(r["question_id"], float(r[self.metric])) for r in records])
        out["n"] = len(records)
        return out
