"""Checkpoint and model-dir publishing on disk (no training): what appears, when, and what is cleaned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convllava_jp.errors import CheckpointError, ConvLlavaError
from convllava_jp.train.checkpoints import (
    SKIP_STATE_NAME,
    TRAINER_STATE_NAME,
    checkpoint_staging,
    clean_run_dir,
    complete_checkpoints,
    model_staging,
    publish_checkpoint,
    publish_model_dir,
)
from convllava_jp.train.stages import StageResult, read_stage_result


def _stage_checkpoint(run_dir: Path, step: int) -> Path:
    """What the Trainer leaves in the staging dir of checkpoint-`step`."""
    staged = checkpoint_staging(run_dir, step) / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / TRAINER_STATE_NAME).write_text(json.dumps({"global_step": step}))
    (staged / "model.safetensors").write_bytes(b"weights %d" % step)
    return staged


def test_a_checkpoint_appears_complete_with_its_skip_counts_and_old_ones_rotate(tmp_path):
    seen = []

    def before_publish(staged: Path) -> None:
        # Complete but invisible: written in full, not yet a checkpoint anybody resumes from.
        seen.append((staged.name, sorted(p.name for p in staged.iterdir()), complete_checkpoints(tmp_path)))

    for step in (4, 8, 12):
        _stage_checkpoint(tmp_path, step)
        final = publish_checkpoint(tmp_path, step, {"counts": {"missing image": step}}, 2, before_publish)
        assert final == tmp_path / f"checkpoint-{step}"
        assert json.loads((final / SKIP_STATE_NAME).read_text()) == {"counts": {"missing image": step}}
        assert (final / "model.safetensors").read_bytes() == b"weights %d" % step
        assert not checkpoint_staging(tmp_path, step).exists()
    assert [s[0] for s in seen] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert seen[0][1] == sorted([SKIP_STATE_NAME, TRAINER_STATE_NAME, "model.safetensors"])
    assert seen[0][2] == [] and [p.name for p in seen[2][2]] == ["checkpoint-4", "checkpoint-8"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8"]


def test_clean_run_dir_removes_half_written_saves_and_on_request_old_checkpoints(tmp_path):
    _stage_checkpoint(tmp_path, 4)
    publish_checkpoint(tmp_path, 4, {"counts": {}}, None)
    _stage_checkpoint(tmp_path, 8)  # killed before publishing
    (tmp_path / ".checkpoint-8.tmp-1234abcd").mkdir()  # killed inside the publish
    clean_run_dir(tmp_path, start_over=False, stage_name="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    clean_run_dir(tmp_path, start_over=True, stage_name="1")
    assert list(tmp_path.iterdir()) == []


def test_the_model_dir_is_replaced_whole(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "old.txt").write_text("old run")
    staging = model_staging(model_dir)
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    (staging / "training_args.bin").write_bytes(b"pickle")
    publish_model_dir(model_dir, lambda tmp: (tmp / "tokenizer.json").write_text("{}"))
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_stage_result_reads_back_or_says_what_is_wrong(tmp_path):
    result = StageResult("1", "runs/stage1/model", 0.5, 3, 1.25, 12, 0, {"total": 7})
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result.__dict__))
    assert read_stage_result(path) == result
    path.write_text('{"stage": "1"')  # torn
    with pytest.raises(ConvLlavaError, match="result.json: unreadable stage result"):
        read_stage_result(path)
    path.write_text(json.dumps({"stage": "1"}))
    with pytest.raises(CheckpointError, match="not a stage result"):
        read_stage_result(path)
