"""Multiple-choice tasks scored by letter: MECHA-ja and CVQA (Japanese subset).

Both show the question, one "A. option" line per option and eval-mm's instruction to answer with
the letter; the reference is the letter of the right option. MECHA scores 1 when that capital
letter occurs anywhere in the answer (eval-mm's `ref in pred`); CVQA lower-cases both and turns
English number words into digits first (eval-mm's substring-match), so a reference "a" matches
almost any answer. `--rotate-choices` asks each MECHA question once per rotation of its options
(ids `<n>_rot<i>`), as eval-mm's `--rotate_choices`, with a summary block per rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import DataError
from .. import text_metrics  # noqa: F401  (registers contains / substring-match)
from ..choice_metrics import choice_letters, options_prompt
from .base import RowSource, Sample, Task, _mean, required_image
from .registry import register_task

CVQA_SUBSET = "('Japanese', 'Japan')"


def _option_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: options must be a non-empty list of texts, got {value!r:.80}")
    return list(value)


def _letter(index: Any, options: list[str], where: str) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < min(len(options), 4):
        raise DataError(f"{where}: the answer index {index!r} is not 0-{min(len(options), 4) - 1}")
    return choice_letters(4)[index]  # eval-mm's OPTIONS_MAP knows A-D only


@register_task
class MechaJa(Task):
    name = "mecha-ja"
    title = "MECHA-ja"
    hub_id = "llm-jp/MECHA-ja"
    split = "test"
    metric = "contains"
    required_columns = ("question", "options", "answer", "answer_type", "image", "background_text")
    primary = "overall"
    schema_hint = "Expected (as on the hub): question, options (list), answer (0-3), answer_type (0 factoid, 1 non-factoid), image, background_text."
    layout = "save_to_disk dir / hub parquet folder / .parquet / .json(l) of the test split"

    rotate_choices: bool = False  # eval-mm's --rotate_choices: each question 4 times, options rotated

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            options = _option_list(row["options"], where)
            answer = row["answer"]
            _letter(answer, options, where)
            image = required_image(row["image"], source.base_dir, where)
            question = self.text(row["question"], where, "question")
            fields = {"answer_type": row["answer_type"], "has_background": bool(row["background_text"])}
            turns = range(len(options)) if self.rotate_choices else [None]
            for r in turns:
                shown = options if r is None else options[r:] + options[:r]
                index = answer if r is None else (answer - r) % len(options)
                samples.append(
                    Sample(
                        id=str(i) if r is None else f"{i}_rot{r}",
                        question=options_prompt(question, shown),
                        reference=_letter(index, shown, where),
                        images=[image],
                        fields={**fields, "rotation": "no_rot" if r is None else str(r)},
                    )
                )
        return samples

    def score_fields(self, sample: Sample) -> dict[str, Any]:
        return dict(sample.fields)

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """eval-mm's MECHA summary: overall, Factoid / Non-Factoid, with / without background (0.0 when empty)."""

        def mean(rs: list[dict]) -> float:
            return _mean(float(r[self.metric]) for r in rs) if rs else 0.0

        out = {
            "overall": mean(list(records)),
            "Factoid": mean([r for r in records if r["answer_type"] == 0]),
            "Non-Factoid": mean([r for r in records if r["answer_type"] != 0]),
            "with_background": mean([r for r in records if r["has_background"]]),
            "without_background": mean([r for r in records if not r["has_background"]]),
        }
        for rot in dict.fromkeys(r["rotation"] for r in records):
            rs = [r for r in records if r["rotation"] == rot]
            out[f"rot_{rot}"] = {
                "overall": mean(rs),
                "Factoid": mean([r for r in rs if r["answer_type"] == 0]),
                "Non-Factoid": mean([r for r in rs if r["answer_type"] != 0]),
                "with_background": mean([r for r in rs if r["has_background"]]),
                "without_background": mean([r for r in rs if not r["has_background"]]),
            }
        out["n"] = len(records)
        return out


@register_task
class CVQAJapanese(Task):
    name = "cvqa"
    title = "CVQA (ja)"
    hub_id = "afaji/cvqa"
    split = "test"
    metric = "substring-match"
    required_columns = ("image", "Question", "Options", "Label")
    schema_hint = (
        "Expected (as on the hub): image, Question, Options (list), Label (0-3), Subset; only Subset == "
        + CVQA_SUBSET
        + " is used."
    )
    layout = (
        "the hub's test split (all subsets or only the Japanese one) as save_to_disk / parquet / .json(l)"
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            if "Subset" in source.columns and row["Subset"] != CVQA_SUBSET:
                continue
            where = f"{source.origin} row {i}"
            options = _option_list(row["Options"], where)
            samples.append(
                Sample(
                    id=str(len(samples)),  # eval-mm numbers the Japanese rows after its filter
                    question=options_prompt(self.text(row["Question"], where, "Question"), options),
                    reference=_letter(row["Label"], options, where),
                    images=[required_image(row["image"], source.base_dir, where)],
                )
            )
        return samples

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["substring_match"] = out["score"]
        return out
