"""Two CPU processes over gloo (torchrun), or one process accumulating 2 micro-batches, give the same
run as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from convllava_jp.train.recipe import load_recipe
from convllava_jp.train.stages import train_recipe

from .conftest import cli_env, losses_by_step, torchrun, write_recipe

STEPS = 6


def test_two_gloo_processes_and_accumulation_match_one_process(broken_stage1, tiny_model_dir, tmp_path):
    stage = {
        "data": [{"path": str(broken_stage1)}],  # 3 broken records, met at steps 2, 5 and 6
        "template": "plain",
        "trainable": ["stage5", "projector", "llm"],
        "max_steps": STEPS,
        "global_batch": 4,
        "per_device_batch": 4,
        "max_bad_fraction": 0.2,
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "one", tiny_model_dir, {"1": stage})

    # One process: per-device batch 4, no accumulation.
    train_recipe(load_recipe(recipe), "1")
    one = tmp_path / "one" / "stage1"

    # Two processes: the same global batch of 4 -> per-device batch 2 each.
    log_path = tmp_path / "torchrun.log"
    cmd = torchrun(2, "-m", "convllava_jp.cli", "train", "--recipe", str(recipe), "--stage", "1")
    cmd += ["--set", f"output_dir={tmp_path / 'two'}"]
    with open(log_path, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(), timeout=300)
    log_text = log_path.read_text()
    assert proc.returncode == 0, log_text[-4000:]
    two = tmp_path / "two" / "stage1"
    assert "per-device batch 2 (not 4) x 2 processes x 1 accumulation = global batch 4" in log_text

    # Rank 0 alone wrote the outputs; both runs saw the same samples and took the same steps.
    result_one = json.loads((one / "result.json").read_text())
    result_two = json.loads((two / "result.json").read_text())
    assert result_two["steps"] == result_one["steps"] == STEPS
    assert result_two["samples"] == result_one["samples"] == STEPS * 4
    # Skips made in either process are gathered: counted once, written once, by rank 0.
    assert result_two["skipped"] == result_one["skipped"] == 3
    skipped_two = [json.loads(line)["id"] for line in (two / "skipped.jsonl").read_text().splitlines()]
    skipped_one = [json.loads(line)["id"] for line in (one / "skipped.jsonl").read_text().splitlines()]
    assert sorted(skipped_two) == sorted(skipped_one) == ["broken_0", "broken_1", "broken_2"]

    losses_one, losses_two = losses_by_step(one), losses_by_step(two)
    assert sorted(losses_two) == list(range(1, STEPS + 1))
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert losses_one[STEPS] < losses_one[1]  # it trained

    w1 = load_file(str(one / "model" / "model.safetensors"))
    w2 = load_file(str(two / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float((w1[k] - w0).abs().max()) for k, w0 in _init_weights(tiny_model_dir).items() if k in w1)
    assert moved > 1e-3  # the weights did change
    assert worst < 1e-4, f"2-process weights differ from 1-process ones by up to {worst}"

    # One process, per-device batch 2 and 2 accumulation steps: the same global batch, the same run.
    accumulated = load_recipe(recipe, [f"output_dir={tmp_path / 'accum'}", "stages.1.per_device_batch=2"])
    assert accumulated.stages["1"].batch_plan(1) == (2, 2)
    (result_accum,) = train_recipe(accumulated, "1")
    accum = tmp_path / "accum" / "stage1"
    assert (result_accum.steps, result_accum.samples, result_accum.skipped) == (STEPS, STEPS * 4, 3)
    assert losses_by_step(accum) == pytest.approx(losses_one, rel=1e-4)
    wa = load_file(str(accum / "model" / "model.safetensors"))
    worst = max(float((w1[k] - wa[k]).abs().max()) for k in w1)
    assert worst < 1e-4, f"weights with accumulation differ from those without by up to {worst}"


def _init_weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))
