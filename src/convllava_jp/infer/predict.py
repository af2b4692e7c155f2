"""The one batch-prediction engine: requests with stable ids in, durable JSONL answers out.

`predict_to_file` skips the ids already in the output file (a torn last line left by a killed
run is cut first), generates the rest `batch_size` at a time with a progress bar and appends each
batch (flushed and fsynced) before starting the next, so a killed run loses at most one batch and
a rerun continues where it stopped. A batch the pipeline refuses (bad image, prompt too long) is
retried one request at a time, so only the bad requests fail. `convllava-jp predict`
(`predict_file`) and the eval runner both use it.
"""

from __future__ import annotations

import json
import logging
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


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(id, record) of each JSONL line; id from "id", "question_id", or the line number."""
    records: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for number, record in iter_jsonl(path, strict=True):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        rid = str(record.get("id", record.get("question_id", number)))
        if rid in seen:
            raise DataError(f"{path}:{number}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
        records.append((rid, record))
    return records


def record_request(rid: str, record: Mapping[str, Any], root: Path) -> Any:
    """A GenerationRequest from {"image"|"images", "question"|"messages"} (DataError if malformed)."""
    from .generation import GenerationRequest, VLMPipeline

    raw_images = record.get("images", record.get("image"))
    if raw_images is None:
        raw_images = []
    elif isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list) or not all(isinstance(x, str) for x in raw_images):
        raise DataError(f"record {rid}: image / images must be a path or a list of paths")
    images = [p if Path(p).is_absolute() else str(root / p) for p in raw_images]
    if "messages" in record:
        return GenerationRequest(record["messages"], images)
    question = record.get("question", record.get("text", record.get("prompt")))
    if not isinstance(question, str):
        raise DataError(f"record {rid}: needs a 'question' string (or 'messages')")
    return GenerationRequest(VLMPipeline.question_messages(question, len(images)), images)


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


def predict_file(
    input_path: str | Path,
    output_path: str | Path,
    load_pipeline: Callable[[], Any],
    config: Any,
    batch_size: int = 8,
    image_root: str | Path | None = None,
) -> int:
    """`convllava-jp predict`: answer every record of a JSONL file; returns how many failed.

    Failed records (malformed, missing image, too long) are logged and not written, so a rerun
    retries them. The model is loaded only when something is left to answer.
    """
    inp, outp = Path(input_path), Path(output_path)
    root = Path(image_root) if image_root else inp.parent
    requests, failed = [], 0
    records = read_records(inp)
    done = done_ids(outp)
    for rid, record in records:
        if rid in done:
            requests.append((rid, None))  # skipped by predict_to_file
            continue
        try:
            requests.append((rid, record_request(rid, record, root)))
        except DataError as err:
            log.error("record %s: %s", rid, err)
            failed += 1
    predictions = predict_to_file(load_pipeline, requests, config, batch_size, outp, _answer_row)
    failed += sum(1 for p in predictions.values() if p.error is not None)
    if predictions:
        log.info("wrote %d answers to %s", sum(1 for p in predictions.values() if p.error is None), outp)
    if failed:
        log.error("%d records failed (see above); rerun to retry them", failed)
    return failed
