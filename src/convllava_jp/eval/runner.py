"""Run tasks on models: batched generation, cached and resumable predictions, per-sample scores.

Layout (llm-jp-eval-mm's, plus two small JSON files):

    <output>/<task>/<model>/prediction.jsonl   one line per sample: question_id, text, answer, ...
                            evaluation.jsonl   one line per sample: its score(s)
                            run.json           how the predictions were made (model, decoding...)
                            summary.json       the task's summary metrics + every setting that moves them

Predictions go through the batch-prediction engine (`infer.predict`): appended batch by batch,
flushed and fsynced, so a killed run loses at most one batch. A rerun keeps every line whose model
fingerprint, decoding settings and prompt (text and image bytes) still match (`cache.py`) and
generates only the rest. `rescore=True` recomputes evaluation.jsonl and summary.json from saved
predictions without loading the model.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..io import jsonl_text, write_atomic, write_json_atomic
from .cache import (
    PACKAGES,
    SCORING_PACKAGES,
    model_fingerprint,
    package_versions,
)
from .predictions import PREDICTIONS, generate_predictions, predict_task, saved_predictions
from .tasks import Sample, Task, get_task

log = logging.getLogger(__name__)

__all__ = [
    "EvalModel",
    "EvalSettings",
    "PACKAGES",
    "SCORING_PACKAGES",
    "generate_predictions",
    "model_fingerprint",
    "package_versions",
    "run_eval",
    "run_task",
    "saved_model_names",
]

EVALUATION = "evaluation.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class EvalModel:
    """A model to evaluate: the name its results are filed under, and its directory.

    `path` is None when only saved predictions are rescored.
    """

    name: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> EvalModel:
        """`DIR` (named after the dir) or `NAME=DIR`."""
        name, sep, path = text.partition("=")
        if sep and name and "/" not in name and os.sep not in name:
            return cls(_safe_name(name), Path(path))
        path = Path(text)
        return cls(_safe_name(path.resolve().name or text), path)


def _safe_name(name: str) -> str:
    """A model name usable as one directory level (llm-jp-eval-mm's `org/model` -> `org__model`)."""
    cleaned = re.sub(r"[^\w.\-+]", "_", name.replace("/", "__")).strip(".")
    if not cleaned:
        raise ConfigError(f"model name {name!r} has no usable characters")
    return cleaned


def saved_model_names(output_dir: str | os.PathLike, tasks: Sequence[str]) -> list[str]:
    """The models with saved predictions under `output_dir/<task>/` (what `--rescore` rescores)."""
    names: dict[str, None] = {}
    for task in tasks:
        root = Path(output_dir) / task
        if root.is_dir():
            names.update(dict.fromkeys(sorted(p.name for p in root.iterdir() if (p / PREDICTIONS).exists())))
    if not names:
        raise ConfigError(
            f"--rescore: no saved predictions under {output_dir}/<task>/<model>/ for tasks {list(tasks)}"
        )
    return list(names)


@dataclass
class EvalSettings:
    """Settings of one eval run. `max_new_tokens=None` takes each task's default (256; synthetic 16).

    Decoding is greedy when `temperature` is 0 (llm-jp-eval-mm's default, and what the published
    numbers used). `use_cache=False` regenerates every prediction and re-asks the judge.
    """

    batch_size: int = 8
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    limit: int | None = None
    use_cache: bool = True
    device: str = "auto"
    dtype: str | None = None
    template: str | None = None  # None: each model's recorded training template (else llm-jp-v1)
    show_progress: bool = True
    judge_runs: int = 1  # each judged item asked this many times (mean and spread reported)
    allow_other_split: bool = False  # score a local copy's only split when it lacks the task's
    rotate_choices: bool = False  # MECHA: each question once per rotation of its options (eval-mm's flag)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.judge_runs < 1:
            raise ConfigError(f"judge_runs must be >= 1, got {self.judge_runs}")

    def template_for(self, model_dir: str | os.PathLike | None) -> str:
        """The chat template a model is prompted with: the run's, else the one its dir records."""
        from ..model.templates import DEFAULT_TEMPLATE, default_template_name

        if self.template:
            return self.template
        return default_template_name(model_dir) if model_dir is not None else DEFAULT_TEMPLATE

    def generation(self, task: Task) -> dict[str, Any]:
        """The decoding settings for `task` (the keys of infer.GenerationConfig)."""
        gen: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens or task.default_max_new_tokens,
            "temperature": self.temperature,
        }
        if self.temperature > 0:
            gen["top_p"] = self.top_p
        return gen


def decoding_label(generation: Mapping[str, Any]) -> str:
    """'greedy' or 'sampling T=0.7 top_p=0.9'."""
    if not generation.get("temperature"):
        return "greedy"
    return f"sampling T={generation['temperature']} top_p={generation.get('top_p', 1.0)}"


JUDGE_LOG = "judge.jsonl"


def _judge_for(task: Task, judge: Any, out_dir: Path, settings: EvalSettings) -> Any:
    """The judge as this task uses it: a `JudgeRun` logging to `<out_dir>/judge.jsonl`, or None."""
    if judge is None or not (task.needs_judge or task.judge_metric):
        return None
    from .judge import JudgeConfig, JudgeRun

    if isinstance(judge, JudgeRun):
        return judge
    if not isinstance(judge, JudgeConfig):
        raise ConfigError(f"judge must be a JudgeConfig, got {type(judge).__name__}")
    return JudgeRun(
        judge,
        out_dir / JUDGE_LOG,
        runs=settings.judge_runs,
        reuse=settings.use_cache,
        show_progress=settings.show_progress,
    )


def _judge_settings(task: Task, judge: Any) -> dict[str, Any] | None:
    from .judged import judge_settings

    metric = task.metric if task.needs_judge else task.judge_metric
    return judge_settings(judge, metric) if judge is not None and metric else None


def _score(
    task: Task,
    samples: Sequence[Sample],
    records: Mapping[str, dict],
    out_dir: Path,
    settings: EvalSettings,
    judge: Any,
) -> list[dict]:
    """Score every prediction (reusing saved judge verdicts when caching) and write evaluation.jsonl."""
    predictions = {s.id: records[s.id]["text"] for s in samples}
    scored = task.score(samples, predictions, judge=judge, show_progress=settings.show_progress)
    for rec, s in zip(scored, samples):
        rec["empty_prediction"] = not predictions[s.id].strip()
        if records[s.id].get("error"):
            rec["generation_error"] = records[s.id]["error"]
    write_atomic(out_dir / EVALUATION, jsonl_text(scored))
    return scored


def _summary_settings(
    task: Task, info: Any, settings: EvalSettings, judge: Any, dataset_origin: str | None
) -> dict[str, Any]:
    """Every setting that moves the task's numbers, for summary.json."""
    return {
        **task.settings(),
        "split": task.source_split if task.source_origin is not None else task.split,
        "task_split": task.split,
        "dataset": task.source_origin or dataset_origin,
        "limit": settings.limit,
        "template": info.template,
        "max_new_tokens": info.generation.get("max_new_tokens"),
        "decoding": decoding_label(info.generation) if info.generation else "unknown",
        "generation": info.generation,
        "judge": _judge_settings(task, judge),
        "packages": info.packages,
        "scoring_packages": package_versions(),
    }


def run_task(
    task: Task | str,
    samples: Sequence[Sample],
    model: EvalModel,
    output_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    judge: Any = None,
    rescore: bool = False,
    get_pipeline: Callable[[], Any] | None = None,
    dataset_origin: str | None = None,
) -> dict[str, Any]:
    """Predict (or reuse saved predictions), score and summarise one task on one model.

    Writes prediction.jsonl, evaluation.jsonl, run.json and summary.json under
    `output_dir/<task>/<model>/` and returns the summary. `get_pipeline` is called at most once,
    and only when some prediction is not cached.
    """
    task = get_task(task) if isinstance(task, str) else task
    settings = settings or EvalSettings()
    out_dir = Path(output_dir) / task.name / model.name
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    judge = _judge_for(task, judge, out_dir, settings)
    if rescore:
        records, info = saved_predictions(task, samples, model, out_dir)
        counts = {"cached_predictions": len(samples), "generated": 0}
    else:
        if get_pipeline is None:
            raise ConfigError("run_task needs get_pipeline to generate predictions (or rescore=True)")
        records, info, counts = predict_task(task, samples, model, out_dir, settings, get_pipeline)
    scored = _score(task, samples, records, out_dir, settings, judge)
    summary = {
        "task": task.name,
        "title": task.title,
        "model": model.name,
        "model_path": info.model_path,
        "model_fingerprint": info.model_fingerprint,
        "primary": task.primary,
        "metrics": task.aggregate(scored),
        "counts": {
            **counts,
            "n": len(samples),
            "empty_predictions": sum(1 for r in scored if r["empty_prediction"]),
            "generation_errors": sum(1 for s in samples if records[s.id].get("error")),
        },
        "settings": _summary_settings(task, info, settings, judge, dataset_origin),
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / SUMMARY, summary)
    return summary


def load_pipeline(model: EvalModel, settings: EvalSettings) -> Any:
    """The default model loader: `VLMPipeline.from_pretrained` with the run's device/dtype/template."""
    from ..infer.generation import VLMPipeline

    if model.path is None or not Path(model.path).is_dir():
        raise ConfigError(f"model dir {model.path} does not exist")
    return VLMPipeline.from_pretrained(
        model.path, device=settings.device, dtype=settings.dtype, template=settings.template_for(model.path)
    )


def run_eval(
    models: Sequence[EvalModel],
    tasks: Sequence[str],
    output_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    data: Mapping[str, str] | None = None,
    judge: Any = None,
    rescore: bool = False,
    pipeline_factory: Callable[[EvalModel, EvalSettings], Any] = load_pipeline,
) -> list[dict[str, Any]]:
    """Every task on every model; returns the summaries (also written under `output_dir`).

    All datasets are loaded and checked before any model is, so a wrong path or schema fails at
    once. Each model is loaded once, and only if some prediction is not cached. `data` maps a task
    name to its local copy (else the hub id is used).
    """
    settings = settings or EvalSettings()
    data = dict(data or {})
    task_objs = [get_task(name) for name in tasks]
    for task in task_objs:
        if hasattr(task, "rotate_choices"):
            task.rotate_choices = settings.rotate_choices
    unknown = set(data) - {t.name for t in task_objs} - set(tasks)
    if unknown:
        raise ConfigError(f"--data given for {sorted(unknown)}, which are not among the tasks {list(tasks)}")
    loaded = []
    for task in task_objs:
        source = data.get(task.name)
        samples = task.load(source, settings.limit, allow_other_split=settings.allow_other_split)
        if not samples:
            raise DataError(f"{task.name}: the dataset has no samples")
        loaded.append((task, samples, str(source) if source else f"{task.hub_id} [{task.split}]"))

    summaries = []
    for model in models:
        pipeline: list[Any] = []

        def get_pipeline(model: EvalModel = model, pipeline: list[Any] = pipeline) -> Any:
            if not pipeline:
                pipeline.append(pipeline_factory(model, settings))
            return pipeline[0]

        for task, samples, origin in loaded:
            summaries.append(
                run_task(
                    task,
                    samples,
                    model,
                    output_dir,
                    settings,
                    judge=judge,
                    rescore=rescore,
                    get_pipeline=get_pipeline,
                    dataset_origin=origin,
                )
            )
    return summaries
