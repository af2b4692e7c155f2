"""benchmarks/gpu_check.py: the `--small` CPU run works end to end (so the GPU day finds it working)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_small_run_prints_the_table_and_writes_json(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--small", "--json", str(out), "--clients", "4", "--gen-batch", "4"]) == 0
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["stages"]] == ["1", "2", "3"]
    for row in result["stages"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["model_tflops_per_step"] > 0
        assert row["optimizer"] == "torch AdamW"  # no CUDA: the 8-bit stages fall back, as training does
        assert row["peak_mem_gib"] is None and row["mfu"] is None  # CPU: no CUDA memory, no card peak
    assert [g["batch"] for g in result["generation"]] == [1, 4]
    assert all(g["ttft_s"] > 0 and g["decode_tok_s"] > 0 for g in result["generation"])
    assert result["server"]["clients"] == 4 and result["server"]["tok_s"] > 0
    assert [g["result"] for g in result["goals"]] == ["n/a"] * 4
    printed = capsys.readouterr().out
    assert "| stage 3 train" in printed and "stage 3 MFU >= 40%" in printed


def test_peak_table_matches_card_names(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_check.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_tflops("Some Future Card") is None


def test_model_flops_count_backward_only_where_needed(gpu_check):
    fwd = {"trunk": 1.0, "stage5": 10.0, "projector": 100.0, "llm": 1000.0}
    stage1 = {"trunk": False, "stage5": True, "projector": True, "llm": False}
    stage3 = {"trunk": False, "stage5": False, "projector": True, "llm": True}
    # stage 1: trunk forward only; stage 5 and projector 3x; the frozen LLM behind them 2x
    assert gpu_check.model_flops(fwd, stage1) == 1 + 30 + 300 + 2000
    assert gpu_check.model_flops(fwd, stage3) == 1 + 10 + 300 + 3000


def test_goals_pass_and_fail(gpu_check):
    rows = [
        {"stage": "1", "peak_mem_gib": 12.0, "mfu": 0.2},
        {"stage": "2", "peak_mem_gib": 25.5, "mfu": 0.3},
        {"stage": "3", "peak_mem_gib": 20.0, "mfu": 0.45},
    ]
    goals = gpu_check.check_goals({"stages": rows})
    assert [g["result"] for g in goals] == ["pass", "FAIL", "pass", "pass"]
    rows[2]["mfu"] = 0.39
    assert gpu_check.check_goals({"stages": rows})[-1]["result"] == "FAIL"
