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

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import DataError
from ..metrics import HERON_CATEGORIES, heron_aggregate
from .base import IMAGE_TAG, RowSource, Sample, Task, raw_text_field, required_image
from .registry import register_task

log = logging.getLogger(__name__)

REFERENCE_MODEL = "gpt-4-0125-preview"  # the reference answer llm-jp-eval-mm scores against
NOT_JUDGED = "not judged: no --judge-url given"


_VERDICT_KEYS = ("error", "judge_model", "judge_model_version", "attempts", "raw")


def _ids(sample: Sample) -> dict[str, Any]:
    """The first fields of a sample's evaluation record."""
    return {"question_id": sample.id, "category": sample.fields["category"]}


def _run_record(verdict: dict[str, Any]) -> dict[str, Any]:
    value = verdict.get("value") if verdict.get("error") is None else None
    scores = value or {"score": -1, "score_gpt": -1}
    return {
        "score": scores["score"],
        "score_gpt": scores["score_gpt"],
        **{k: verdict.get(k) for k in _VERDICT_KEYS},
    }


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
            raw = self.text(row["text"], where, "text")
            question = raw.replace(IMAGE_TAG, "")
            samples.append(
                Sample(
                    id=str(row["question_id"]),
                    question=question,
                    reference=self.text(answers[REFERENCE_MODEL], where, f"answer.{REFERENCE_MODEL}"),
                    images=[image],
                    fields={
                        "category": category,
                        "context": self.text(row["context"], where, "context"),
                        **raw_text_field(raw, question),
                    },
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
        """Ask the judge about every sample (each of `runs` times) whose verdict is not logged yet.

        Without a judge every record says so in `error` and has no scores. A record's top-level
        scores are run 0's; `runs` holds every run's. Failed verdicts are asked again on a rerun;
        good ones with the same judge, prompt and answer are reused from the judge log.
        """
        from ..judge import JudgeJob
        from ..judge_prompts import build_judge_messages, heron_parse
        from ..judged import as_judge_run, verdicts_by_sample

        run = as_judge_run(judge)
        if run is None:
            log.warning("heron-bench: no --judge-url, so the answers are saved but not scored")
            return [{**_ids(s), "score": None, "score_gpt": None, "error": NOT_JUDGED} for s in samples]
        jobs = [
            JudgeJob(
                s.id,
                r,
                self.metric,
                build_judge_messages(
                    s.fields["context"], self.judge_question(s), s.reference, predictions[s.id]
                ),
                heron_parse,
            )
            for s in samples
            for r in range(run.runs)
        ]
        verdicts = verdicts_by_sample(run, jobs)
        records = []
        for s in samples:
            runs = [_run_record(v) for v in verdicts[s.id]]
            records.append({**_ids(s), **runs[0], "runs": runs})
        failed = sum(1 for r in records if r["error"] is not None)
        if failed:
            log.warning(
                "heron-bench: the judge failed on %d of %d samples (see judge.jsonl)", failed, len(samples)
            )
        return records

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
        n_runs = max((len(r.get("runs") or []) for r in judged), default=0)
        if n_runs > 1:
            from ..judged import run_spread

            per_run = [
                [{"category": r["category"], **r["runs"][i]} for r in judged if len(r["runs"]) > i]
                for i in range(n_runs)
            ]
            for key in ("overall", "overall_rel"):
                values = [heron_aggregate(rs).get(key) if rs else None for rs in per_run]
                out[f"{key}_runs"] = run_spread([None if v is None or v != v else v for v in values])
            out["overall"] = out["overall_runs"]["mean"]
            out["overall_rel"] = out["overall_rel_runs"]["mean"]
        return out

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reference_answer": f"answer[{REFERENCE_MODEL!r}]"}
