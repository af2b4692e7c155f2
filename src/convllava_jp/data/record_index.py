"""Random access to one training source's records, and the schema scan that builds it.

The scan (once, at dataset construction) checks that every record is a LLaVA record (an object with
a ``conversations`` list, or a plain ``{"text": ...}``), failing fast with file and line, and keeps
per record only its byte range (JSON / JSONL) and text / image counts for the length estimate.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError


class RecordIndex:
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


def record_stats(record: Any, text_field: str, where: str) -> tuple[int, int, bool]:
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


class OffsetIndex(RecordIndex):
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

    @classmethod
    def scan(
        cls, path: Path, spans: Iterable[tuple[int, int, int, Any]], text_field: str
    ) -> tuple[OffsetIndex, int]:
        """Index the (start, end, line, record) spans of a file, checking each record's schema.

        Returns the index and how many records carry ``text_field``.
        """
        starts, ends, lines, chars, images = (array("q") for _ in range(5))
        with_field = 0
        for start, end, line, record in spans:
            n_chars, n_images, has_field = record_stats(record, text_field, f"{path}, line {line}")
            with_field += has_field
            starts.append(start)
            ends.append(end)
            lines.append(line)
            chars.append(n_chars)
            images.append(n_images)
        return cls(str(path), path, starts, ends, lines, chars, images), with_field

    def record(self, i: int) -> dict:
        start, end = int(self.starts[i]), int(self.ends[i])
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        return json.loads(data)

    def line(self, i: int) -> int:
        return int(self.lines[i])


class HFIndex(RecordIndex):
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
