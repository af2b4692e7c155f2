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
    assert "held-out exact match" in proc.stdout and "question only" in proc.stdout
    blind = result["question_only"]
    assert 0.0 <= blind["exact_match"] <= 1.0 and set(blind["per_type"]) == set(result["per_type"])
    for stage in range(4):
        assert (out / "runs" / f"stage{stage}" / "loss.png").exists()

    from convllava_jp.model import ConvLlavaForConditionalGeneration

    model = ConvLlavaForConditionalGeneration.from_pretrained(out / "model")
    assert isinstance(model, torch.nn.Module)


def test_question_only_baseline_answers_each_question_with_its_most_frequent_training_answer(tmp_path):
    from convllava_jp.demo.evaluate import question_only_baseline

    def turns(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    stage3 = [
        {"conversations": turns("<image>\n赤い円はありますか？", "赤い円があります。")},
        {"conversations": turns("<image>\n赤い円はありますか？", "赤い円があります。")},
        {"conversations": turns("<image>\n赤い円はありますか？", "赤い図形はありません。")},
        # a later turn counts too
        {
            "conversations": turns("<image>\n画像を説明してください。", "画像には…")
            + turns("図形はいくつありますか？", "2つです。")
        },
    ]
    test = [
        {
            "conversations": turns("<image>\n赤い円はありますか？", "赤い円があります。"),
            "answer": "赤い円があります。",
            "qtype": "yes_no",
            "chance": 0.5,
        },
        {
            "conversations": turns("<image>\n赤い円はありますか？", "赤い図形はありません。"),
            "answer": "赤い図形はありません。",
            "qtype": "yes_no",
            "chance": 0.5,
        },
        {
            "conversations": turns("<image>\n図形はいくつありますか？", "3つです。"),
            "answer": "3つです。",
            "qtype": "count",
            "chance": 0.25,
        },
        {
            "conversations": turns("<image>\n青い星はありますか？", "青い星があります。"),
            "answer": "青い星があります。",
            "qtype": "yes_no",
            "chance": 0.5,
        },
    ]
    (tmp_path / "stage3.json").write_text(json.dumps(stage3, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "test.json").write_text(json.dumps(test, ensure_ascii=False), encoding="utf-8")
    scores = question_only_baseline(tmp_path)
    assert scores["per_type"]["yes_no"]["exact_match"] == 1 / 3  # majority right once; unseen question wrong
    assert scores["per_type"]["count"]["exact_match"] == 0.0
    assert scores["exact_match"] == 0.25


def test_demo_init_weights_depend_on_the_seed_only(tiny_world, tmp_path):
    from convllava_jp.demo.run import seeded_init
    from convllava_jp.model.model_dir import load_model_dir
    from convllava_jp.train.recipe import load_recipe

    def init(name: str, seed: int, state: int) -> dict:
        recipe = load_recipe(
            "tiny-synthetic", [f"vars.data_dir={tiny_world}", f"output_dir={tmp_path / name}"]
        )
        torch.manual_seed(state)  # the global generator's state before the demo starts
        model, _ = load_model_dir(seeded_init(recipe, seed))
        return model.state_dict()

    a, b, c = init("a", 0, 1), init("b", 0, 2), init("c", 1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
