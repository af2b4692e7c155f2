"""Optimizers: the 8-bit AdamW fallback, per-module learning rates, no state for frozen modules."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback

from convllava_jp.errors import ConfigError
from convllava_jp.model.model_dir import load_model_dir
from convllava_jp.train.arguments import _optimizer_name
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.recipe import StageConfig
from convllava_jp.train.stages import build_trainer

from .conftest import TEST_DEFAULTS


def _stage(tiny_world, **kw) -> StageConfig:
    body = {**TEST_DEFAULTS, "max_steps": 1}
    body.update(kw)
    return StageConfig(name="s", data=[{"path": str(tiny_world / "stage1.json")}], template="plain", **body)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def test_adamw_8bit_falls_back_to_torch_adamw_with_a_notice(tiny_world, caplog):
    stage = _stage(tiny_world, optimizer="adamw_8bit")
    if torch.cuda.is_available() and _has_bitsandbytes():
        assert _optimizer_name(stage) == "adamw_bnb_8bit"
        return
    with caplog.at_level(logging.WARNING, logger="convllava_jp.train.arguments"):
        assert _optimizer_name(stage) == "adamw_torch_fused"
    assert "8-bit AdamW needs bitsandbytes and a CUDA GPU; using torch AdamW" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convllava_jp.train.arguments"):
        assert _optimizer_name(_stage(tiny_world, optimizer="adamw")) == "adamw_torch_fused"
    assert "8-bit" not in caplog.text  # plain AdamW asks for nothing, so nothing to say


def test_lr_multipliers_give_each_part_its_learning_rate(tiny_world, tiny_model_dir, tmp_path):
    stage = _stage(tiny_world, lr=1e-3, lr_multipliers={"vision": 0.1, "projector": 2.0})
    model, processor = load_model_dir(tiny_model_dir)
    apply_trainable(model, ["vision", "projector", "llm"])
    trainer = build_trainer(stage, model, processor, tmp_path)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = {"vision_tower": 1e-4, "projector": 2e-3, "language_model": 1e-3}[name.split(".")[0]]
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_multipliers_name_known_parts_only(tiny_world):
    with pytest.raises(ConfigError, match="unknown part 'stage5'"):
        _stage(tiny_world, lr_multipliers={"stage5": 0.1})
    with pytest.raises(ConfigError, match=">= 0"):
        _stage(tiny_world, lr_multipliers={"vision": -1})


def test_frozen_modules_hold_no_gradients_and_no_optimizer_state(tiny_world, tiny_model_dir, tmp_path):
    """Stage 1 trains stage 5 + projector: after a real step nothing else has grads or Adam state."""
    stage = _stage(tiny_world, trainable=["stage5", "projector"], max_steps=2)
    model, processor = load_model_dir(tiny_model_dir)
    apply_trainable(model, stage.trainable)
    trainer = build_trainer(stage, model, processor, tmp_path)

    grads_seen: dict[str, bool] = {}

    class GradProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for name, p in model.named_parameters():
                grads_seen[name] = grads_seen.get(name, False) or p.grad is not None

    trainer.add_callback(GradProbe())
    trainer.train()

    trunk = model.config.trunk_stages
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("projector.") or n.startswith(f"vision_tower.encoder.stages.{trunk}.") for n in trainable
    )
    frozen = {n for n, _ in model.named_parameters()} - trainable
    assert any(n.startswith("language_model.") for n in frozen)
    assert any(n.startswith("vision_tower.encoder.stages.0.") for n in frozen)
    # Gradients right before the optimizer step: every trainable tensor has one, no frozen one does.
    assert all(grads_seen[n] for n in trainable)
    assert not any(grads_seen[n] for n in frozen)
    # Adam state (exp_avg, exp_avg_sq) exists for the trainable tensors only.
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    by_id = {id(p): n for n, p in model.named_parameters()}
    with_state = {by_id[id(p)] for p, s in optimizer.state.items() if s}
    assert with_state == trainable
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
