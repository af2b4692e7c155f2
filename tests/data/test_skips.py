"""Skipped records: the tracker writes them down durably, rate-limits its warnings, stops a bad run."""

from __future__ import annotations

import json
import logging

import pytest

from convllava_jp.data.skips import SkippedRecord, SkipTracker
from convllava_jp.errors import DataError

LOGGER = "convllava_jp.data.skips"


def test_skip_tracker_stops_above_max_bad_fraction(tmp_path):
    def skip(n: int) -> SkippedRecord:
        return SkippedRecord("f.jsonl", n, str(n), "missing image", "x.png")

    tracker = SkipTracker(tmp_path, total_records=100, max_bad_fraction=0.02)
    tracker.update([skip(1), skip(2)])
    with pytest.raises(
        DataError, match=r"3 of 100 records skipped \(3\.00%\).*max-bad-fraction.*skipped\.jsonl"
    ):
        tracker.update([skip(3)])
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 3  # written before raising

    # at least one record is always allowed, even when the fraction rounds to zero
    small = SkipTracker(tmp_path / "small", total_records=10, max_bad_fraction=0.01)
    small.update([skip(1)])
    with pytest.raises(DataError):
        small.update([skip(2)])


def test_skip_tracker_rate_limits_warnings_and_resumes(tmp_path, caplog):
    tracker = SkipTracker(tmp_path, total_records=1000, max_bad_fraction=1.0)
    items = [SkippedRecord("f.jsonl", n, None, "bad image" if n % 2 else "wrong role") for n in range(250)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker.update(items)
    per_record = [r for r in caplog.records if r.getMessage().startswith("skipped f.jsonl")]
    assert len(per_record) == 20
    assert sum("records skipped so far" in r.getMessage() for r in caplog.records) == 2  # at 100, 200
    assert tracker.summary() == {"wrong role": 125, "bad image": 125}
    resumed = SkipTracker(tmp_path, total_records=1000)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.count == 250


def test_skip_log_appends_after_a_torn_line(tmp_path):
    """A run killed mid-write leaves a torn last line; the next append does not glue onto it."""
    (tmp_path / "skipped.jsonl").write_text(
        '{"file": "f.jsonl", "line": 1}\n{"file": "f.js', encoding="utf-8"
    )
    tracker = SkipTracker(tmp_path, total_records=100, max_bad_fraction=1.0)
    tracker.update([SkippedRecord("f.jsonl", 2, "日本", "bad image", "x.png")])
    lines = (tmp_path / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["line"] for line in lines] == [1, 2]
    assert "日本" in lines[-1]  # Japanese ids stay readable
