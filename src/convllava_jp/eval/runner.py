"""Run tasks on models: batched generation, cached and resumable predictions, per-sample scores.

Layout (llm-jp-eval-mm's, plus two small JSON files):

    <output>/<task>/<model>/prediction.jsonl   one line per sample: question_id, text, answer, ...
                            evaluation.jsonl   one line per sample: its score(s)
                            run.json           how the predictions were made (model, decoding...)
                            summary.json       the task's summary metrics + every setting that moves them

Predictions are appended batch by batch (flushed and fsynced), so a killed run loses at most one
batch; a rerun keeps every line whose model fingerprint, decoding settings and prompt (text and
image bytes) still match, and generates only the rest. `rescore=True` recomputes evaluation.jsonl
and summary.json from saved predictions without loading the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError, ConvLlavaError, DataError
from .tasks import Sample, Task, get_task

log = logging.getLogger(__name__)

__all__ = [
    "EvalSettings",
    "ModelSpec",
    "PACKAGES",
    "SCORING_PACKAGES",
    "generate_predictions",
    "model_fingerprint",
    "package_versions",
    "read_jsonl",
    "run_eval",
    "run_task",
]

# Packages whose version can move a score: the scorers and the tokenizers/normalizers they use.
SCORING_PACKAGES = (
    "rouge-score",
    "fugashi",
    "unidic-lite",
    "neologdn",
    "emoji",
    "sacrebleu",
    "mecab-python3",
    "ipadic",
)
# Packages whose version can move a number: the model code, generation, tokenizers and scorers.
PACKAGES = ("convllava-jp", "torch", "transformers", "tokenizers", "datasets", *SCORING_PACKAGES)

PREDICTIONS = "prediction.jsonl"
EVALUATION = "evaluation.jsonl"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: the name its results are filed under, and its directory.

    `path` is None when only saved predictions are rescored.
    """

    name: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
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
    template: str = "llm-jp-v1"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")

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


# --- fingerprints and versions ---------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    return hashlib.sha256(
        json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A content fingerprint of a model dir: every file's name and bytes (sha256).

    Checkpoint sub-dirs and logs are left out. A retrained, converted or merged model changes it;
    copying the dir does not. Hashing reads the weights once (seconds for a 2B model), and the
    result is remembered for unchanged files (same size and mtime) within the process.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"model dir {root} does not exist")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0].startswith(("checkpoint-", "runs", ".")):
            continue
        stat = path.stat()
        files.append((rel, stat.st_size, stat.st_mtime_ns))
    return _fingerprint(str(root.resolve()), tuple(files))


@functools.lru_cache(maxsize=32)
def _fingerprint(root: str, files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, size, _ in files:
        h.update(f"{rel}\0{size}\0".encode())
        with open(os.path.join(root, rel), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where a package is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if out.get("convllava-jp", "") is None:  # run from a source tree (PYTHONPATH=src), not installed
        from .. import __version__

        out["convllava-jp"] = f"{__version__} (source)"
    return out


def _image_digest(image: Any) -> str:
    if isinstance(image, bytes):
        data = image
    elif isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError:
            data = str(image).encode()  # a missing file fails at generation, with its name
    elif hasattr(image, "tobytes"):
        data = image.tobytes()
    else:
        data = repr(image).encode()
    return hashlib.sha1(data).hexdigest()


def prompt_key(sample: Sample) -> str:
    """Identifies what the model is shown for a sample: the prompt text and the image bytes."""
    return _digest(sample.prompt, [_image_digest(im) for im in sample.images])


# --- JSONL files ---------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a killed writer) is skipped with a warning."""
    records = []
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line (an interrupted write?)", path, lineno)
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# --- generation ------------------------------------------------------------------------------------


def _request(sample: Sample) -> Any:
    from ..infer.generation import GenerationRequest

    return GenerationRequest([{"role": "user", "content": sample.prompt}], list(sample.images))


def _generate_chunk(pipeline: Any, chunk: Sequence[Sample], config: Any) -> list[dict]:
    """Generate one batch; a batch the pipeline refuses (bad image, prompt too long) is retried
    one sample at a time so only the bad samples get an error (and an empty prediction)."""

    def record(result: Any) -> dict:
        return {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "completion_tokens": result.completion_tokens,
            "error": None,
        }

    try:
        return [
            record(r) for r in pipeline.generate([_request(s) for s in chunk], config, batch_size=len(chunk))
        ]
    except ConvLlavaError as err:
        if len(chunk) == 1:
            log.error("sample %s: %s", chunk[0].id, err)
            return [{"text": "", "finish_reason": "error", "completion_tokens": 0, "error": str(err)}]
        log.warning("a batch failed (%s); retrying its samples one at a time", err)
        return [_generate_chunk(pipeline, [s], config)[0] for s in chunk]


def generate_predictions(
    pipeline: Any,
    samples: Sequence[Sample],
    generation: Mapping[str, Any],
    batch_size: int,
    *,
    on_batch: Callable[[list[tuple[Sample, dict]]], None] | None = None,
    desc: str = "generate",
    show_progress: bool = True,
) -> dict[str, dict]:
    """Answer `samples` with `pipeline`, `batch_size` at a time; returns {id: {"text", ...}}.

    Samples are batched by image count and prompt length (less padding); `on_batch` gets each
    batch's (sample, result) pairs as soon as it is done.
    """
    from ..infer.generation import GenerationConfig

    config = GenerationConfig(**generation)
    order = sorted(samples, key=lambda s: (len(s.images), len(s.prompt)))
    out: dict[str, dict] = {}
    with tqdm(total=len(order), desc=desc, unit="sample", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            results = _generate_chunk(pipeline, chunk, config)
            pairs = list(zip(chunk, results))
            for s, r in pairs:
                out[s.id] = r
            if on_batch is not None:
                on_batch(pairs)
            bar.update(len(chunk))
    return out


# --- one task on one model -------------------------------------------------------------------------


@dataclass
class _RunInfo:
    model: str
    model_path: str | None
    model_fingerprint: str | None
    template: str
    generation: dict[str, Any]
    packages: dict[str, str | None] = field(default_factory=package_versions)

    @property
    def run_key(self) -> str:
        return _digest(self.model_fingerprint, self.template, self.generation)


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


def _predict_task(
    task: Task,
    samples: Sequence[Sample],
    model: ModelSpec,
    out_dir: Path,
    settings: EvalSettings,
    get_pipeline: Callable[[], Any],
) -> tuple[dict[str, dict], _RunInfo, dict[str, int]]:
    """Cached + newly generated prediction records for every sample, and the run's info."""
    if model.path is None:
        raise ConfigError(f"model {model.name!r} has no directory; give --model DIR (or use --rescore)")
    info = _RunInfo(
        model=model.name,
        model_path=str(model.path),
        model_fingerprint=model_fingerprint(model.path),
        template=settings.template,
        generation=settings.generation(task),
    )
    run_key = info.run_key
    keys = {s.id: prompt_key(s) for s in samples}
    path = out_dir / PREDICTIONS
    cached: dict[str, dict] = {}
    if settings.use_cache:
        for rec in read_jsonl(path):
            qid = rec.get("question_id")
            if (
                qid in keys
                and rec.get("run_key") == run_key
                and rec.get("prompt_key") == keys[qid]
                and rec.get("error") is None
            ):
                cached[qid] = rec
    pending = [s for s in samples if s.id not in cached]
    log.info(
        "%s / %s: %d cached predictions, %d to generate", task.name, model.name, len(cached), len(pending)
    )
    # Drop stale lines now, so the file only ever holds predictions of this run.
    _write_atomic(path, _jsonl(cached[s.id] for s in samples if s.id in cached))
    _write_atomic(out_dir / RUN_INFO, json.dumps(asdict(info), ensure_ascii=False, indent=2) + "\n")
    records = dict(cached)
    if pending:
        pipeline = get_pipeline()
        with path.open("a", encoding="utf-8") as f:

            def append(pairs: list[tuple[Sample, dict]]) -> None:
                for s, result in pairs:
                    rec = _prediction_record(s, result, run_key, keys[s.id])
                    records[s.id] = rec
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())

            generate_predictions(
                pipeline,
                pending,
                info.generation,
                settings.batch_size,
                on_batch=append,
                desc=f"{task.name} / {model.name}",
                show_progress=settings.show_progress,
            )
    # Final order = dataset order.
    _write_atomic(path, _jsonl(records[s.id] for s in samples))
    counts = {"cached_predictions": len(cached), "generated": len(pending)}
    return records, info, counts


def _saved_predictions(
    task: Task, samples: Sequence[Sample], model: ModelSpec, out_dir: Path
) -> tuple[dict, _RunInfo]:
    path = out_dir / PREDICTIONS
    if not path.exists():
        raise DataError(f"--rescore: no saved predictions at {path}; run the eval without --rescore first")
    records = {r["question_id"]: r for r in read_jsonl(path) if "question_id" in r}
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
        info = _RunInfo(**json.loads(info_path.read_text(encoding="utf-8")))
    else:
        log.warning("%s missing: the summary cannot say how these predictions were made", info_path)
        info = _RunInfo(model.name, None, None, "unknown", {}, {})
    return records, info


def _judge_settings(judge: Any) -> dict[str, Any] | None:
    if judge is None:
        return None
    from .judge import build_judge_messages

    url = re.sub(r"//[^/@]*@", "//", judge.url)  # never write credentials embedded in the URL
    return {
        "model": judge.model,
        "url": url,
        "temperature": judge.temperature,
        "seed": judge.seed,
        "max_tokens": judge.max_tokens,
        "max_retries": judge.max_retries,
        "prompt_sha": _digest(build_judge_messages("{context}", "{question}", "{reference}", "{answer}")),
    }


def run_task(
    task: Task | str,
    samples: Sequence[Sample],
    model: ModelSpec,
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
    if rescore:
        records, info = _saved_predictions(task, samples, model, out_dir)
        counts = {"cached_predictions": len(samples), "generated": 0}
    else:
        if get_pipeline is None:
            raise ConfigError("run_task needs get_pipeline to generate predictions (or rescore=True)")
        records, info, counts = _predict_task(task, samples, model, out_dir, settings, get_pipeline)
    predictions = {s.id: records[s.id]["text"] for s in samples}

    previous: dict[str, dict] = {}
    if settings.use_cache:
        previous = {r["question_id"]: r for r in read_jsonl(out_dir / EVALUATION) if "question_id" in r}
    scored = task.score(
        samples, predictions, judge=judge, previous=previous, show_progress=settings.show_progress
    )
    for rec, s in zip(scored, samples):
        rec["empty_prediction"] = not predictions[s.id].strip()
        if records[s.id].get("error"):
            rec["generation_error"] = records[s.id]["error"]
    _write_atomic(out_dir / EVALUATION, _jsonl(scored))

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
        "settings": {
            **task.settings(),
            "dataset": dataset_origin,
            "limit": settings.limit,
            "template": info.template,
            "max_new_tokens": info.generation.get("max_new_tokens"),
            "decoding": decoding_label(info.generation) if info.generation else "unknown",
            "generation": info.generation,
            "judge": _judge_settings(judge) if task.needs_judge else None,
            "packages": info.packages,
            "scoring_packages": package_versions(),
        },
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(out_dir / SUMMARY, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary


def load_pipeline(model: ModelSpec, settings: EvalSettings) -> Any:
    """The default model loader: `VLMPipeline.from_pretrained` with the run's device/dtype/template."""
    from ..infer.generation import VLMPipeline

    if model.path is None or not Path(model.path).is_dir():
        raise ConfigError(f"model dir {model.path} does not exist")
    return VLMPipeline.from_pretrained(
        model.path, device=settings.device, dtype=settings.dtype, template=settings.template
    )


def run_eval(
    models: Sequence[ModelSpec],
    tasks: Sequence[str],
    output_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    data: Mapping[str, str] | None = None,
    judge: Any = None,
    rescore: bool = False,
    pipeline_factory: Callable[[ModelSpec, EvalSettings], Any] = load_pipeline,
) -> list[dict[str, Any]]:
    """Every task on every model; returns the summaries (also written under `output_dir`).

    All datasets are loaded and checked before any model is, so a wrong path or schema fails at
    once. Each model is loaded once, and only if some prediction is not cached. `data` maps a task
    name to its local copy (else the hub id is used).
    """
    settings = settings or EvalSettings()
    data = dict(data or {})
    task_objs = [get_task(name) for name in tasks]
    unknown = set(data) - {t.name for t in task_objs} - set(tasks)
    if unknown:
        raise ConfigError(f"--data given for {sorted(unknown)}, which are not among the tasks {list(tasks)}")
    loaded = []
    for task in task_objs:
        source = data.get(task.name)
        samples = task.load(source, settings.limit)
        if not samples:
            raise DataError(f"{task.name}: the dataset has no samples")
        loaded.append((task, samples, str(source) if source else f"{task.hub_id} [{task.split}]"))

    summaries = []
    for model in models:
        pipeline: list[Any] = []

        def get_pipeline(model: ModelSpec = model, pipeline: list[Any] = pipeline) -> Any:
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
