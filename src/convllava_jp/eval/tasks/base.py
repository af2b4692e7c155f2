"""What every benchmark task shares: the `Sample` it yields, how a dataset is opened, schema checks.

A task says how to load its benchmark (a hub id on a connected machine; a local copy anywhere:
a `save_to_disk` dir, a hub-style folder of parquet files, one parquet file, or JSON / JSONL),
how to turn each row into `Sample`s (question, images, reference), which metric scores a sample
and how the per-sample scores are summarised. Nothing here imports torch: loading and checking a
dataset is cheap and happens before any model is loaded, so a wrong path fails in a second.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...data.constants import IMAGE_TOKEN
from ...data.records import (
    RecordFileError,
    is_saved_dataset,
    iter_json_array_spans,
    iter_jsonl_spans,
    load_parquet,
    load_repo,
    load_saved,
    undecoded_images,
)
from ...errors import DataError
from ..metrics import get_metric

log = logging.getLogger(__name__)

IMAGE_TAG = IMAGE_TOKEN

__all__ = ["IMAGE_TAG", "RowSource", "Sample", "Task", "image_source", "open_rows", "raw_text_field"]


@dataclass
class Sample:
    """One question to ask the model.

    `question` is the benchmark's text with any `<image>` tag removed (as llm-jp-eval-mm does);
    `images` are encoded bytes or file paths in the order the prompt refers to them; `fields` holds
    what the metric or the summary needs besides the reference (category, context, answer_type...).
    """

    id: str
    question: str
    reference: str
    images: list[Any] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn: one `<image>` line per image, then the question (the training layout)."""
        return f"{IMAGE_TAG}\n" * len(self.images) + self.question


@dataclass
class RowSource:
    """The rows of one split, with where they came from (for error messages and result files)."""

    rows: Sequence[Mapping[str, Any]] | Any  # a list of dicts or a `datasets.Dataset`
    columns: list[str]
    origin: str
    base_dir: Path | None = None  # relative image paths in JSON resolve against this
    split: str | None = None  # the split actually read; None for a single file (no splits)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.rows)


def image_source(value: Any, base_dir: Path | None, where: str) -> Any:
    """An image cell as something `load_image` takes: encoded bytes, a path, or a PIL image.

    Accepts what the formats hold: `{"bytes": ..., "path": ...}` (datasets' Image feature, undecoded;
    parquet), a path string (JSON; relative to `base_dir`), raw bytes, or a PIL image. None stays None.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{where}: image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path)
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image (from a decoding loader)
        return value
    raise DataError(f"{where}: cannot use {type(value).__name__} as an image (expected bytes, path or image)")


def required_image(value: Any, base_dir: Path | None, where: str, column: str = "image") -> Any:
    """`image_source` for a column every row must fill: DataError when the cell is empty."""
    image = image_source(value, base_dir, where)
    if image is None:
        raise DataError(f"{where}: {column!r} is empty")
    return image


def raw_text_field(raw: str, question: str) -> dict[str, str]:
    """{"input_text": raw} when the model's question differs from the dataset's text (tags removed), else {}."""
    return {"input_text": raw} if raw != question else {}


# --- opening a dataset --------------------------------------------------------------------------


def _pick_split(dd: Any, split: str, origin: str, allow_other_split: bool) -> tuple[Any, str]:
    """(rows, the split name used): `split`, or with `allow_other_split` a copy's only split."""
    if split in dd:
        return dd[split], split
    if len(dd) == 1:
        only = next(iter(dd))
        if not allow_other_split:
            raise DataError(
                f"{origin} has no split {split!r}, only {only!r}: scoring it would not be the benchmark's "
                f"{split!r} split. Save the {split!r} split, or pass --allow-other-split to score "
                f"{only!r} anyway (it is then recorded as {only!r})."
            )
        log.warning("%s has no split %r; scoring its only split %r as asked", origin, split, only)
        return dd[only], only
    raise DataError(f"{origin} has no split {split!r}; it has {sorted(dd)}. Save the {split!r} split.")


def _read_json_rows(path: Path) -> list[dict]:
    """Rows of a `.json` file (a list of objects) or a `.jsonl` file (one object a line)."""
    jsonl = path.suffix == ".jsonl"
    not_rows = f"{path}: expected a JSON list of objects (one per row) or a .jsonl file"
    rows = []
    try:
        for _, _, lineno, row in (iter_jsonl_spans if jsonl else iter_json_array_spans)(path):
            if not isinstance(row, dict):
                if jsonl:
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                raise DataError(not_rows)
            rows.append(row)
    except RecordFileError as err:  # reworded in this module's `path:line` style
        if err.kind == "json":
            raise DataError(f"{path}:{err.line}: not valid JSON ({err.json_msg})") from None
        if err.kind == "structure":
            raise DataError(not_rows) from None
        raise
    return rows


def _columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def open_rows(
    data: str | os.PathLike | None, hub_id: str | None, split: str, allow_other_split: bool = False
) -> RowSource:
    """The rows of `split`, from a local path if given, else from the hub.

    Local forms: a `save_to_disk` dir (Dataset or DatasetDict), a folder in the hub's layout
    (`data/<split>-*.parquet`), a `.parquet` file, a `.json` list of objects or a `.jsonl` file.
    Image columns come back undecoded (bytes), so memory holds the encoded files only.
    """
    import datasets

    if data is None:
        if hub_id is None:
            raise DataError("this task has no hub copy; give its local path with --data TASK=PATH")
        try:
            ds = load_repo(hub_id, split)
        except Exception as err:  # offline, gated, renamed...: say what to do instead
            raise DataError(
                f"could not load {hub_id} (split {split!r}) from the Hugging Face hub: "
                f"{type(err).__name__}: {err}. Without internet, download it elsewhere "
                f"(datasets' save_to_disk, or the repo's parquet files) and pass --data TASK=PATH."
            ) from None
        ds = undecoded_images(ds)
        return RowSource(ds, list(ds.column_names), f"{hub_id} [{split}]", split=split)

    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist")
    origin = str(path)
    used: str | None = None
    if path.is_dir():
        if is_saved_dataset(path):
            loaded = load_saved(path)
            if isinstance(loaded, datasets.DatasetDict):
                ds, used = _pick_split(loaded, split, origin, allow_other_split)
            else:
                ds = loaded
        elif any(path.rglob("*.parquet")):
            try:
                ds = load_repo(str(path), split)
            except ValueError as err:
                raise DataError(f"{path}: no {split!r} split among its parquet files ({err})") from None
            used = split
        else:
            raise DataError(
                f"{path} is neither a save_to_disk dir (dataset_dict.json / state.json) nor a folder "
                f"of parquet files; give one of those, a .parquet file or a .json/.jsonl file"
            )
        ds = undecoded_images(ds)
        where = f"{origin} [{used}]" if used else origin
        return RowSource(ds, list(ds.column_names), where, base_dir=path, split=used)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        ds = undecoded_images(load_parquet(path))
        return RowSource(ds, list(ds.column_names), origin, base_dir=path.parent)
    if suffix in (".json", ".jsonl"):
        rows = _read_json_rows(path)
        return RowSource(rows, _columns_of(rows), origin, base_dir=path.parent)
    raise DataError(f"{path}: unknown dataset format {suffix!r}; use a dir, .parquet, .json or .jsonl")


def open_hub_config(hub_id: str | None, config: str, split: str) -> RowSource:
    """One config's split from the hub (datasets' `load_dataset(hub_id, config, split=...)`)."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, gated, renamed...: say what to do instead
        raise DataError(
            f"could not load {hub_id} (config {config!r}, split {split!r}) from the Hugging Face hub: "
            f"{type(err).__name__}: {err}. Without internet, download it elsewhere and pass --data TASK=PATH."
        ) from None
    ds = undecoded_images(ds)
    return RowSource(ds, list(ds.column_names), f"{hub_id}/{config} [{split}]", split=split)


# --- the task base class ------------------------------------------------------------------------


class Task:
    """A benchmark: where its data is, which columns it needs, how rows become samples, how to score.

    Subclasses set the class attributes and implement `build_samples`; most keep the default
    `score` (the registered per-sample metric) and `aggregate` (the mean).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # as the summary table labels it
    hub_id: ClassVar[str | None] = None
    split: ClassVar[str] = "test"
    metric: ClassVar[str]  # a name in metrics.METRICS, or a task-specific scorer ("heron-judge")
    required_columns: ClassVar[tuple[str, ...]] = ()
    default_max_new_tokens: ClassVar[int] = 256  # llm-jp-eval-mm's CLI default
    primary: ClassVar[str] = "score"  # the aggregate key the summary table shows
    prompt_description: ClassVar[str] = "llm-jp-v1 chat; user turn = '<image>\\n' + question"
    needs_judge: ClassVar[bool] = False  # the primary metric needs the judge
    judge_metric: ClassVar[str | None] = None  # a judged metric beside `metric` (when a judge is given)
    schema_hint: ClassVar[str] = ""  # one line on the expected schema, for error messages
    layout: ClassVar[str] = ""  # where the data comes from and the local copy expected (--list-tasks)
    source_split: str | None = None  # set by `load`: the split actually read (None: one file)
    source_origin: str | None = None

    # --- loading ---------------------------------------------------------------------------
    def load(
        self,
        data: str | os.PathLike | None = None,
        limit: int | None = None,
        *,
        allow_other_split: bool = False,
    ) -> list[Sample]:
        """Open the dataset, check its schema and build the samples (the first `limit`, if given).

        A local copy without the task's split is refused unless `allow_other_split` (then the
        split read is recorded in `source_split`, and in summary.json).
        """
        source = self.open_source(data, allow_other_split)
        self.source_split, self.source_origin = source.split, source.origin
        self.check_columns(source)
        samples = self.build_samples(source)
        seen: set[str] = set()
        for s in samples:
            if s.id in seen:
                raise DataError(f"{source.origin}: question id {s.id!r} occurs twice; ids must be unique")
            seen.add(s.id)
        if limit is not None:
            samples = samples[:limit]
        log.info("%s: %d samples from %s", self.name, len(samples), source.origin)
        return samples

    def check_columns(self, source: RowSource) -> None:
        """Raise DataError naming each required column the source lacks."""
        missing = [c for c in self.required_columns if c not in source.columns]
        if missing:
            raise DataError(
                f"{source.origin} is not in the {self.title} schema: missing column(s) "
                f"{', '.join(repr(c) for c in missing)}; it has {source.columns}. {self.schema_hint}"
            )

    hub_config: ClassVar[str | None] = None  # the hub dataset's config (subset) name, if it has several

    def open_source(self, data: str | os.PathLike | None, allow_other_split: bool) -> RowSource:
        """The rows to build samples from: the local copy, else the hub (its `hub_config`)."""
        if data is None and self.hub_config is not None:
            return open_hub_config(self.hub_id, self.hub_config, self.split)
        return open_rows(data, self.hub_id, self.split, allow_other_split)

    def build_samples(self, source: RowSource) -> list[Sample]:
        raise NotImplementedError

    @staticmethod
    def text(value: Any, where: str, column: str) -> str:
        """A text cell as str; DataError when it is missing or not text."""
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise DataError(f"{where}: column {column!r} must be text, got {type(value).__name__}")

    # --- scoring ---------------------------------------------------------------------------
    def score(
        self,
        samples: Sequence[Sample],
        predictions: Mapping[str, str],
        *,
        judge: Any = None,
        previous: Mapping[str, dict] | None = None,
        show_progress: bool = True,
    ) -> list[dict]:
        """Per-sample score records `{"question_id", <metric>: value, ...fields}`, in sample order.

        Every sample is scored, an empty prediction included (it gets the metric's value for "").
        """
        metric = get_metric(self.metric)
        records = [
            {
                "question_id": s.id,
                self.metric: metric(predictions[s.id], s.reference, s.fields),
                **self.score_fields(s),
            }
            for s in samples
        ]
        return self.add_judged(records, samples, predictions, judge)

    def judge_question(self, sample: Sample) -> str:
        """The question the judge is shown: eval-mm's `input_text`, the dataset's text as it is
        (with any `<image>` tag, which only the model's copy loses)."""
        return sample.fields.get("input_text", sample.question)

    def add_judged(
        self, records: list[dict], samples: Sequence[Sample], predictions: Mapping[str, str], judge: Any
    ) -> list[dict]:
        """Add `judge_metric` (mean over judge runs, each run, errors) to each record, if a judge is given."""
        from ..judged import as_judge_run, llm_judge_records

        run = as_judge_run(judge)
        if self.judge_metric is None or run is None:
            return records
        items = [(s.id, self.judge_question(s), s.reference, predictions[s.id]) for s in samples]
        judged = llm_judge_records(run, items, self.judge_metric)
        for rec in records:
            rec.update(judged[rec["question_id"]])
        return records

    def score_fields(self, sample: Sample) -> dict[str, Any]:
        """Sample fields copied into evaluation.jsonl (what the summary groups by)."""
        return {}

    def aggregate(self, records: Sequence[dict]) -> dict[str, Any]:
        """Summary of the per-sample records: here the mean of the metric, as llm-jp-eval-mm does."""
        values = [float(r[self.metric]) for r in records]
        return {"score": _mean(values), "n": len(values), **self.judged_summary(records)}

    def judged_summary(self, records: Sequence[dict]) -> dict[str, Any]:
        """`judge_metric`: the mean over judge runs of each run's mean, the spread, and failures."""
        from ..judged import per_run_means, run_spread

        metric = self.judge_metric
        if metric is None or not any(f"{metric}_runs" in r for r in records):
            return {}
        runs = max(len(r.get(f"{metric}_runs") or []) for r in records)
        spread = run_spread(per_run_means(records, metric, runs))
        key = metric.replace("-", "_")
        return {
            key: spread["mean"],
            f"{key}_runs": spread,
            f"{key}_failures": sum(1 for r in records for e in r.get("judge_errors") or [] if e),
            "judge_model_versions": sorted({v for r in records for v in r.get("judge_model_versions") or []}),
        }

    def settings(self) -> dict[str, Any]:
        """What this task fixes that moves the numbers (recorded with every result)."""
        return {
            "metric": self.metric,
            "judge_metric": self.judge_metric,
            "prompt": self.prompt_description,
            "hub_id": self.hub_id,
            "split": self.split,
        }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
