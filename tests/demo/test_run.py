"""The README's main job, end to end as a user runs it (reduced size): `convllava-jp demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_demo_runs_end_to_end_as_a_subprocess(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convllava_jp.cli",
            "demo",
            "--output",
            str(out),
            "--train",
            "48",
            "--test",
            "12",
            "--step-scale",
            "0.02",
            "--vision-steps",
            "3",
            "--set",
            "num_workers=0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "demo_results.json").read_text())
    assert set(result) >= {"heldout_exact_match", "chance", "n_test", "stages", "seconds"}
    assert 0.0 <= result["heldout_exact_match"] <= 1.0 and 0.0 < result["chance"] < 1.0
    assert result["n_test"] == 12
    assert [s["stage"] for s in result["stages"]] == [0, 1, 2, 3]
    assert all(isinstance(s["final_loss"], float) for s in result["stages"])
    assert "held-out exact match" in proc.stdout
    for stage in range(4):
        assert (out / "runs" / f"stage{stage}" / "loss.png").exists()

    from convllava_jp.model import ConvLlavaForConditionalGeneration

    model = ConvLlavaForConditionalGeneration.from_pretrained(out / "model")
    assert isinstance(model, torch.nn.Module)
