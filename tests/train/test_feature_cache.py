"""A frozen vision tower's features are cached once per stage and training is unchanged by it."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from convllava_jp.data.cached_images import CachedImage
from convllava_jp.data.collate import DataCollator
from convllava_jp.data.dataset import ConversationDataset
from convllava_jp.errors import ConfigError
from convllava_jp.model.model_dir import load_model_dir
from convllava_jp.train import threads
from convllava_jp.train.feature_cache import build_feature_cache, cache_refusal, maybe_cache_features
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.recipe import StageConfig, load_recipe
from convllava_jp.train.stages import train_recipe

from .conftest import write_recipe


def _stage3(world, mode, **extra) -> dict:
    return {
        "3": {
            "data": [{"path": str(world / "stage3.json")}],
            "template": "llm-jp-v1",
            "trainable": ["projector", "llm"],
            "max_steps": 4,
            "cache_image_features": mode,
            **extra,
        }
    }


def _train(tmp_path, name, world, model_dir, mode, **extra):
    recipe = write_recipe(
        tmp_path / f"{name}.yaml", tmp_path / name, model_dir, _stage3(world, mode, **extra)
    )
    (result,) = train_recipe(load_recipe(recipe), "all")
    return result, load_file(str(tmp_path / name / "stage3" / "model" / "model.safetensors"))


def test_cached_stage_trains_as_the_uncached_one(tiny_world, tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="convllava_jp.train.feature_cache")
    plain, plain_weights = _train(tmp_path, "plain", tiny_world, tiny_model_dir, False)
    assert "cached" not in caplog.text
    cached, cached_weights = _train(tmp_path, "cached", tiny_world, tiny_model_dir, "auto")
    assert "features of 64 images cached" in caplog.text
    assert cached.final_loss == pytest.approx(plain.final_loss, rel=1e-4)
    assert plain_weights.keys() == cached_weights.keys()
    for key in plain_weights:
        torch.testing.assert_close(cached_weights[key], plain_weights[key], atol=1e-5, rtol=1e-4)
    moved = [k for k in plain_weights if k.startswith("language_model.")]
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(plain_weights[k], init[k]) for k in moved)  # it did train


def test_no_cache_when_the_tower_trains(tiny_world, tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="convllava_jp.train.feature_cache")
    _train(tmp_path, "s5", tiny_world, tiny_model_dir, True, trainable=["stage5", "projector"])
    assert "not caching image features: the vision tower trains in this stage" in caplog.text
    assert "images cached" not in caplog.text


def test_cache_refused_when_the_tower_computes_differently_in_training(tiny_model_dir):
    model, _ = load_model_dir(tiny_model_dir, dtype=torch.float32)
    apply_trainable(model, ["llm"])
    assert cache_refusal(model) is None
    model.vision_tower.encoder.stages[-1].layers[0].drop_path = torch.nn.Dropout(0.1)
    assert "differently in train mode" in cache_refusal(model)
    model.vision_tower.encoder.stages[-1].layers[0].drop_path = torch.nn.BatchNorm2d(8).requires_grad_(False)
    assert "differently in train mode" in cache_refusal(model)


def test_auto_mode_leaves_large_caches_out(tiny_world, tiny_model_dir, monkeypatch, caplog):
    from convllava_jp.train import feature_cache

    model, processor = load_model_dir(tiny_model_dir, dtype=torch.float32)
    apply_trainable(model, ["llm"])
    dataset = ConversationDataset(tiny_world / "stage3.json", processor, "llm-jp-v1", 96)
    monkeypatch.setattr(feature_cache, "AUTO_LIMIT_BYTES", 1000)
    caplog.set_level(logging.INFO, logger="convllava_jp.train.feature_cache")
    assert maybe_cache_features("auto", model, processor, dataset, "3") is None
    assert "auto limit" in caplog.text and dataset.image_cache is None
    cache = maybe_cache_features(True, model, processor, dataset, "3")
    assert cache is not None and len(cache) == 64 and dataset.image_cache is cache.files


def test_dataset_hands_out_cached_images_and_swap_in_restores_the_features(tiny_world, tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir, dtype=torch.float32)
    apply_trainable(model, ["llm"])
    dataset = ConversationDataset(tiny_world / "stage3.json", processor, "llm-jp-v1", 96)
    plain = [dataset[i] for i in range(6)]
    files = dataset.image_files()
    assert len(files) == 64 and len(set(files)) == 64
    cache = build_feature_cache(model, processor, files[:40])  # some images stay uncached
    dataset.image_cache = cache.files
    samples = [dataset[i] for i in range(6)]
    for before, after in zip(plain, samples):
        assert before["input_ids"] == after["input_ids"] and before["labels"] == after["labels"]
    assert any(isinstance(s["pixel_values"][0], CachedImage) for s in samples)

    batch = DataCollator(processor.tokenizer.pad_token_id)(samples)
    swapped = cache.swap_in(batch, model)
    assert "pixel_values" not in swapped
    expected = DataCollator(processor.tokenizer.pad_token_id)(plain)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            swapped["vision_features"], model.encode_images(expected), atol=1e-5, rtol=1e-4
        )
        model.eval()
        with_pixels = model(**{k: v for k, v in batch.items() if k != "skipped"} | {"pixel_values": expected})
        with_features = model(**{k: v for k, v in swapped.items() if k != "skipped"})
    torch.testing.assert_close(with_features.loss, with_pixels.loss, atol=1e-5, rtol=1e-4)


def test_cached_samples_are_encoded_once(tiny_world, tiny_model_dir, monkeypatch):
    model, processor = load_model_dir(tiny_model_dir, dtype=torch.float32)
    apply_trainable(model, ["llm"])
    dataset = ConversationDataset(tiny_world / "stage3.json", processor, "llm-jp-v1", 96)
    dataset.image_cache = build_feature_cache(model, processor, dataset.image_files()).files
    first = dataset[3]
    calls = []
    encode = dataset._encode
    monkeypatch.setattr(dataset, "_encode", lambda *a: calls.append(a) or encode(*a))
    assert dataset[3] == first and not calls
    dataset[4]
    assert len(calls) == 1


def test_model_refuses_pixels_and_features_together(tiny_model_dir):
    model, _ = load_model_dir(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[model.config.image_token_id] * 4 + [5]])
    pixels = torch.zeros(1, 3, 128, 128)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, pixel_values=pixels, vision_features=model.encode_images(pixels))


@pytest.mark.parametrize(
    "value, expected", [("auto", "auto"), ("true", True), ("False", False), (True, True)]
)
def test_cache_mode_values(tiny_world, value, expected):
    stage = StageConfig("3", [{"path": str(tiny_world / "stage3.json")}], cache_image_features=value)
    assert stage.cache_image_features == expected


@pytest.mark.parametrize("value", ["yes", 1, None, "on"])
def test_cache_mode_refuses_other_values(tiny_world, value):
    with pytest.raises(ConfigError, match="cache_image_features must be auto, true or false"):
        StageConfig("3", [{"path": str(tiny_world / "stage3.json")}], cache_image_features=value)


def test_stage_cpu_threads_apply_on_cpu_only():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.stage_cpu_threads(1, torch.device("cpu")) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.stage_cpu_threads(None, torch.device("cpu")) as n:
            assert n == 2 and torch.get_num_threads() == 2
        with threads.stage_cpu_threads(1, torch.device("cuda")) as n:
            assert n == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [0, -2])
def test_cpu_threads_must_be_positive(tiny_world, value):
    with pytest.raises(ConfigError, match="cpu_threads must be >= 1"):
        StageConfig("3", [{"path": str(tiny_world / "stage3.json")}], cpu_threads=value)
