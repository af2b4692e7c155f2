"""Checkpoints and resume with a real kill: a SIGKILLed training run resumes on the same curve.

Each test starts training in a subprocess (`_hold_runner.py`), holds it at a known point through a
Trainer callback or the `before_publish` hook (after an optimizer step, or with a checkpoint written
but not yet published), kills it with SIGKILL, checks what is on disk, resumes it with the CLI
(`convllava-jp train`), and compares the per-step losses, final weights and skipped-record log with
an uninterrupted run of the same recipe.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convllava_jp.model.modeling import ConvLlavaForConditionalGeneration
from convllava_jp.train.checkpoints import SKIP_STATE_NAME, complete_checkpoints
from convllava_jp.train.recipe import load_recipe
from convllava_jp.train.stages import train_recipe

from .conftest import (
    HOLD_RUNNER,
    cli_env,
    kill_tree,
    losses_by_step,
    start_held_train,
    start_train,
    torchrun,
    write_recipe,
)

MAX_STEPS = 16
SAVE_STEPS = 4
WAIT_SECONDS = 180


def _stage(data: Path) -> dict:
    return {
        "data": [{"path": str(data)}],
        "template": "plain",
        "trainable": ["stage5", "projector"],
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "save_total_limit": 2,
        "max_bad_fraction": 0.2,
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir, broken_stage1, tmp_path_factory) -> Path:
    """The uninterrupted run (in this process: same code, same thread count as the CLI)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root / "recipe.yaml", root / "runs", tiny_model_dir, {"1": _stage(broken_stage1)})
    train_recipe(load_recipe(recipe), "1")
    return root / "runs" / "stage1"


def _wait_for(path: Path, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"training exited ({proc.returncode}) before {path.name}:\n{log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {WAIT_SECONDS} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _run_to_end(recipe: Path, log_path: Path) -> None:
    proc = start_train(recipe, log_path, "--stage", "1")
    try:
        code = proc.wait(timeout=WAIT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log_path.read_text()[-3000:]


def _assert_same_run(resumed: Path, reference: Path) -> None:
    ref_losses, got_losses = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got_losses) == list(range(1, MAX_STEPS + 1))
    assert got_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    ref_w = load_file(str(reference / "model" / "model.safetensors"))
    got_w = load_file(str(resumed / "model" / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    worst = max(float((ref_w[k] - got_w[k]).abs().max()) for k in ref_w)
    assert worst < 1e-5, f"final weights differ from the uninterrupted run by up to {worst}"
    # Skipped records: counted once each, as in the uninterrupted run (not doubled by the replay).
    ref_skips = (reference / "skipped.jsonl").read_text().splitlines()
    assert len(ref_skips) == 3, "the reference run meets the 3 broken records (steps 2, 5, 6)"
    assert (resumed / "skipped.jsonl").read_text().splitlines() == ref_skips
    assert json.loads((resumed / "result.json").read_text())["skipped"] == len(ref_skips)


def test_sigkill_mid_run_then_resume_continues_the_same_loss_curve(
    reference, tiny_model_dir, broken_stage1, tmp_path
):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tmp_path / "runs", tiny_model_dir, {"1": _stage(broken_stage1)}
    )
    stage_dir = tmp_path / "runs" / "stage1"
    run_dir = stage_dir / "checkpoints"
    log_path = tmp_path / "train.log"

    proc = start_held_train(recipe, log_path, "--stage", "1", "--at-step", "6")
    try:
        _wait_for(run_dir / "HELD-6", proc, log_path)
        # Killed after step 6: checkpoint-4 is complete, steps 5-6 are lost.
        assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-4"]
        assert json.loads((run_dir / "checkpoint-4" / SKIP_STATE_NAME).read_text())["counts"] == {
            "missing image": 1
        }
        # The records skipped at steps 5 and 6 are already in skipped.jsonl; the resumed run meets
        # them again, so it must drop these lines rather than write them twice.
        assert len((stage_dir / "skipped.jsonl").read_text().splitlines()) == 3
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (stage_dir / "result.json").exists() and not (stage_dir / "model").exists()
    (run_dir / "HELD-6").unlink()

    _run_to_end(recipe, log_path)
    assert "resuming from" in log_path.read_text() and "checkpoint-4" in log_path.read_text()
    _assert_same_run(stage_dir, reference)
    # save_total_limit 2: only the two newest checkpoints stay.
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-12", "checkpoint-16"]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(
    reference, tiny_model_dir, broken_stage1, tmp_path
):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tmp_path / "runs", tiny_model_dir, {"1": _stage(broken_stage1)}
    )
    stage_dir = tmp_path / "runs" / "stage1"
    run_dir = stage_dir / "checkpoints"
    log_path = tmp_path / "train.log"

    proc = start_held_train(recipe, log_path, "--stage", "1", "--before-publish", "8")
    try:
        staging = run_dir / ".staging-8"
        _wait_for(staging / "HELD", proc, log_path)
        # checkpoint-8 is written in full but not yet renamed into place: nobody can see it.
        assert (staging / "checkpoint-8" / "model.safetensors").is_file()
        assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-4"]
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "checkpoint-8").exists()

    # The previous checkpoint loads as a model on its own...
    model = ConvLlavaForConditionalGeneration.from_pretrained(run_dir / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # ...and the run resumes from it, cleaning up the half-published save.
    _run_to_end(recipe, log_path)
    assert not staging.exists()
    _assert_same_run(stage_dir, reference)


def test_two_processes_killed_during_a_save_resume_on_the_same_curve(
    reference, tiny_model_dir, broken_stage1, tmp_path
):
    """Under torchrun (2 gloo processes): killed with checkpoint-8 staged, resumed from checkpoint-4.

    The staged checkpoint (each rank's files gathered before the publish) must stay invisible, and
    the skip counts restored from checkpoint-4 must be the ones both processes made.
    """
    stage = {**_stage(broken_stage1), "global_batch": 4}  # 2 processes x per-device batch 2
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "runs", tiny_model_dir, {"1": stage})
    stage_dir = tmp_path / "runs" / "stage1"
    run_dir = stage_dir / "checkpoints"
    log_path = tmp_path / "train.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            torchrun(2, str(HOLD_RUNNER), str(recipe), "--stage", "1", "--before-publish", "8"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
    try:
        _wait_for(run_dir / ".staging-8" / "HELD", proc, log_path)
        staged = run_dir / ".staging-8" / "checkpoint-8"
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in staged.iterdir()}
        assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-4"]
        assert json.loads((run_dir / "checkpoint-4" / SKIP_STATE_NAME).read_text())["counts"] == {
            "missing image": 1
        }
    finally:
        kill_tree(proc)  # torchrun and both workers (each in a session of its own)
    assert not (run_dir / "checkpoint-8").exists()

    with open(log_path, "ab") as out:
        cmd = torchrun(2, "-m", "convllava_jp.cli", "train", "--recipe", str(recipe), "--stage", "1")
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(), timeout=WAIT_SECONDS)
    log_text = log_path.read_text()
    assert done.returncode == 0, log_text[-3000:]
    assert "resuming from" in log_text and "checkpoint-4" in log_text
    assert losses_by_step(stage_dir) == pytest.approx(losses_by_step(reference), rel=1e-4)
    ref_skips = sorted((reference / "skipped.jsonl").read_text().splitlines())
    assert sorted((stage_dir / "skipped.jsonl").read_text().splitlines()) == ref_skips  # none twice
    assert json.loads((stage_dir / "result.json").read_text())["skipped"] == 3


def test_no_resume_starts_the_stage_over(tiny_model_dir, tiny_world, tmp_path, caplog):
    from convllava_jp import cli

    stage = {
        "data": [{"path": str(tiny_world / "stage1.json")}],
        "template": "plain",
        "trainable": ["projector"],
        "max_steps": 2,
        "save_steps": 1,
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "runs", tiny_model_dir, {"1": stage})
    stage_dir = tmp_path / "runs" / "stage1"
    assert cli.main(["train", "--recipe", str(recipe)]) == 0
    first = load_file(str(stage_dir / "model" / "model.safetensors"))
    (stage_dir / "checkpoints" / "checkpoint-2" / "marker").write_text("from the first run")
    with caplog.at_level(logging.INFO, logger="convllava_jp"):
        assert cli.main(["train", "--recipe", str(recipe)]) == 0  # finished: skipped
        assert "already finished" in caplog.text
        caplog.clear()
        assert cli.main(["train", "--recipe", str(recipe), "--no-resume"]) == 0
    assert "already finished" not in caplog.text and "resuming from" not in caplog.text
    assert "starting over; removing 2 old checkpoints" in caplog.text
    assert not (stage_dir / "checkpoints" / "checkpoint-2" / "marker").exists()  # a new checkpoint-2
    again = load_file(str(stage_dir / "model" / "model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
