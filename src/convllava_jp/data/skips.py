"""Skipped records: what a broken training record becomes, and the main-process account of them.

`ConversationDataset` turns a record it cannot use into a `SkippedRecord` (never an exception, so
one bad line does not kill a run); the collator carries them out of DataLoader workers and
`SkipTracker` writes them to ``skipped.jsonl``, logs them and stops a run that skips too many.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..io import JsonlAppender

logger = logging.getLogger(__name__)

# Skip reasons: a small fixed vocabulary, so `SkipTracker.summary()` counts kinds, not files.
MISSING_IMAGE = "missing image"
IMAGE_OUTSIDE_ROOT = "image path outside the image root"
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
        with JsonlAppender(self.path) as log_file:
            log_file.write(asdict(item) for item in skipped)
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
