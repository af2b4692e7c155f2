"""The demo's CLIP stand-in: tower pretraining on the world, projector started from its heads."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from convllava_jp.demo.vision_pretrain import init_projector_from_heads, pretrain_vision_on_world
from convllava_jp.errors import ConfigError
from convllava_jp.model.model_dir import load_model_dir


def _images(world, n=16):
    return sorted((world / "images").glob("train_*.png"))[:n]


def test_projector_starts_from_standardized_head_scores_and_centred_tokens(tiny_world, tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir)
    width = model.config.vision_hidden_size
    torch.manual_seed(0)
    heads = (nn.Linear(width, 6), nn.Linear(width, 5), nn.Linear(width, 4))
    images = _images(tiny_world)
    stats = init_projector_from_heads(model, processor, heads, images, scale=2.0)

    with torch.no_grad():
        pixels = torch.stack(processor.preprocess_images([str(p) for p in images]))
        feats = model.encode_images(pixels).flatten(0, 1)
        hidden = model.projector[0](feats)
        tokens = model.projector(feats)
        scores = torch.cat([h(feats) for h in heads], dim=-1)
    expected = (scores - scores.mean(0)) / scores.std(0) * 2.0
    torch.testing.assert_close(hidden[:, :15], expected, atol=1e-4, rtol=1e-4)
    assert hidden[:, 15:].abs().max() == 0  # the other rows start at zero
    assert tokens.mean(0).norm() < 1e-4 * tokens.norm(dim=-1).mean()  # centred over the images
    assert stats["constant_share_after"] < 1e-3 < stats["constant_share_before"]


def test_projector_init_refuses_a_projector_it_cannot_hold(tiny_world, tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir)
    width = model.config.vision_hidden_size
    too_many = (nn.Linear(width, model.projector[0].out_features + 1),)
    with pytest.raises(ConfigError, match="Linear"):
        init_projector_from_heads(model, processor, too_many, _images(tiny_world))
    with pytest.raises(ConfigError, match="at least one image"):
        init_projector_from_heads(model, processor, (nn.Linear(width, 4),), [])


def test_pretraining_changes_only_the_tower_and_the_projector(tiny_world, tiny_model_dir, tmp_path):
    work = tmp_path / "model"
    shutil.copytree(tiny_model_dir, work)
    before, _ = load_model_dir(work)
    stats = pretrain_vision_on_world(work, tiny_world, steps=3, batch_size=4, seed=0, eval_images=8)
    after, _ = load_model_dir(work)
    assert stats["steps"] == 3
    assert 0.0 <= stats["heldout_colour"] <= 1.0 and 0.0 <= stats["heldout_shape"] <= 1.0
    changed = {
        name.split(".")[0]
        for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items())
        if not torch.equal(a, b)
    }
    assert changed == {"vision_tower", "projector"}


def test_pretraining_on_fresh_scenes_learns_the_cells_colours(tiny_world, tiny_model_dir, tmp_path):
    work = tmp_path / "model"
    shutil.copytree(tiny_model_dir, work)
    stats = pretrain_vision_on_world(work, tiny_world, steps=120, batch_size=8, seed=0, eval_images=64)
    # Chance is 1/5 over the cells that hold a shape; colour is the first thing the tower learns.
    assert stats["heldout_colour"] > 0.6, stats


def test_pretraining_refuses_bad_arguments(tiny_world, tiny_model_dir):
    with pytest.raises(ConfigError, match="steps and batch_size"):
        pretrain_vision_on_world(tiny_model_dir, tiny_world, steps=0)
    for weight in (0, -1.0, float("nan"), float("inf"), "6"):
        with pytest.raises(ConfigError, match="shape_weight"):
            pretrain_vision_on_world(tiny_model_dir, tiny_world, steps=2, shape_weight=weight)


def test_pretraining_does_not_depend_on_the_global_torch_state(tiny_world, tiny_model_dir, tmp_path):
    weights = []
    for i, state in enumerate((1, 2)):
        model_dir = tmp_path / f"m{i}"
        shutil.copytree(tiny_model_dir, model_dir)
        torch.manual_seed(state)  # what ran before (other code, another process's start) differs
        pretrain_vision_on_world(model_dir, tiny_world, steps=2, batch_size=4, seed=0, eval_images=8)
        model, _ = load_model_dir(model_dir)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_scenes_with_a_minimum_of_shapes_for_pretraining():
    from convllava_jp.demo.scenes import MAX_SHAPES, draw_scenes

    plain = draw_scenes(7, 100, 40, 128)
    assert [scene for _, scene in draw_scenes(7, 100, 40, 128, min_shapes=1)] == [scene for _, scene in plain]
    counts = [len(scene["shapes"]) for _, scene in draw_scenes(7, 100, 40, 128, min_shapes=3)]
    assert min(counts) == 3 and max(counts) == MAX_SHAPES
    assert min(len(scene["shapes"]) for _, scene in plain) < 3
    for bad in (0, MAX_SHAPES + 1, 2.5):
        with pytest.raises(ConfigError, match="min_shapes"):
            draw_scenes(7, 0, 1, 128, min_shapes=bad)
