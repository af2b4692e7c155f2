"""Japanese Heron-Bench (Silviase/Japanese-Heron-Bench, split train): LLM-as-judge, relative score.

As in llm-jp-eval-mm: the model sees the image and the `text` column (the question) only; the
`context` column (a human description of the image) goes to the judge, with the question, the
reference answer `answer["gpt-4-0125-preview"]` and the model's answer. The judge scores both
answers 1-10; per category (conv / detail / complex) the score is 100 * mean(model) / mean(reference),
and the overall score the mean of the three. A judge that fails (unreachable, or no readable scores
after its retries) is recorded on the sample with its error and left out of the means, never
counted as 0 or 10; the summary reports how many.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import DataError
from ..metrics import HERON_CATEGORIES, heron_aggregate
from .base import IMAGE_TAG, RowSource, Sample, Task, required_image
from .registry import register_task

log = logging.getLogger(__name__)

REFERENCE_MODEL = "gpt-4-0125-preview"  # the reference answer llm-jp-eval-mm scores against
NOT_JUDGED = "not judged: no --judge-url given"


def judge_key(judge: Any, sample: Sample, answer: str) -> str:
    """Identifies one verdict: the judge model and settings, and the full prompt it was shown."""
    from ..judge import build_judge_messages

    messages = build_judge_messages(sample.fields["context"], sample.question, sample.reference, answer)
    payload = [judge.model, judge.temperature, judge.seed, judge.max_tokens, messages]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


_VERDICT_KEYS = ("score", "score_gpt", "error", "judge_model", "judge_model_version", "attempts", "raw")


def _ids(sample: Sample) -> dict[str, Any]:
    """The first fields of a sample's evaluation record."""
    return {"question_id": sample.id, "category": sample.fields["category"]}


@register_task
class JapaneseHeronBench(Task):
    name = "heron-bench"
    title = "Heron-Bench"
    hub_id = "Silviase/Japanese-Heron-Bench"
    split = "train"  # the benchmark's only split
    metric = "heron-judge"
    required_columns = ("question_id", "image", "category", "context", "text", "answer")
    primary = "overall"
    needs_judge = True
    prompt_description = "llm-jp-v1 chat; user turn = '<image>\\n' + text (context goes to the judge only)"
    schema_hint = (
        "Expected (as on the hub): question_id, image_category, image, category (conv/detail/complex), "
        f"context, text, answer = {{{REFERENCE_MODEL!r}: ..., <other models>: ...}}."
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            answers = row["answer"]
            if not isinstance(answers, Mapping) or answers.get(REFERENCE_MODEL) is None:
                raise DataError(
                    f"{where}: 'answer' must be a mapping with the reference answer under "
                    f"{REFERENCE_MODEL!r}; got {answers!r:.120}"
                )
            category = self.text(row["category"], where, "category")
            if category not in HERON_CATEGORIES:
                raise DataError(f"{where}: category {category!r} is not one of {list(HERON_CATEGORIES)}")
            image = required_image(row["image"], source.base_dir, where)
            samples.append(
                Sample(
                    id=str(row["question_id"]),
                    question=self.text(row["text"], where, "text").replace(IMAGE_TAG, ""),
                    reference=self.text(answers[REFERENCE_MODEL], where, f"answer.{REFERENCE_MODEL}"),
                    images=[image],
                    fields={"category": category, "context": self.text(row["context"], where, "context")},
                )
            )
        return samples

    def score(
        self,
        samples: Sequence[Sample],
        predictions: Mapping[str, str],
        *,
        judge: Any = None,
        previous: Mapping[str, dict] | None = None,
        show_progress: bool = True,
    ) -> list[dict]:
        """Ask the judge about every sample whose verdict is not already in `previous`.

        Without a judge every record says so in `error` and has no scores. Verdicts that failed
        earlier are asked again; successful ones with the same judge, prompt and answer are reused.
        """
        if judge is None:
            log.warning("heron-bench: no --judge-url, so the answers are saved but not scored")
            return [{**_ids(s), "score": None, "score_gpt": None, "error": NOT_JUDGED} for s in samples]
        from ..judge import judge_many

        previous = previous or {}
        records: dict[str, dict] = {}
        todo: list[tuple[Sample, str]] = []
        for s in samples:
            key = judge_key(judge, s, predictions[s.id])
            old = previous.get(s.id)
            if old and old.get("judge_key") == key and old.get("error") is None:
                records[s.id] = old
            else:
                todo.append((s, key))
        if len(records):
            log.info("heron-bench: reusing %d judge verdicts, asking %d", len(records), len(todo))
        items = [
            {
                "context": s.fields["context"],
                "question": s.question,
                "reference": s.reference,
                "answer": predictions[s.id],
            }
            for s, _ in todo
        ]
        verdicts = judge_many(judge, items, show_progress=show_progress) if items else []
        for (s, key), verdict in zip(todo, verdicts):
            records[s.id] = {**_ids(s), **{k: verdict[k] for k in _VERDICT_KEYS}, "judge_key": key}
        failed = sum(1 for r in records.values() if r["error"] is not None)
        if failed:
            log.warning(
                "heron-bench: the judge failed on %d of %d samples (see evaluation.jsonl)",
                failed,
                len(samples),
            )
        return [records[s.id] for s in samples]

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """`heron_aggregate` over the judged records; judge failures and unjudged ones are counted."""
        judged = [r for r in records if r.get("score") is not None]
        out: dict[str, Any] = dict(heron_aggregate(judged)) if judged else {}
        out["n"] = len(records)
        out["judge_failures"] = sum(1 for r in judged if r.get("error") is not None)
        out["not_judged"] = len(records) - len(judged)
        versions = sorted({str(r["judge_model_version"]) for r in judged if r.get("judge_model_version")})
        if versions:
            out["judge_model_versions"] = versions
        overall = out.get("overall")
        if overall is None or overall != overall:  # nothing judged, or no valid verdict (NaN)
            out["overall"] = None
        return out

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reference_answer": f"answer[{REFERENCE_MODEL!r}]"}
