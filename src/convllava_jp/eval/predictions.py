"""The predictions of one task on one model: reused from prediction.jsonl, generated, or loaded to rescore.

Generation goes through the batch-prediction engine (`infer.predict`): batch by batch, each batch
appended durably. A saved prediction is reused only while its run key (model fingerprint,
template, decoding) and prompt key (prompt text, image bytes) match (`cache.py`) and it has no
error; stale lines are dropped before generating, so the file only holds this run's predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from ..io import jsonl_text, read_json, read_jsonl, write_atomic, write_json_atomic
from .cache import model_fingerprint, package_versions, prompt_key, run_key
from .tasks import Sample, Task

if TYPE_CHECKING:
    from .runner import EvalModel, EvalSettings

log = logging.getLogger(__name__)

PREDICTIONS = "prediction.jsonl"
RUN_INFO = "run.json"


# --- generation ------------------------------------------------------------------------------------


def _request(sample: Sample) -> Any:
    from ..infer.generation import GenerationRequest

    return GenerationRequest([{"role": "user", "content": sample.prompt}], list(sample.images))


def _batch_order(samples: Sequence[Sample]) -> list[Sample]:
    """Samples batched by image count and prompt length: less padding."""
    return sorted(samples, key=lambda s: (len(s.images), len(s.prompt)))


def _result(prediction: Any) -> dict:
    """A Prediction as {"text", "finish_reason", "completion_tokens", "error"}."""
    if prediction.error is not None:
        return {"text": "", "finish_reason": "error", "completion_tokens": 0, "error": str(prediction.error)}
    r = prediction.result
    return {
        "text": r.text,
        "finish_reason": r.finish_reason,
        "completion_tokens": r.completion_tokens,
        "error": None,
    }


def generate_predictions(
    pipeline: Any,
    samples: Sequence[Sample],
    generation: Mapping[str, Any],
    batch_size: int,
    *,
    desc: str = "generate",
    show_progress: bool = True,
) -> dict[str, dict]:
    """Answer `samples` with `pipeline`, `batch_size` at a time, nothing saved; {id: {"text", ...}}.

    A sample the pipeline refuses (bad image, prompt too long) gets an empty text and its error.
    """
    from ..infer.generation import GenerationConfig
    from ..infer.predict import generate_in_batches

    requests = [(s.id, _request(s)) for s in _batch_order(samples)]
    predictions = generate_in_batches(
        pipeline,
        requests,
        GenerationConfig(**generation),
        batch_size,
        desc=desc,
        unit="sample",
        label="sample",
        show_progress=show_progress,
    )
    return {sid: _result(p) for sid, p in predictions.items()}


@dataclass
class RunInfo:
    model: str
    model_path: str | None
    model_fingerprint: str | None
    template: str
    generation: dict[str, Any]
    packages: dict[str, str | None] = field(default_factory=package_versions)

    @property
    def run_key(self) -> str:
        return run_key(self.model_fingerprint, self.template, self.generation)


def _prediction_record(sample: Sample, result: Mapping[str, Any], run_key: str, key: str) -> dict:
    return {
        "question_id": sample.id,
        "text": result["text"],
        "answer": sample.reference,
        "input_text": sample.question,
        "n_images": len(sample.images),
        "finish_reason": result.get("finish_reason"),
        "completion_tokens": result.get("completion_tokens"),
        "error": result.get("error"),
        "prompt_key": key,
        "run_key": run_key,
    }


def _cached_predictions(path: Path, keys: Mapping[str, str], key: str) -> dict[str, dict]:
    """Saved predictions still valid: same run key and prompt key, and no generation error."""
    cached: dict[str, dict] = {}
    for rec in read_jsonl(path):
        qid = rec.get("question_id") if isinstance(rec, dict) else None
        if (
            qid in keys
            and rec.get("run_key") == key
            and rec.get("prompt_key") == keys[qid]
            and rec.get("error") is None
        ):
            cached[qid] = rec
    return cached


def predict_task(
    task: Task,
    samples: Sequence[Sample],
    model: EvalModel,
    out_dir: Path,
    settings: EvalSettings,
    get_pipeline: Callable[[], Any],
) -> tuple[dict[str, dict], RunInfo, dict[str, int]]:
    """Cached + newly generated prediction records for every sample, and the run's info."""
    from ..infer.generation import GenerationConfig
    from ..infer.predict import predict_to_file

    if model.path is None:
        raise ConfigError(f"model {model.name!r} has no directory; give --model DIR (or use --rescore)")
    info = RunInfo(
        model=model.name,
        model_path=str(model.path),
        model_fingerprint=model_fingerprint(model.path),
        template=settings.template_for(model.path),
        generation=settings.generation(task),
    )
    key = info.run_key
    keys = {s.id: prompt_key(s) for s in samples}
    path = out_dir / PREDICTIONS
    cached = _cached_predictions(path, keys, key) if settings.use_cache else {}
    pending = [s for s in samples if s.id not in cached]
    log.info(
        "%s / %s: %d cached predictions, %d to generate", task.name, model.name, len(cached), len(pending)
    )
    # Drop stale lines now, so the file only ever holds predictions of this run.
    write_atomic(path, jsonl_text(cached[s.id] for s in samples if s.id in cached))
    write_json_atomic(out_dir / RUN_INFO, asdict(info))
    records = dict(cached)
    by_id = {s.id: s for s in pending}

    def to_row(prediction: Any) -> dict:
        sample = by_id[prediction.id]
        records[sample.id] = _prediction_record(sample, _result(prediction), key, keys[sample.id])
        return records[sample.id]

    if pending:
        predict_to_file(
            get_pipeline,
            [(s.id, _request(s)) for s in _batch_order(pending)],
            GenerationConfig(**info.generation),
            settings.batch_size,
            path,
            to_row,
            id_key="question_id",
            what="the eval",
            desc=f"{task.name} / {model.name}",
            unit="sample",
            label="sample",
            show_progress=settings.show_progress,
        )
    # Final order = dataset order.
    write_atomic(path, jsonl_text(records[s.id] for s in samples))
    counts = {"cached_predictions": len(cached), "generated": len(pending)}
    return records, info, counts


def saved_predictions(
    task: Task, samples: Sequence[Sample], model: EvalModel, out_dir: Path
) -> tuple[dict, RunInfo]:
    path = out_dir / PREDICTIONS
    if not path.exists():
        raise DataError(f"--rescore: no saved predictions at {path}; run the eval without --rescore first")
    records = {r["question_id"]: r for r in read_jsonl(path) if isinstance(r, dict) and "question_id" in r}
    missing = [s.id for s in samples if s.id not in records]
    if missing:
        raise DataError(
            f"--rescore: {path} lacks {len(missing)} of {len(samples)} samples (e.g. {missing[:3]}); "
            "run the eval without --rescore to generate them"
        )
    stale = sum(1 for s in samples if records[s.id].get("prompt_key") not in (None, prompt_key(s)))
    if stale:
        log.warning("%s: %d predictions were made for a different prompt than the dataset's now", path, stale)
    info_path = out_dir / RUN_INFO
    if info_path.exists():
        info = RunInfo(**read_json(info_path, what="run info"))
    else:
        log.warning("%s missing: the summary cannot say how these predictions were made", info_path)
        info = RunInfo(model.name, None, None, "unknown", {}, {})
    return records, info
