"""The one batch-prediction engine: requests with stable ids in, durable JSONL answers out.

`predict_to_file` skips the ids already in the output file (a torn last line left by a killed
run is cut first), generates the rest `batch_size` at a time with a progress bar and appends each
batch (flushed and fsynced) before starting the next, so a killed run loses at most one batch and
a rerun continues where it stopped. A batch the pipeline refuses (bad image, prompt too long) is
retried one request at a time, so only the bad requests fail. `convllava-jp predict`
(`predict_file`) and the eval runner both use it.

`predict_file` reads its input split on "\n" only (U+2028 and the like stay inside a record), ids a
record by its "id" / "question_id" or else by a hash of its content (editing other lines never
shifts it), and lists every record it could not answer (malformed, bad image, too long) in
`errors_path(OUT)` instead of stopping.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ConvLlavaError, DataError
from ..io import JsonlAppender, drop_torn_tail, iter_jsonl, text_lines

log = logging.getLogger(__name__)

Requests = Sequence[tuple[str, Any]]  # (id, GenerationRequest)


class Prediction(NamedTuple):
    """The outcome of one request: its result, or the error that stopped it."""

    id: str
    result: Any = None  # GenerationResult
    error: ConvLlavaError | None = None


def done_ids(path: Path, id_key: str = "id", what: str = "predict") -> set[str]:
    """Ids already in an output file; an incomplete last line (killed run) is cut off first."""
    drop_torn_tail(path)
    if not path.exists():
        return set()
    done = set()
    for number, line in enumerate(text_lines(path.read_text(encoding="utf-8")), 1):
        if line.strip():
            try:
                done.add(str(json.loads(line)[id_key]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path}:{number}: not an output line of {what} (no {id_key}); move the file away"
                ) from None
    return done


def _generate_batch(pipeline: Any, batch: Requests, config: Any, label: str) -> list[Prediction]:
    try:
        results = pipeline.generate([r for _, r in batch], config, batch_size=len(batch))
        return [Prediction(rid, result) for (rid, _), result in zip(batch, results)]
    except ConvLlavaError as err:
        if len(batch) == 1:
            log.error("%s %s: %s", label, batch[0][0], err)
            return [Prediction(batch[0][0], None, err)]
        log.warning("a batch failed (%s); retrying its requests one at a time", err)
        return [p for one in batch for p in _generate_batch(pipeline, [one], config, label)]


def generate_in_batches(
    pipeline: Any,
    requests: Requests,
    config: Any,
    batch_size: int,
    *,
    on_batch: Callable[[list[Prediction]], None] | None = None,
    desc: str = "generate",
    unit: str = "rec",
    label: str = "record",
    show_progress: bool = True,
) -> dict[str, Prediction]:
    """Answer `requests` in order, `batch_size` at a time; `on_batch` gets each finished batch.

    A request that fails (ConvLlavaError) gets a Prediction with `error` set and is logged as
    "`label` ID: error"; the others are unaffected.
    """
    from tqdm.auto import tqdm

    out: dict[str, Prediction] = {}
    with tqdm(total=len(requests), desc=desc, unit=unit, disable=not show_progress) as bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            predictions = _generate_batch(pipeline, batch, config, label)
            out.update((p.id, p) for p in predictions)
            if on_batch is not None:
                on_batch(predictions)
            bar.update(len(batch))
    return out


def predict_to_file(
    load_pipeline: Callable[[], Any],
    requests: Requests,
    config: Any,
    batch_size: int,
    output: str | Path,
    to_row: Callable[[Prediction], dict | None],
    *,
    id_key: str = "id",
    what: str = "predict",
    desc: str = "predict",
    unit: str = "rec",
    label: str = "record",
    show_progress: bool = True,
) -> dict[str, Prediction]:
    """Generate the requests whose id is not yet in `output` and append their rows durably.

    `load_pipeline` is called (once) only when something is left to generate.
    `to_row` turns a Prediction into its output line (None: write nothing, e.g. for a failure
    that a rerun should retry). Returns the new predictions by id.
    """
    output = Path(output)
    done = done_ids(output, id_key, what)
    todo = [(rid, r) for rid, r in requests if rid not in done]
    if done:
        log.info("resuming: %d of %d records already in %s", len(requests) - len(todo), len(requests), output)
    if not todo:
        log.info("nothing to do: all %d records are in %s", len(requests), output)
        return {}
    pipeline = load_pipeline()
    with JsonlAppender(output) as out:

        def append(predictions: list[Prediction]) -> None:
            out.write(row for p in predictions if (row := to_row(p)) is not None)

        return generate_in_batches(
            pipeline,
            todo,
            config,
            batch_size,
            on_batch=append,
            desc=desc,
            unit=unit,
            label=label,
            show_progress=show_progress,
        )


# --- convllava-jp predict ------------------------------------------------------------------------


class InputRecord(NamedTuple):
    """One input line: its id, line number, the parsed value, and why it cannot be used (or None)."""

    id: str
    line: int
    record: Any
    problem: str | None = None


def errors_path(output: str | Path) -> Path:
    """Where `predict_file` lists the records of its latest run that got no answer.

    Beside the output: ``answers.jsonl`` -> ``answers.errors.jsonl``.
    """
    output = Path(output)
    return output.with_name(f"{output.stem}.errors.jsonl")


def content_id(record: Any) -> str:
    """A record's id when it has none: a hash of its content, so editing other lines never shifts it."""
    canonical = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def read_records(path: Path) -> list[InputRecord]:
    """Every JSON line of an input file with its id: "id", else "question_id", else `content_id`.

    A line that is not JSON refuses the whole file (DataError naming the line). A line that is not
    an object, has an unusable id or repeats an id is returned with its `problem` set.
    """
    records: list[InputRecord] = []
    first_line: dict[str, int] = {}
    copies: Counter[str] = Counter()  # records with the same content and no id: hash, hash~2, ...
    for number, record in iter_jsonl(path, strict=True):
        rid, problem = _record_id(record)
        if problem is None and "id" not in record and "question_id" not in record:
            copies[rid] += 1
            if copies[rid] > 1:
                rid = f"{rid}~{copies[rid]}"
        if problem is None and rid in first_line:
            problem = f"id {rid!r} appears twice (first on line {first_line[rid]}); ids must be unique"
        first_line.setdefault(rid, number)
        records.append(InputRecord(rid, number, record, problem))
    return records


def _record_id(record: Any) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        return content_id(record), f"expected a JSON object, got {type(record).__name__}"
    for key in ("id", "question_id"):
        if key in record:
            value = record[key]
            if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
                return str(value), None
            return content_id(record), f"{key!r} must be a string or an integer, got {value!r}"
    return content_id(record), None


def record_request(rid: str, record: Mapping[str, Any], root: Path) -> Any:
    """A GenerationRequest from {"image"|"images", "question"|"messages"} (DataError if malformed)."""
    from .generation import GenerationRequest, VLMPipeline

    raw_images = record.get("images", record.get("image"))
    if raw_images is None:
        raw_images = []
    elif isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list) or not all(isinstance(x, str) and x for x in raw_images):
        raise DataError(f"record {rid}: image / images must be a path or a list of paths")
    images = [p if Path(p).is_absolute() else str(root / p) for p in raw_images]
    if "messages" in record:
        from ..errors import TemplateError

        try:  # content lists: image parts become <image> tags in place (model.templates.split_content_parts)
            request = GenerationRequest(_checked_messages(rid, record["messages"]), images)
        except TemplateError as err:
            raise DataError(f"record {rid}: {err}") from None
        request.images = [
            p if not isinstance(p, str) or Path(p).is_absolute() else str(root / p) for p in request.images
        ]
        return request
    question = record.get("question", record.get("text", record.get("prompt")))
    if not isinstance(question, str):
        raise DataError(f"record {rid}: needs a 'question' string (or 'messages')")
    return GenerationRequest(VLMPipeline.question_messages(question, len(images)), images)


def _checked_messages(rid: str, messages: Any) -> list[dict]:
    """`messages` if it is a non-empty list of role/content objects the templates can read."""
    from ..errors import TemplateError
    from ..model.templates import normalize_messages

    shape = 'a non-empty list of {"role": ..., "content": ...} objects'
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"record {rid}: 'messages' must be {shape}, got {json.dumps(messages)[:80]}")
    for i, message in enumerate(messages):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, (str, list)):
            raise DataError(f"record {rid}: messages[{i}] needs a string role and a string or list content")
    try:
        normalize_messages(messages)
    except (TemplateError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"record {rid}: messages: {err}") from None
    return messages


def _answer_row(prediction: Prediction) -> dict | None:
    result = prediction.result
    if result is None:
        return None  # not written: a rerun tries it again
    return {
        "id": prediction.id,
        "answer": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }


class _ErrorLog:
    """`errors_path(OUT)`: one {"id", "line", "error"} line per failed record, appended durably.

    It describes the latest run only: a stale one is removed when the run starts.
    """

    def __init__(self, path: Path, lines: Mapping[str, int]):
        self.path, self.lines, self.count = path, lines, 0
        self._out: JsonlAppender | None = None
        path.unlink(missing_ok=True)

    def add(self, rid: str, error: object, logged: bool = False) -> None:
        if not logged:
            log.error("record %s: %s", rid, error)
        if self._out is None:
            self._out = JsonlAppender(self.path)
        self._out.write([{"id": rid, "line": self.lines.get(rid), "error": str(error)}])
        self.count += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def predict_file(
    input_path: str | Path,
    output_path: str | Path,
    load_pipeline: Callable[[], Any],
    config: Any,
    batch_size: int = 8,
    image_root: str | Path | None = None,
) -> int:
    """`convllava-jp predict`: answer every record of a JSONL file; returns how many failed.

    Failed records (malformed, missing image, too long) are logged, listed in `errors_path(OUT)`
    and not written to OUT, so a rerun retries them. The model is loaded only when something is
    left to answer.
    """
    inp, outp = Path(input_path), Path(output_path)
    root = Path(image_root) if image_root else inp.parent
    records = read_records(inp)
    done = done_ids(outp)
    errors = _ErrorLog(errors_path(outp), {r.id: r.line for r in records})
    requests = []
    try:
        for item in records:
            if item.problem is not None:
                errors.add(item.id, f"line {item.line}: {item.problem}")
            elif item.id in done:
                requests.append((item.id, None))  # skipped by predict_to_file
            else:
                try:
                    requests.append((item.id, record_request(item.id, item.record, root)))
                except DataError as err:
                    errors.add(item.id, err)

        def to_row(prediction: Prediction) -> dict | None:
            if prediction.error is not None:
                errors.add(prediction.id, prediction.error, logged=True)  # generate_in_batches did
            return _answer_row(prediction)

        predictions = predict_to_file(load_pipeline, requests, config, batch_size, outp, to_row)
    finally:
        errors.close()
    if predictions:
        log.info("wrote %d answers to %s", sum(1 for p in predictions.values() if p.error is None), outp)
    if errors.count:
        log.error("%d records failed (listed in %s); rerun to retry them", errors.count, errors.path)
    return errors.count
