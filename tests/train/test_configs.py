"""The shipped launcher configs: accelerate reads them, they name real files and real module classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from convllava_jp.model.model_dir import load_model_dir

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_every_engine_has_a_config():
    assert {p.stem for p in ACCELERATE} == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert {p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")} == {"zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_reads_the_config(path):
    config = load_config_from_file(str(path))
    expected = {
        "ddp": "MULTI_GPU",
        "fsdp": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    assert str(config.distributed_type).split(".")[-1] == expected[path.stem]
    if config.deepspeed_config:
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
        # Batch sizes, precision and clipping come from the recipe through the Trainer ("auto").
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto"
        assert "optimizer" not in ds  # the Trainer's optimizer (per-module lr, 8-bit AdamW)


def test_fsdp_wraps_classes_the_model_has(tiny_model_dir):
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    wanted = set(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    model, _ = load_model_dir(tiny_model_dir)
    present = {type(m).__name__ for m in model.modules()}
    assert wanted <= present
