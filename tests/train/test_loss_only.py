"""`loss_only`: the LM head runs on the supervised positions only; the loss and grads are the LLM's."""

from __future__ import annotations

import pytest
import torch

from convllava_jp.model.model_dir import load_model_dir
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.stages import build_trainer

from .test_optim import _stage


def _batch(model, n_text: int = 12):
    n_image = model.config.image_tokens(64, 64)
    image = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((2, n_image), image), torch.randint(5, 60, (2, n_text), generator=g)], 1)
    labels = ids.masked_fill(ids == image, -100)
    labels[0, n_image : n_image + 4] = -100  # a prompt that is not supervised
    labels[1, -1] = -100
    return ids, labels, torch.randn(2, 3, 64, 64, generator=g)


def _rows_into_head(model) -> list[int]:
    rows: list[int] = []
    model.language_model.lm_head.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[:-1].numel())
    )
    return rows


@pytest.mark.parametrize("num_items", [None, 7])
def test_loss_and_grads_equal_the_llm_loss(tiny_model_dir, num_items):
    model, _ = load_model_dir(tiny_model_dir, dtype=torch.float32)
    model.train()
    apply_trainable(model, ["stage5", "projector"])
    ids, labels, pixels = _batch(model)
    rows = _rows_into_head(model)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for loss_only in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks in both passes
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=loss_only, **extra)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (full, full_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == fast_grads.keys() and full_grads
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fast.logits is None
    supervised = int((labels[:, 1:] != -100).sum())
    assert rows == [ids.numel(), supervised]  # the full pass ran the head on every position


def test_loss_only_with_a_cache_or_without_labels_is_the_plain_forward(tiny_model_dir):
    model, _ = load_model_dir(tiny_model_dir, dtype=torch.float32)
    ids, _, pixels = _batch(model)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, loss_only=True)
    assert out.loss is None and out.logits.shape[:2] == ids.shape


def test_the_trainer_asks_for_the_loss_only(tiny_world, tiny_model_dir, tmp_path):
    stage = _stage(tiny_world, trainable=["stage5", "projector"], max_steps=1)
    model, processor = load_model_dir(tiny_model_dir)
    apply_trainable(model, stage.trainable)
    trainer = build_trainer(stage, model, processor, tmp_path)
    seen: list[bool] = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("loss_only", False))
        return forward(*args, **kwargs)

    model.forward = spy
    trainer.train()
    assert seen and all(seen)


def test_loss_only_on_a_llama_llm(tmp_path):
    """Another LLM family (its decoder is `model`, not `transformer`): same loss as the LLM's own."""
    from convllava_jp.convert.init import init_model
    from tests.model.families import FAMILIES, build_llm_dir

    llm = build_llm_dir(FAMILIES["llm-jp-3"], tmp_path / "llm")
    torch.manual_seed(0)
    init_model("tiny", tmp_path / "model", llm=str(llm))
    model, _ = load_model_dir(tmp_path / "model", dtype=torch.float32)
    model.eval()  # no dropout: both passes see the same network
    ids, labels, pixels = _batch(model)
    full = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    fast = model(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=True).loss
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
