"""The one record reader: JSON arrays, JSONL, parquet, `save_to_disk` dirs and hub ids.

Each format is read here once; training (`open_source`, below) and the evaluation tasks
(`eval.tasks.base.open_rows`) both use these functions. JSON and JSONL are walked record by record
keeping each record's byte range and line, so training holds offsets, not parsed records, and every
error names file and line. HF datasets come back with images left encoded (decoded later by
`load_image`, one at a time).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from ..errors import ConfigError, DataError
from .record_index import HFIndex, OffsetIndex, RecordIndex

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class RecordFileError(DataError):
    """A JSON / JSONL file that cannot be read as records, with the 1-based line where it fails.

    `kind` is "json" (a syntax error; `json_msg` holds the decoder's message), "structure" (valid
    JSON of the wrong shape) or "encoding" (not UTF-8), so a caller can word the error its own way.
    """

    def __init__(self, path: Path, line: int, problem: str, kind: str, json_msg: str | None = None) -> None:
        super().__init__(f"{path}, line {line}: {problem}")
        self.path, self.line, self.problem, self.kind, self.json_msg = path, line, problem, kind, json_msg


# --------------------------------------------------------------------------------------------------
# JSON and JSONL
# --------------------------------------------------------------------------------------------------


def iter_jsonl_spans(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, int, Any]]:
    """(start byte, end byte, line, value) of each non-blank line of a JSONL file, read line by line.

    Lines are split on b"\\n" only. Stops after `limit` records. Raises RecordFileError. Unlike
    `io.iter_jsonl` (for this project's own append-only files) it streams and keeps offsets: a
    training set may be gigabytes, and a broken line in it is an error, not a torn tail.
    """
    count = offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and count >= limit:
                break
            size = len(raw)
            if raw.strip():
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as exc:
                    problem = f"malformed JSON ({exc.msg}, column {exc.colno})"
                    raise RecordFileError(path, lineno, problem, "json", exc.msg) from None
                except UnicodeDecodeError as exc:
                    raise RecordFileError(
                        path, lineno, f"not UTF-8 text ({exc.reason})", "encoding"
                    ) from None
                yield offset, offset + size, lineno, value
                count += 1
            offset += size


def iter_json_array_spans(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, int, Any]]:
    """(start byte, end byte, line, value) of each element of a file holding one JSON array.

    Walks the array with `json.JSONDecoder.raw_decode`, holding the whole file as text while it
    runs (about the file size); for very large sets JSONL, read line by line, is lighter. A UTF-8
    BOM is allowed. Stops after `limit` elements. Raises RecordFileError.
    """
    raw = path.read_bytes()
    start_byte = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[start_byte:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, start_byte + exc.start) + 1
        raise RecordFileError(path, line, f"not UTF-8 text ({exc.reason})", "encoding") from None
    del raw
    decoder = json.JSONDecoder()

    def fail(pos: int, message: str, json_msg: str | None = None) -> RecordFileError:
        kind = "structure" if json_msg is None else "json"
        return RecordFileError(path, text.count("\n", 0, pos) + 1, message, kind, json_msg)

    pos = _WHITESPACE.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        raise fail(pos, "expected a JSON array of LLaVA records ('[' ...); for one record a line use .jsonl")
    pos = _WHITESPACE.match(text, pos + 1).end()
    count = 0
    # Running byte offset and line number, advanced over the text between elements.
    byte_pos, line, last = start_byte, 1, 0
    closed = pos < len(text) and text[pos] == "]"  # an empty array
    while not closed and (limit is None or count < limit):
        if pos >= len(text):
            raise fail(pos, "malformed JSON (the array is not closed with ']')", "array not closed")
        byte_pos += len(text[last:pos].encode("utf-8"))
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg}, column {exc.colno})"
            raise RecordFileError(path, exc.lineno, problem, "json", exc.msg) from None
        yield byte_pos, byte_pos + len(text[pos:end].encode("utf-8")), line, value
        count += 1
        pos = _WHITESPACE.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] == "]":
            closed = True
        elif pos < len(text):
            raise fail(pos, "malformed JSON (expected ',' or ']' after an array element)", "Expecting ','")
    if closed and _WHITESPACE.match(text, pos + 1).end() != len(text):
        end = _WHITESPACE.match(text, pos + 1).end()
        raise fail(end, "unexpected text after the end of the JSON array", "Extra data")


def first_char(path: Path) -> str:
    """The first non-whitespace character of a text file after any BOM ('' when empty)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", errors="replace")


# --------------------------------------------------------------------------------------------------
# HF datasets (`datasets` is imported only when one is opened)
# --------------------------------------------------------------------------------------------------


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def load_saved(path: Path) -> Any:
    """A `save_to_disk` directory: a `datasets.Dataset` or `DatasetDict`."""
    import datasets

    return datasets.load_from_disk(str(path))


def load_parquet(path: Path) -> Any:
    """One parquet file as a `datasets.Dataset`."""
    import datasets

    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def load_repo(name: str, split: str) -> Any:
    """One split of a hub id (``owner/name``) or of a local folder in the hub's layout."""
    import datasets

    return datasets.load_dataset(name, split=split)


def undecoded_images(dataset: Any) -> Any:
    """Cast every `datasets.Image` feature (also inside lists and structs) to ``decode=False``.

    Rows then hold encoded bytes / paths that our own `load_image` decodes (accepted formats only);
    datasets' decoder would open them with every Pillow plugin (an EPS runs Ghostscript).
    """
    for name, feature in dataset.features.items():
        undecoded = _undecoded_feature(feature)
        if undecoded is not feature:
            dataset = dataset.cast_column(name, undecoded)
    return dataset


def _undecoded_feature(feature: Any) -> Any:
    """``feature`` with each decoding Image inside it set to ``decode=False`` (the same object if none)."""
    import dataclasses

    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False) if feature.decode else feature
    if isinstance(feature, dict):
        inner = {key: _undecoded_feature(value) for key, value in feature.items()}
        changed = any(inner[key] is not feature[key] for key in feature)
        return type(feature)(inner) if changed else feature
    if isinstance(feature, (list, tuple)) and len(feature) == 1:
        inner = _undecoded_feature(feature[0])
        return type(feature)([inner]) if inner is not feature[0] else feature
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List, LargeList, Sequence
        inner = _undecoded_feature(feature.feature)
        return dataclasses.replace(feature, feature=inner) if inner is not feature.feature else feature
    return feature


# --------------------------------------------------------------------------------------------------
# Training sources
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
        allow_outside_root: accept record image paths that are absolute or contain ``..`` (both
            can name any file on the machine: a downloaded dataset should not). Off by default:
            such records are skipped ("image path outside the image root"). Symlinks under the
            root are followed (they are the machine owner's layout, not the record author's).
    """

    path: str | os.PathLike
    image_root: str | os.PathLike | None = None
    text_field: str = "value"
    max_samples: int | None = None
    repeat: int = 1
    split: str = "train"
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 0):
            raise ConfigError(
                f"{self.path}: max_samples must be a non-negative int, got {self.max_samples!r}"
            )
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ConfigError(f"{self.path}: repeat must be an int >= 1, got {self.repeat!r}")
        if not self.text_field or not isinstance(self.text_field, str):
            raise ConfigError(f"{self.path}: text_field must be a non-empty string")
        if not isinstance(self.allow_outside_root, bool):
            raise ConfigError(f"{self.path}: allow_outside_root must be true or false")

    @property
    def resolved_image_root(self) -> Path:
        if self.image_root is not None:
            return Path(self.image_root)
        return Path(self.path).parent

    def image_path(self, name: str) -> Path:
        """A record's image path under the image root; DataError if it could leave the root.

        Decided on the text of the path, before touching the file system: absolute paths and any
        ``..`` component are refused (``a/..`` is not ``.`` when ``a`` is a symlink), unless
        ``allow_outside_root``. Symlinks inside the root are followed.
        """
        path = PurePath(name)
        if not self.allow_outside_root and (path.is_absolute() or path.anchor or ".." in path.parts):
            raise DataError(
                f"{name}: image path outside the image root {self.resolved_image_root} (absolute or "
                "with '..'); set allow_outside_root: true on this data source if you trust it"
            )
        return self.resolved_image_root / path


def open_source(source: DataSource) -> RecordIndex:
    """Index one source, failing fast (DataError with file and line) on malformed JSON or schema."""
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if suffix == ".json" and first_char(path) != "{":
            spans = iter_json_array_spans(path, source.max_samples)
        else:  # .jsonl, or a .json holding one object a line
            spans = iter_jsonl_spans(path, source.max_samples)
        index, with_field = OffsetIndex.scan(path, spans, source.text_field)
        if len(index) and not with_field:
            record = index.record(0)
            keys = sorted({k for t in record["conversations"] if isinstance(t, dict) for k in t})
            raise DataError(
                f"{path}: no record has a {source.text_field!r} field in its turns "
                f"(line {index.line(0)} has: {', '.join(keys) or 'no turns'}); set text_field"
            )
        return index
    return HFIndex(str(source.path), _load_hf(source), source.text_field)


def _load_hf(source: DataSource) -> Any:
    """Open a saved / parquet / hub dataset as a `datasets.Dataset` with images left undecoded."""
    import datasets

    path = Path(source.path)
    name = str(source.path)
    try:
        if path.is_dir():
            loaded = load_saved(path)
        elif path.suffix == ".parquet":
            loaded = load_parquet(path)
        elif not path.exists() and _HUB_ID.fullmatch(name):
            loaded = load_repo(name, source.split)
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
    loaded = undecoded_images(loaded)  # decoded on access by our own load_image
    if source.max_samples is not None and source.max_samples < len(loaded):
        loaded = loaded.select(range(source.max_samples))
    return loaded
