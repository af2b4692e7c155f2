"""Model directories: atomic save, the replace rule, dtype on load, dirs written by earlier versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from convllava_jp.errors import CheckpointError, ConfigError
from convllava_jp.model.model_dir import load_model_dir, resolve_dtype, save_model_dir

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy_model_dir"


def test_load_model_dir_of_a_non_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model_dir(tmp_path)


def test_save_refuses_a_foreign_directory_and_a_file(tiny_model_dir, tmp_path):
    model, processor = load_model_dir(tiny_model_dir)
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not empty and not a model directory"):
        save_model_dir(model, processor, out)
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_model_dir(model, processor, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "results"]  # no temp dirs left


def test_save_replaces_a_model_dir_as_a_whole(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out)
    (out / "stale-shard.safetensors").write_text("old")
    model, processor = load_model_dir(out)
    assert save_model_dir(model, processor, out) == out
    assert not (out / "stale-shard.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded, reprocessor = load_model_dir(out)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reprocessor.image_token_id == reloaded.config.image_token_id == model.config.image_token_id


def test_save_into_an_empty_dir(tiny_model_dir, tmp_path):
    model, processor = load_model_dir(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    save_model_dir(model, processor, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_dtypes():
    assert resolve_dtype(None) is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'half-ish'"):
        resolve_dtype("half-ish")


def test_a_model_dir_of_an_earlier_version_loads_and_never_generates_the_placeholder():
    """The dir's generation_config.json predates `suppress_tokens`: loading adds the placeholder."""
    model, processor = load_model_dir(LEGACY / "model")
    image_id = model.config.image_token_id
    saved = json.loads((LEGACY / "model" / "generation_config.json").read_text())
    assert "suppress_tokens" not in saved
    assert model.generation_config.suppress_tokens == [image_id]
    expected = json.loads((LEGACY / "expected.json").read_text(encoding="utf-8"))
    enc = processor(
        text="<image>\n図形はいくつありますか？", images=[str(LEGACY / "image.png")], return_tensors="pt"
    )
    assert enc["input_ids"][0].tolist() == expected["input_ids"]
    with torch.no_grad():
        last = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits[0, -1]
    keep = [i for i in range(last.shape[0]) if i != image_id]  # the earlier forward masked that column
    assert last[keep].tolist() == pytest.approx(expected["last_logits"], abs=1e-4)
