"""JDocQA (speed/JDocQA, split test): Japanese document QA over up to 4 page images a question.

As llm-jp-eval-mm: the page images are the non-empty cells of `image_0` .. `image_3`; yes/no,
factoid and numerical answers score 1 when the normalised reference occurs in the normalised
prediction, open-ended ones by sentence BLEU (ja-mecab) / 100; the overall score is the mean over
all questions, with a mean per answer type beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ...errors import DataError
from ..metrics import JDOCQA_ANSWER_TYPES
from .base import IMAGE_TAG, RowSource, Sample, Task, _mean, image_source
from .registry import register_task

IMAGE_COLUMNS = ("image_0", "image_1", "image_2", "image_3")
_TYPE_NAMES = {code: name for name, code in JDOCQA_ANSWER_TYPES.items()}
_SUMMARY_KEYS = {
    "yesno": "yesno_exact",
    "factoid": "factoid_exact",
    "numerical": "numerical_exact",
    "open-ended": "open-ended_bleu",
}  # llm-jp-eval-mm's names


def _label_key(text: str) -> str:
    return "".join(c for c in text.strip().lower() if c.isalnum())


# The dataset's own label names and eval-mm's, in any case and punctuation: "yes/no", "Yes-No",
# "yesno", "open-ended", "Open ended"...
_LABELS = {_label_key(name): code for name, code in JDOCQA_ANSWER_TYPES.items()}


def answer_type_code(value: Any, where: str) -> int:
    """JDocQA's answer type as eval-mm's code 0-3, from a code (int or digit string) or a label name."""
    code: Any = None
    if isinstance(value, int) and not isinstance(value, bool):
        code = value
    elif isinstance(value, str):
        key = _label_key(value)
        code = int(key) if key.isdigit() and len(key) == 1 else _LABELS.get(key)
    if code not in _TYPE_NAMES:
        raise DataError(
            f"{where}: answer_type {value!r:.80} is not a JDocQA answer type; use a code "
            f"{sorted(_TYPE_NAMES)} or a label ({', '.join(JDOCQA_ANSWER_TYPES)}; 'yes/no' is read as yesno)"
        )
    return code


@register_task
class JDocQA(Task):
    name = "jdocqa"
    title = "JDocQA"
    hub_id = "speed/JDocQA"
    split = "test"
    metric = "jdocqa"
    required_columns = ("question_id", "question", "answer", "answer_type", "image_0")
    primary = "overall"
    schema_hint = (
        "Expected (as on the hub): question_id, question, answer, answer_type (0 yesno, 1 factoid, "
        "2 numerical, 3 open-ended), image_0 .. image_3 (empty cells for fewer pages), and the "
        "original JDocQA columns."
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            images = [image_source(row.get(c), source.base_dir, f"{where} {c}") for c in IMAGE_COLUMNS]
            images = [im for im in images if im is not None]
            if not images:
                raise DataError(f"{where}: no page image in {list(IMAGE_COLUMNS)}")
            answer_type = answer_type_code(row["answer_type"], where)
            samples.append(
                Sample(
                    id=str(row["question_id"]),
                    question=self.text(row["question"], where, "question").replace(IMAGE_TAG, ""),
                    reference=self.text(row["answer"], where, "answer"),
                    images=images,
                    fields={"answer_type": int(answer_type)},
                )
            )
        return samples

    def score_fields(self, sample: Sample) -> dict[str, Any]:
        return {"answer_type": sample.fields["answer_type"]}

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """llm-jp-eval-mm's JDocQA summary: mean per answer type (0.0 when a type is absent) and overall."""
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_type[_TYPE_NAMES[r["answer_type"]]].append(float(r[self.metric]))
        out: dict[str, Any] = {
            key: _mean(by_type[t]) if by_type[t] else 0.0 for t, key in _SUMMARY_KEYS.items()
        }
        out["overall"] = _mean(float(r[self.metric]) for r in records) if records else 0.0
        out["n"] = len(records)
        out.update({f"{t}_count": len(by_type[t]) for t in _SUMMARY_KEYS})
        return out
