"""Checkpoint and model-dir publishing on disk (no training): what appears, when, and what is cleaned."""

from __future__ import annotations

import json
import os
import shutil
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
    resolve_resume,
    restore_moved_aside,
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


# --- kills at every step ---------------------------------------------------------------------------
# A child process (fork) runs a publish and dies with os._exit (no cleanup, like SIGKILL) at the
# Nth file-system call that changes or syncs something; the parent then checks what is on disk.

_FS_CALLS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync")]
_FS_CALLS += [(shutil, "rmtree")]


def _count_calls(monkeypatch: pytest.MonkeyPatch, action) -> int:
    calls = [0]
    with monkeypatch.context() as patch:
        for module, name in _FS_CALLS:
            real = getattr(module, name)

            def counted(*args, _real=real, **kwargs):
                calls[0] += 1
                return _real(*args, **kwargs)

            patch.setattr(module, name, counted)
        action()
    return calls[0]


def _run_killed_at(n: int, action) -> int:
    """Run `action` in a forked child that dies at its `n`-th file-system call; the exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        calls = [0]
        for module, name in _FS_CALLS:
            real = getattr(module, name)

            def killing(*args, _real=real, **kwargs):
                calls[0] += 1
                if calls[0] == n:
                    os._exit(137)
                return _real(*args, **kwargs)

            setattr(module, name, killing)
        try:
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _files(step: int, published: bool = True) -> dict[str, bytes]:
    """What checkpoint-`step` holds: several files, so a half-deleted one shows."""
    files = {name: b"%s of step %d" % (name.encode(), step) for name in ("model.safetensors", "optimizer.pt")}
    files |= {f"rng_state_{i}.pth": b"rng %d %d" % (i, step) for i in range(4)}
    files[TRAINER_STATE_NAME] = json.dumps({"global_step": step}).encode()
    if published:
        files[SKIP_STATE_NAME] = json.dumps({"counts": {"missing image": step}}).encode()
    return files


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _checkpoint_run(run_dir: Path, old_steps: tuple[int, ...], new_step: int) -> None:
    for step in old_steps:
        _write_files(run_dir / f"checkpoint-{step}", _files(step))
    _write_files(checkpoint_staging(run_dir, new_step) / f"checkpoint-{new_step}", _files(new_step, False))


@pytest.mark.parametrize(
    "old_steps,new_step",
    [((2, 4), 6), ((2, 4), 4)],  # a new checkpoint (the oldest rotates out), one replacing its step
    ids=["new-step", "same-step"],
)
def test_a_kill_at_any_point_of_a_checkpoint_publish_leaves_only_whole_checkpoints(
    tmp_path, monkeypatch, old_steps, new_step
):
    def publish(run_dir: Path):
        return lambda: publish_checkpoint(
            run_dir, new_step, {"counts": {"missing image": new_step}}, save_total_limit=2
        )

    dry = tmp_path / "dry"
    _checkpoint_run(dry, old_steps, new_step)
    n_calls = _count_calls(monkeypatch, publish(dry))
    assert n_calls > 5
    for n in range(1, n_calls + 1):
        run_dir = tmp_path / f"kill-{n}"
        _checkpoint_run(run_dir, old_steps, new_step)
        assert _run_killed_at(n, publish(run_dir)) == 137, n
        # Right after the kill: whatever looks complete is whole.
        for ckpt in complete_checkpoints(run_dir):
            assert _contents(ckpt) == _files(int(ckpt.name.split("-")[1])), (n, ckpt.name)
        # The next start: leftovers go, and it resumes from the newest step it had or the new one.
        clean_run_dir(run_dir, start_over=False, stage_name="1")
        assert all(not p.name.startswith(".") for p in run_dir.iterdir()), (n, sorted(run_dir.iterdir()))
        resumed = resolve_resume(run_dir, True)
        assert resumed is not None and resumed.name in (
            f"checkpoint-{max(old_steps)}",
            f"checkpoint-{new_step}",
        )
        for ckpt in complete_checkpoints(run_dir):
            assert _contents(ckpt) == _files(int(ckpt.name.split("-")[1])), (n, ckpt.name)


def test_a_kill_at_any_point_of_a_model_publish_leaves_the_old_or_the_new_model(tmp_path, monkeypatch):
    old = {"config.json": b'{"old": 1}', "model.safetensors": b"old weights", "tokenizer.json": b"old"}
    new = {"config.json": b'{"new": 1}', "model.safetensors": b"new weights"}

    def setup(root: Path) -> Path:
        _write_files(root / "model", old)
        _write_files(model_staging(root / "model"), new)
        return root / "model"

    def publish(model_dir: Path):
        return lambda: publish_model_dir(model_dir, lambda tmp: (tmp / "tokenizer.json").write_bytes(b"new"))

    n_calls = _count_calls(monkeypatch, publish(setup(tmp_path / "dry")))
    expected_new = {**new, "tokenizer.json": b"new"}
    for n in range(1, n_calls + 1):
        model_dir = setup(tmp_path / f"kill-{n}")
        assert _run_killed_at(n, publish(model_dir)) == 137, n
        restore_moved_aside(model_dir)  # what the next run does first
        assert _contents(model_dir) in (old, expected_new), n


def test_the_model_dir_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced: list[str] = []
    renamed: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        renamed.append((str(src), str(dst)))
        synced.append(f"<rename {Path(dst).name}>")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model_dir = tmp_path / "model"
    _write_files(model_staging(model_dir), {"config.json": b"{}", "model.safetensors": b"w"})
    publish_model_dir(model_dir, lambda tmp: (tmp / "tokenizer.json").write_bytes(b"t"))
    (tmp_src,) = [src for src, dst in renamed if dst == str(model_dir)]
    before = synced[: synced.index("<rename model>")]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert f"{tmp_src}/{name}" in before, name
    assert tmp_src in before  # the directory's entries too
    assert str(tmp_path) in synced[synced.index("<rename model>") :]  # and the rename itself


def test_an_unreadable_result_json_trains_the_stage_again_instead_of_failing(tmp_path):
    from convllava_jp.train.stages import _finished_result

    out_dir = tmp_path / "stage1"
    _write_files(out_dir / "model", {"config.json": b"{}"})
    (out_dir / "result.json").write_text('{"stage": "1", "model_d')  # torn by an old writer
    assert _finished_result(out_dir) is None
    result = StageResult("1", str(out_dir / "model"), 0.5, 3, 1.25, 12, 0, {"total": 7})
    (out_dir / "result.json").write_text(json.dumps(result.__dict__))
    assert _finished_result(out_dir) == result
