"""Training data: LLaVA-format records -> (input_ids, labels, pixel_values), batches, skips, sampling.

The path of one sample::

    DataSource (JSON / JSONL / HF dataset / parquet)
      -> record index (byte offsets, built once by a scan that validates the schema)
      -> ConversationDataset[i]: parse one record, load its images, encode with the chat template,
         truncate -> sample dict, or a SkippedRecord for a broken record (never an exception)
      -> DataCollator: pad a batch, collect the SkippedRecords under "skipped"
      -> SkipTracker (main process): skipped.jsonl, warnings, stop above --max-bad-fraction

`ModalityLengthGroupedSampler` orders the records as LLaVA's ``group_by_modality_length``: image
and text-only samples never share a batch, and a batch holds samples of similar length.

Using it with the HF Trainer: pass ``remove_unused_columns=False`` (the dataset yields plain dicts)
and pop ``"skipped"`` from the batch (feed it to a `SkipTracker`) before the model's forward.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError, DataError, ImageError, TemplateError
from .processor import IGNORE_INDEX, ConvLlavaProcessor, pad_sequences
from .templates import IMAGE_TOKEN, TEMPLATE_NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "DataCollator",
    "DataSource",
    "ConversationDataset",
    "ModalityLengthGroupedSampler",
    "SkipTracker",
    "SkippedRecord",
    "japanese_fraction",
    "modality_length_grouped_indices",
]

# Skip reasons: a small fixed vocabulary, so `SkipTracker.summary()` counts kinds, not files.
MISSING_IMAGE = "missing image"
BAD_IMAGE = "bad image"
EMPTY_CONVERSATION = "empty conversation"
BAD_TURN = "bad turn"
WRONG_ROLE = "wrong role"
TAG_MISMATCH = "image tag mismatch"
TOO_LONG_IMAGE = "too long: image tokens beyond max_length"
TOO_LONG_NO_LABELS = "too long: no supervised tokens within max_length"
NO_LABELS = "no supervised tokens"
UNREADABLE_RECORD = "unreadable record"
BAD_CONVERSATION = "bad conversation"

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")
_LANGUAGE_SAMPLE = 200
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Hiragana, katakana (+ phonetic extensions, half-width), CJK ideographs (+ ext. A, compat.), 々.
_JAPANESE_CHAR = re.compile(
    r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\u3005]"
)


# --------------------------------------------------------------------------------------------------
# Sources and record indexes
# --------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """One training file or dataset in LLaVA format.

    Args:
        path: a ``.json`` file holding a JSON array, a ``.jsonl`` file (one object a line), a
            directory written by `datasets.Dataset.save_to_disk`, a ``.parquet`` file, or a hub id
            (``owner/name``, loaded with `datasets.load_dataset` where a network is available).
        image_root: the folder the records' ``image`` paths are relative to; defaults to the folder
            that holds ``path`` (set it for a hub id). Images embedded in a HF dataset
            (`datasets.Image`) need no root.
        text_field: the key of each turn that holds the text. Published Japanese sets such as
            LLaVA-Pretrain-JA keep the Japanese text beside the English ``value`` under another key;
            set this to it, or the model trains on English.
        max_samples: use only the first this many records.
        repeat: how many times the records appear per epoch (to up-weight a small set).
        split: which split of a hub id or a saved `DatasetDict` to use.
    """

    path: str | os.PathLike
    image_root: str | os.PathLike | None = None
    text_field: str = "value"
    max_samples: int | None = None
    repeat: int = 1
    split: str = "train"

    def __post_init__(self) -> None:
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 0):
            raise ConfigError(
                f"{self.path}: max_samples must be a non-negative int, got {self.max_samples!r}"
            )
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ConfigError(f"{self.path}: repeat must be an int >= 1, got {self.repeat!r}")
        if not self.text_field or not isinstance(self.text_field, str):
            raise ConfigError(f"{self.path}: text_field must be a non-empty string")

    @property
    def resolved_image_root(self) -> Path:
        if self.image_root is not None:
            return Path(self.image_root)
        return Path(self.path).parent


class _RecordIndex:
    """Random access to one source's records plus what the scan learnt about each.

    Attributes:
        name: the file / dataset, as messages call it.
        text_chars: (N,) ints, characters of `text_field` text over all turns of each record.
        image_counts: (N,) ints, images each record names.
    """

    name: str
    text_chars: np.ndarray
    image_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.text_chars)

    def record(self, i: int) -> dict:
        raise NotImplementedError

    def line(self, i: int) -> int:
        """1-based line where record ``i`` starts (the row index for a HF dataset)."""
        raise NotImplementedError


def _record_stats(record: Any, text_field: str, where: str) -> tuple[int, int, bool]:
    """Check the schema of one parsed record; return (text chars, image count, has text_field).

    Raises DataError (naming ``where``) for a record that is not an object or has no
    ``conversations`` list: that is a wrong file or wrong format, not one broken record.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object (a LLaVA record), got {type(record).__name__}; "
            "is this a LLaVA-format file?"
        )
    if "conversations" not in record and isinstance(record.get("text"), str):
        # A plain-text record ({"text": ...}): language-model data, every token supervised.
        return len(record["text"]), 0, True
    turns = record.get("conversations")
    if not isinstance(turns, list):
        got = "no 'conversations' key" if "conversations" not in record else type(turns).__name__
        raise DataError(
            f"{where}: a LLaVA record needs a 'conversations' list, got {got} "
            f"(keys: {', '.join(sorted(map(str, record))) or 'none'})"
        )
    chars = 0
    has_field = False
    for turn in turns:
        if isinstance(turn, dict):
            text = turn.get(text_field)
            if isinstance(text, str):
                chars += len(text)
                has_field = True
    image = record.get("image")
    if image is None or image == "":
        n_images = 0
    elif isinstance(image, list):
        n_images = len(image)
    else:
        n_images = 1
    return chars, n_images, has_field


class _OffsetIndex(_RecordIndex):
    """A JSON or JSONL file as byte ranges; a record is re-read and parsed on each access.

    Holds three small arrays per record (start, end, line), nothing parsed, so it pickles small
    into DataLoader workers. Reads open the file each time: no handle is shared across processes.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        starts: array,
        ends: array,
        lines: array,
        text_chars: array,
        image_counts: array,
    ) -> None:
        self.name = name
        self.path = path
        # ~26 bytes a record: 16 MB for 600k records.
        self.starts = np.array(starts, dtype=np.int64)
        self.ends = np.array(ends, dtype=np.int64)
        self.lines = np.array(lines, dtype=np.int32)
        self.text_chars = np.array(text_chars, dtype=np.int32)
        self.image_counts = np.array(image_counts, dtype=np.int16)

    def record(self, i: int) -> dict:
        start, end = int(self.starts[i]), int(self.ends[i])
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        return json.loads(data)

    def line(self, i: int) -> int:
        return int(self.lines[i])


def _scan_jsonl(path: Path, text_field: str, limit: int | None) -> tuple[_OffsetIndex, int]:
    """One pass over a JSONL file: parse and check each line, keep its byte range.

    Returns the index and how many records carry ``text_field``.
    """
    starts, ends, lines, chars, images = (array("q") for _ in range(5))
    with_field = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            size = len(raw)
            if raw.strip() and (limit is None or len(starts) < limit):
                where = f"{path}, line {lineno}"
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg}, column {exc.colno})") from None
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: not UTF-8 text ({exc.reason})") from None
                n_chars, n_images, has_field = _record_stats(record, text_field, where)
                with_field += has_field
                starts.append(offset)
                ends.append(offset + size)
                lines.append(lineno)
                chars.append(n_chars)
                images.append(n_images)
            elif limit is not None and len(starts) >= limit:
                break
            offset += size
    return _OffsetIndex(str(path), path, starts, ends, lines, chars, images), with_field


def _scan_json_array(path: Path, text_field: str, limit: int | None) -> tuple[_OffsetIndex, int]:
    """Walk a JSON array element by element with `json.JSONDecoder.raw_decode`.

    Keeps each element's byte range and starting line. The scan holds the whole file as text
    while it runs (memory about the file size, more for ASCII-heavy files); afterwards only the
    offsets stay. For very large sets prefer JSONL, which is scanned line by line.
    """
    raw = path.read_bytes()
    start_byte = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[start_byte:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, start_byte + exc.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({exc.reason})") from None
    del raw
    decoder = json.JSONDecoder()

    def fail(pos: int, message: str) -> DataError:
        return DataError(f"{path}, line {text.count(chr(10), 0, pos) + 1}: {message}")

    pos = _WHITESPACE.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        raise fail(pos, "expected a JSON array of LLaVA records ('[' ...); for one record a line use .jsonl")
    pos = _WHITESPACE.match(text, pos + 1).end()
    starts, ends, lines, chars, images = (array("q") for _ in range(5))
    with_field = 0
    # Running byte offset and line number, advanced over the text between elements.
    byte_pos, line, last = start_byte, 1, 0
    closed = pos < len(text) and text[pos] == "]"  # an empty array
    while not closed and (limit is None or len(starts) < limit):
        if pos >= len(text):
            raise fail(pos, "malformed JSON (the array is not closed with ']')")
        byte_pos += len(text[last:pos].encode("utf-8"))
        line += text.count("\n", last, pos)
        last = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})"
            ) from None
        n_chars, n_images, has_field = _record_stats(record, text_field, f"{path}, line {line}")
        with_field += has_field
        starts.append(byte_pos)
        ends.append(byte_pos + len(text[pos:end].encode("utf-8")))
        lines.append(line)
        chars.append(n_chars)
        images.append(n_images)
        pos = _WHITESPACE.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] == "]":
            closed = True
        elif pos < len(text):
            raise fail(pos, "malformed JSON (expected ',' or ']' after an array element)")
    if closed and _WHITESPACE.match(text, pos + 1).end() != len(text):
        raise fail(_WHITESPACE.match(text, pos + 1).end(), "unexpected text after the end of the JSON array")
    return _OffsetIndex(str(path), path, starts, ends, lines, chars, images), with_field


class _HFIndex(_RecordIndex):
    """A `datasets.Dataset` (Arrow, memory-mapped: already lazy). `line` is the row index."""

    def __init__(self, name: str, dataset: Any, text_field: str) -> None:
        self.name = name
        self.dataset = dataset
        self.text_chars, self.image_counts = self._scan(text_field)

    def _scan(self, text_field: str) -> tuple[np.ndarray, np.ndarray]:
        """Schema checks and per-record text/image counts, column-wise in Arrow (no Python rows)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = self.dataset.column_names
        if "conversations" not in columns:
            raise DataError(
                f"{self.name}: a LLaVA dataset needs a 'conversations' column (columns: {', '.join(columns)})"
            )
        n = len(self.dataset)
        text_chars = np.zeros(n, dtype=np.int64)
        image_counts = np.zeros(n, dtype=np.int64)
        wanted = ["conversations"] + (["image"] if "image" in columns else [])
        arrow = self.dataset.select_columns(wanted).with_format("arrow")
        row = 0
        for table in arrow.iter(batch_size=4096):
            conv = table.column("conversations").combine_chunks()
            rows = len(conv)
            if not (pa.types.is_list(conv.type) or pa.types.is_large_list(conv.type)) or not (
                pa.types.is_struct(conv.type.value_type)
            ):
                raise DataError(
                    f"{self.name}: 'conversations' must be a list of turns (objects), got {conv.type}"
                )
            if conv.null_count:
                bad = row + int(np.flatnonzero(np.asarray(conv.is_null()))[0])
                raise DataError(f"{self.name}, row {bad}: 'conversations' is missing (null)")
            fields = [conv.type.value_type.field(k).name for k in range(conv.type.value_type.num_fields)]
            if text_field not in fields:
                raise DataError(
                    f"{self.name}: the turns have no {text_field!r} field (fields: {', '.join(fields)}); "
                    "set text_field to the one holding the text"
                )
            flat = pc.list_flatten(conv)
            lengths = pc.fill_null(pc.utf8_length(pc.struct_field(flat, text_field)), 0)
            parents = np.asarray(pc.list_parent_indices(conv))
            text_chars[row : row + rows] = np.bincount(
                parents, weights=np.asarray(lengths), minlength=rows
            ).astype(np.int64)
            if "image" in wanted:
                image_counts[row : row + rows] = _arrow_image_counts(table.column("image").combine_chunks())
            row += rows
        return text_chars, image_counts

    def record(self, i: int) -> dict:
        return self.dataset[i]

    def line(self, i: int) -> int:
        return i


def _arrow_image_counts(column: Any) -> np.ndarray:
    """Images per row of an Arrow ``image`` column: path strings, lists, or `datasets.Image` structs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return np.asarray(pc.fill_null(pc.list_value_length(column), 0), dtype=np.int64)
    valid = np.asarray(column.is_valid())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        valid &= np.asarray(pc.fill_null(pc.utf8_length(column), 0)) > 0
    return valid.astype(np.int64)


def _load_hf(source: DataSource) -> Any:
    """Open a saved / parquet / hub dataset as a `datasets.Dataset` with images left undecoded."""
    import datasets

    path = Path(source.path)
    name = str(source.path)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            loaded = datasets.load_dataset(name, split=source.split)
        else:
            problem = f"unsupported file type {path.suffix!r}" if path.exists() else "no such file or dataset"
            raise DataError(
                f"{name}: {problem} (expected .json, .jsonl, .parquet, a directory written by "
                "datasets' save_to_disk, or a hub id owner/name)"
            )
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError...)
        raise DataError(f"{name}: cannot load the dataset ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise DataError(f"{name}: no split {source.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[source.split]
    # Embedded images (datasets.Image) stay encoded: decoded on access by our own load_image.
    feature = loaded.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        loaded = loaded.cast_column("image", datasets.Image(decode=False))
    elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(
        getattr(feature, "feature", None), datasets.Image
    ):
        loaded = loaded.cast_column("image", datasets.List(datasets.Image(decode=False)))
    if source.max_samples is not None and source.max_samples < len(loaded):
        loaded = loaded.select(range(source.max_samples))
    return loaded


def open_source(source: DataSource) -> _RecordIndex:
    """Index one source, failing fast (DataError with file and line) on malformed JSON or schema."""
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if suffix == ".json" and _first_char(path) != "{":
            index, with_field = _scan_json_array(path, source.text_field, source.max_samples)
        else:  # .jsonl, or a .json holding one object a line
            index, with_field = _scan_jsonl(path, source.text_field, source.max_samples)
        if len(index) and not with_field:
            record = index.record(0)
            keys = sorted({k for t in record["conversations"] if isinstance(t, dict) for k in t})
            raise DataError(
                f"{path}: no record has a {source.text_field!r} field in its turns "
                f"(line {index.line(0)} has: {', '.join(keys) or 'no turns'}); set text_field"
            )
        return index
    return _HFIndex(str(source.path), _load_hf(source), source.text_field)


def _first_char(path: Path) -> str:
    """The first non-whitespace character of a text file ('' when empty)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", errors="replace")


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedRecord:
    """A record that `ConversationDataset` could not turn into a sample.

    Attributes:
        file: the source file or dataset.
        line: 1-based line where the record starts (the row index for a HF dataset).
        id: the record's ``id``, if it has one.
        reason: one of a few kinds ("missing image", "bad image", "wrong role", ...).
        detail: what exactly was wrong (the file that failed, the role found, ...).
    """

    file: str
    line: int
    id: str | None
    reason: str
    detail: str = ""


def japanese_fraction(text: str) -> float | None:
    """Share of letters in ``text`` that are hiragana, katakana or CJK ideographs (None: no letters)."""
    letters = sum(1 for ch in text if ch.isalpha())
    if not letters:
        return None
    return len(_JAPANESE_CHAR.findall(text)) / letters


class _Skip(Exception):
    """Internal: carries a skip reason out of the nested checks of `__getitem__`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class ConversationDataset(Dataset):
    """LLaVA records -> tokenized samples, lazily, one record parsed per access.

    Args:
        sources: one or more `DataSource`s (a path is accepted for a default source).
        processor: tokenizer + image processor; `encode_conversation` builds each sample.
        template: chat template name, ``"plain"`` (stages 1-2) or ``"llm-jp-v1"`` (stage 3).
        max_length: samples are cut to this many tokens (never through image placeholders).
        min_japanese_fraction: warn when a source's sampled assistant text has a smaller share of
            Japanese letters (0 turns the check off).

    ``dataset[i]`` is ``{"input_ids": list[int], "labels": list[int], "pixel_values": list of
    (3, H, W) tensors}`` or a `SkippedRecord` for a broken record (never an exception for one).

    Raises (at construction): DataError for a missing file, malformed JSON, a record that is not a
    LLaVA record (file and line); ConfigError for an unknown template or a bad max_length.
    """

    def __init__(
        self,
        sources: DataSource | str | os.PathLike | Sequence[DataSource | str | os.PathLike],
        processor: ConvLlavaProcessor,
        template: str,
        max_length: int,
        *,
        min_japanese_fraction: float = 0.3,
    ) -> None:
        if template not in TEMPLATE_NAMES:
            raise ConfigError(f"unknown chat template {template!r}; choose from {', '.join(TEMPLATE_NAMES)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(sources, (DataSource, str, os.PathLike)):
            sources = [sources]
        self.sources = [s if isinstance(s, DataSource) else DataSource(s) for s in sources]
        if not self.sources:
            raise DataError("no data sources given")
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.image_token_id = processor.image_token_id
        self._tokens_per_image = _max_image_tokens(processor)

        self._indexes: list[_RecordIndex] = []
        for source in self.sources:
            index = open_source(source)
            if not len(index):
                logger.warning("%s: no records", index.name)
            logger.info("%s: %d records (x%d)", index.name, len(index), source.repeat)
            self._indexes.append(index)
        sizes = [len(ix) * s.repeat for ix, s in zip(self._indexes, self.sources)]
        self._ends = np.cumsum(sizes, dtype=np.int64)
        if not len(self):
            raise DataError(f"no records in {', '.join(str(s.path) for s in self.sources)}")
        if min_japanese_fraction > 0:
            for source, index in zip(self.sources, self._indexes):
                self._check_language(source, index, min_japanese_fraction)

    # --- size and lengths --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def lengths(self) -> list[int]:
        """Per-sample modality length, LLaVA's convention: > 0 with images, < 0 text-only.

        The magnitude is an estimate made in the index scan without opening any image: characters
        of text (about one token each for Japanese) + image tokens per image (the most the image
        processor can make), at least 1.
        """
        parts = []
        for source, index in zip(self.sources, self._indexes):
            text = index.text_chars.astype(np.int64)
            magnitude = np.maximum(text + index.image_counts.astype(np.int64) * self._tokens_per_image, 1)
            signed = np.where(index.image_counts > 0, magnitude, -magnitude)
            parts.append(np.tile(signed, source.repeat))
        return np.concatenate(parts).tolist()

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return k, (i - start) % len(self._indexes[k])

    # --- samples -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        k, local = self._locate(i)
        index, source = self._indexes[k], self.sources[k]
        record_id: str | None = None
        try:
            try:
                record = index.record(local)
            except Exception as exc:  # the file changed since the scan, or a disk error
                raise _Skip(UNREADABLE_RECORD, f"{type(exc).__name__}: {exc}") from exc
            if record.get("id") is not None:
                record_id = str(record["id"])
            return self._encode(record, source)
        except _Skip as skip:
            return SkippedRecord(index.name, index.line(local), record_id, skip.reason, skip.detail)

    def _encode(self, record: dict, source: DataSource) -> dict[str, Any]:
        """One record -> sample dict; raises _Skip for anything that makes the record unusable."""
        if "conversations" not in record and isinstance(record.get("text"), str):
            return self._encode_text_record(record["text"])
        turns = _turns(record.get("conversations"), source.text_field)
        images = _image_list(record.get("image"))
        n_tags = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        if images and n_tags == 0:
            # As LLaVA: a record with an image but no tag gets it in front of the first user turn.
            first_user = next(t for t in turns if t["from"] in _USER_ROLES)
            first_user["value"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["value"]
            n_tags = len(images)
        if n_tags != len(images):
            raise _Skip(TAG_MISMATCH, f"{n_tags} {IMAGE_TOKEN} tags but {len(images)} images")
        pixel_values = self._load_images(images, source)
        try:
            encoded = self.processor.encode_conversation(
                turns, pixel_values=pixel_values, template=self.template
            )
        except TemplateError as exc:
            raise _Skip(BAD_CONVERSATION, str(exc)) from exc
        input_ids, labels = encoded.input_ids, encoded.labels
        if all(label == IGNORE_INDEX for label in labels):
            raise _Skip(NO_LABELS, "no assistant reply to learn from")
        if len(input_ids) > self.max_length:
            # Keep the first max_length tokens; a cut inside or before an image's placeholders
            # would leave image features without a place, so such a sample is dropped instead.
            if self.image_token_id in input_ids[self.max_length :]:
                raise _Skip(TOO_LONG_IMAGE, f"{len(input_ids)} tokens > max_length {self.max_length}")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise _Skip(TOO_LONG_NO_LABELS, f"{len(encoded.input_ids)} tokens > {self.max_length}")
        return {"input_ids": input_ids, "labels": labels, "pixel_values": encoded.pixel_values}

    def _encode_text_record(self, text: str) -> dict[str, Any]:
        """A `{"text": ...}` record: the text + EOS, all supervised (LLM pretraining data)."""
        if not text.strip():
            raise _Skip(EMPTY_CONVERSATION, "empty text")
        tokenizer = self.processor.tokenizer
        input_ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if self.image_token_id in input_ids:
            raise _Skip(TAG_MISMATCH, f"a text record contains {IMAGE_TOKEN}")
        input_ids = input_ids[: self.max_length]
        return {"input_ids": input_ids, "labels": list(input_ids), "pixel_values": []}

    def _load_images(self, images: list[Any], source: DataSource) -> list[torch.Tensor]:
        root = source.resolved_image_root
        resolved = []
        for image in images:
            if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes", "path"}
                if image.get("bytes"):
                    resolved.append(image["bytes"])
                    continue
                image = image.get("path")
            if isinstance(image, str) and image:
                path = root / image
                if not path.is_file():
                    raise _Skip(MISSING_IMAGE, f"{path}: no such image file")
                resolved.append(str(path))
            elif image is not None and not isinstance(image, str):
                resolved.append(image)  # e.g. a PIL image from a custom dataset
            else:
                raise _Skip(MISSING_IMAGE, f"empty image entry {image!r}")
        try:
            return self.processor.preprocess_images(resolved)
        except ImageError as exc:
            raise _Skip(BAD_IMAGE, str(exc)) from exc

    # --- language check ----------------------------------------------------------------------
    def _check_language(self, source: DataSource, index: _RecordIndex, minimum: float) -> None:
        n = len(index)
        if not n:
            return
        picks = np.unique(np.linspace(0, n - 1, min(n, _LANGUAGE_SAMPLE)).astype(np.int64))
        texts: list[str] = []
        other_fields: set[str] = set()
        for j in picks:
            try:
                record = index.record(int(j))
            except Exception:  # an unreadable record is reported when it is used
                continue
            if isinstance(record.get("text"), str) and "conversations" not in record:
                texts.append(record["text"])
                continue
            turns = record.get("conversations") or []
            for turn in turns:
                if not isinstance(turn, dict):
                    continue
                if turn.get("from", turn.get("role")) in _ASSISTANT_ROLES:
                    text = turn.get(source.text_field)
                    if isinstance(text, str):
                        texts.append(text)
                other_fields.update(
                    k
                    for k, v in turn.items()
                    if isinstance(v, str) and k not in ("from", "role", source.text_field)
                )
        fraction = japanese_fraction("".join(texts))
        if fraction is not None and fraction < minimum:
            hint = (
                f" Other text fields in its turns: {', '.join(sorted(other_fields))}." if other_fields else ""
            )
            logger.warning(
                "%s: only %.0f%% of the letters in the assistant replies (text_field=%r, %d records "
                "sampled) are Japanese, below min_japanese_fraction=%.2f. If this set keeps its "
                "Japanese text under another key, set text_field.%s",
                index.name,
                100 * fraction,
                source.text_field,
                len(picks),
                minimum,
                hint,
            )


def _max_image_tokens(processor: ConvLlavaProcessor) -> int:
    """Image tokens per image for the length estimate: the most the image processor makes."""
    image_processor = processor.image_processor
    size = image_processor.image_size
    long_side = max(size) if isinstance(size, (list, tuple)) else size
    return int(image_processor.num_image_tokens(long_side, long_side))


def _turns(conversations: Any, text_field: str) -> list[dict]:
    """Validate roles and text; return fresh ``{"from", "value"}`` turns (text from text_field)."""
    if not isinstance(conversations, list) or not conversations:
        raise _Skip(EMPTY_CONVERSATION, "no turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Skip(BAD_TURN, f"turn {k} is a {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get(text_field)
        if not isinstance(text, str):
            raise _Skip(BAD_TURN, f"turn {k} has no {text_field!r} text")
        turns.append({"from": role, "value": text})
    roles = [t["from"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        raise _Skip(EMPTY_CONVERSATION, "only a system turn")
    for k, role in enumerate(body):
        expected = _USER_ROLES if k % 2 == 0 else _ASSISTANT_ROLES
        if role not in expected:
            position = k + (len(roles) - len(body))
            raise _Skip(
                WRONG_ROLE,
                f"turn {position} is from {role!r}; expected {expected[0]!r} (turns alternate human/gpt)",
            )
    replies = [t["value"] for t in turns if t["from"] in _ASSISTANT_ROLES]
    if not replies:
        raise _Skip(NO_LABELS, "no assistant reply to learn from")
    if not any(reply.strip() for reply in replies):
        raise _Skip(EMPTY_CONVERSATION, "every assistant reply is empty")
    return turns


def _image_list(image: Any) -> list[Any]:
    if image is None or (isinstance(image, str) and not image):
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


# --------------------------------------------------------------------------------------------------
# Batching and skip accounting
# --------------------------------------------------------------------------------------------------


class DataCollator:
    """Samples (and SkippedRecords) -> a padded batch.

    Returns a dict: ``input_ids`` / ``attention_mask`` (B, T) long, ``labels`` (B, T) padded with
    -100, ``pixel_values`` (a (N, 3, H, W) tensor when every image of the batch has one size, else a
    list of N (3, H, W) tensors; absent when no sample has an image), and ``skipped`` (the batch's
    SkippedRecords, so the main process can count skips made in DataLoader workers). When every
    sample was skipped, the tensors have shape (0, 0).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any] | SkippedRecord]) -> dict[str, Any]:
        skipped = [f for f in features if isinstance(f, SkippedRecord)]
        samples = [f for f in features if not isinstance(f, SkippedRecord)]
        input_ids, attention_mask = pad_sequences(
            [s["input_ids"] for s in samples], self.pad_token_id, self.padding_side
        )
        labels, _ = pad_sequences([s["labels"] for s in samples], IGNORE_INDEX, self.padding_side)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [p for s in samples for p in s.get("pixel_values", ())]
        if images:
            same = len({tuple(p.shape) for p in images}) == 1
            batch["pixel_values"] = torch.stack(images) if same else images
        batch["skipped"] = skipped
        return batch


class SkipTracker:
    """Counts skipped records in the main process, writes them down, and stops a run with too many.

    Args:
        output_dir: ``skipped.jsonl`` (file, line, id, reason, detail a line) is appended there.
        total_records: how many samples the run draws (the allowance is a fraction of it).
        max_bad_fraction: raise once more than this share of ``total_records`` was skipped
            (at least 1 record is always allowed).
    """

    log_first = 20
    log_every = 100

    def __init__(
        self, output_dir: str | os.PathLike, total_records: int, max_bad_fraction: float = 0.01
    ) -> None:
        if not 0 <= max_bad_fraction <= 1:
            raise ConfigError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction!r}")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "skipped.jsonl"
        self.total_records = int(total_records)
        self.max_bad_fraction = max_bad_fraction
        self.allowance = max(1.0, max_bad_fraction * self.total_records)
        self.counts: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def update(self, skipped: Sequence[SkippedRecord]) -> None:
        """Record a batch's skips. Raises DataError once the count is above the allowance."""
        if not skipped:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for item in skipped:
                f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
        for item in skipped:
            self.counts[item.reason] += 1
            n = self.count
            if n <= self.log_first:
                logger.warning(
                    "skipped %s, line %d (id %s): %s%s",
                    item.file,
                    item.line,
                    item.id,
                    item.reason,
                    f" ({item.detail})" if item.detail else "",
                )
                if n == self.log_first:
                    logger.warning(
                        "further skipped records go to %s only; a count is logged every %d",
                        self.path,
                        self.log_every,
                    )
            elif n % self.log_every == 0:
                logger.warning("%d records skipped so far: %s", n, dict(self.counts))
        if self.count > self.allowance:
            raise DataError(
                f"{self.count} of {self.total_records} records skipped "
                f"({100 * self.count / max(self.total_records, 1):.2f}%), above --max-bad-fraction "
                f"{self.max_bad_fraction} ({dict(self.counts)}); see {self.path}"
            )

    def summary(self) -> dict[str, int]:
        """Skips by reason."""
        return dict(self.counts)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: a resumed run goes on counting from here."""
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = Counter(state.get("counts", {}))


# --------------------------------------------------------------------------------------------------
# Modality- and length-grouped sampling
# --------------------------------------------------------------------------------------------------


def modality_length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    megabatch_mult: int = 50,
) -> list[int]:
    """An epoch's sample order in which every run of ``batch_size`` indices is one modality.

    As LLaVA's ``group_by_modality_length``: ``lengths`` > 0 are image samples, < 0 text-only.
    Each modality is shuffled, cut into megabatches of ``megabatch_mult * batch_size``, sorted by
    length inside each (so a batch holds similar lengths) and cut into batches; the batches of
    both modalities are then shuffled together. Unlike LLaVA, whose last batch mixes the
    leftovers of both modalities, a modality's last partial batch is filled up with repeats of
    that modality's samples, so no batch ever mixes: the result can be up to
    ``batch_size - 1`` indices per modality longer than ``lengths``.

    Args:
        lengths: signed modality lengths (`ConversationDataset.lengths`); none may be 0.
        batch_size: the global batch (per-device batch x world size), so a whole step is one
            modality on every device.
        seed / generator: randomness; the same seed gives the same order.
        megabatch_mult: how many batches are length-sorted together.
    """
    if batch_size < 1 or megabatch_mult < 1:
        raise ConfigError(f"batch_size and megabatch_mult must be >= 1, got {batch_size}, {megabatch_mult}")
    signed = np.asarray(lengths, dtype=np.int64)
    if (signed == 0).any():
        raise ConfigError("modality lengths must be non-zero (> 0 with images, < 0 text-only)")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    magnitude = np.abs(signed)
    batches: list[np.ndarray] = []
    for members in (np.flatnonzero(signed > 0), np.flatnonzero(signed < 0)):
        if not len(members):
            continue
        order = members[torch.randperm(len(members), generator=generator).numpy()]
        shortfall = -len(order) % batch_size
        if shortfall:
            order = np.concatenate([order, np.resize(order, shortfall)])
        megabatch = megabatch_mult * batch_size
        for start in range(0, len(order), megabatch):
            chunk = order[start : start + megabatch]
            chunk = chunk[np.argsort(-magnitude[chunk], kind="stable")]
            batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [int(i) for b in shuffled for i in batches[b]]


class ModalityLengthGroupedSampler(Sampler[int]):
    """A train sampler yielding `modality_length_grouped_indices`, reshuffled per epoch.

    Args:
        lengths: signed modality lengths (`ConversationDataset.lengths`).
        batch_size: the global batch (per-device batch x world size).
        seed: base seed; epoch ``e`` uses ``seed + e`` (call `set_epoch`, as the Trainer does).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_mult: int = 50
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.epoch = 0
        images = int((self.lengths > 0).sum())
        texts = len(self.lengths) - images
        self._len = sum(math.ceil(n / batch_size) * batch_size for n in (images, texts))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from modality_length_grouped_indices(
            self.lengths, self.batch_size, generator=generator, megabatch_mult=self.megabatch_mult
        )
