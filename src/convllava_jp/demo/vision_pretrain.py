"""Pretrain the tiny vision tower on the synthetic world: the demo's stand-in for CLIP.

In the article the ConvNeXt arrives CLIP-pretrained before stage 1; the demo's tiny ConvNeXt
starts random, and a random tower's image tokens carry the shapes only weakly. This supervised
pass gives the tower what pretraining gives the real one: tokens that already separate what is in
each grid cell. Each of the 2x2 stage-5 tokens predicts the colour and shape in its cell (or
"none") and which cell it is, through linear heads, on scenes drawn fresh every step
(`scenes.draw_scenes`) so the tower cannot memorise images. The shape's loss weighs 6x the
others': the colours and the cells are learned within a few hundred steps, the shapes are what
takes the time (weighted so, 1300 steps do what 2200 unweighted ones did). The pass ends by
starting the projector from the heads (`init_projector_from_heads`), so the LLM first sees clean,
centred tokens. docs/training.md has the measurements behind these choices.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from .scenes import COLOURS, POSITIONS, SHAPES, draw_scenes
from .world import load_world_info

log = logging.getLogger(__name__)


def _cell_labels(scene: dict) -> tuple[list[int], list[int]]:
    """Per grid cell (row-major): colour index and shape index, 0 = empty cell."""
    colours = [c.name for c in COLOURS]
    colour = [0] * len(POSITIONS)
    shape = [0] * len(POSITIONS)
    for s in scene["shapes"]:
        cell = POSITIONS.index(s["position"])
        colour[cell] = 1 + colours.index(s["colour"])
        shape[cell] = 1 + SHAPES.index(s["shape"])
    return colour, shape


def _heads(width: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Linear heads on one image token: its cell's colour, its cell's shape (0 = none), its cell."""
    colour_head = nn.Linear(width, len(COLOURS) + 1)
    shape_head = nn.Linear(width, len(SHAPES) + 1)
    # Also which cell a token is: the LLM's position embeddings are faint beside the image
    # tokens, so a token has to say itself where it is for words like 左上 to bind to it.
    cell_head = nn.Linear(width, len(POSITIONS))
    return colour_head, shape_head, cell_head


def pretrain_vision_on_world(
    model_dir: str | Path,
    world_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    eval_images: int = 256,
    min_shapes: int = 1,
    shape_weight: float = 6.0,
) -> dict:
    """Train `model_dir`'s vision tower in place on fresh scenes of the world; returns accuracies.

    Every step draws `batch_size` new scenes (`draw_scenes`, a stream apart from the world's
    training and test images), so the tower learns the shapes rather than memorising images.
    The returned "heldout_*" accuracies are measured on `eval_images` further unseen scenes,
    over the grid cells that hold a shape. `min_shapes` > 1 trains on scenes with at least that
    many shapes (more labelled cells per step; the held-out scenes are drawn as the world's).
    `shape_weight` multiplies the shape head's loss against the colour and cell heads' (1 each).
    """
    from ..model.model_dir import load_model_dir, save_model_dir

    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be integers >= 1, got {steps!r}, {batch_size!r}")
    if not (isinstance(shape_weight, (int, float)) and math.isfinite(shape_weight) and shape_weight > 0):
        raise ConfigError(f"shape_weight must be a finite number > 0, got {shape_weight!r}")
    world = load_world_info(world_dir)
    model, processor = load_model_dir(model_dir, dtype=torch.float32)
    if model.config.image_tokens(128, 128) != len(POSITIONS) or processor.image_processor.mode != "pad":
        raise ConfigError(
            "vision pretraining on the world needs one image token per grid cell: a 2x2 token grid "
            "(128 px, stride 64) and 'pad' preprocessing"
        )
    torch.manual_seed(seed)  # before the heads: their init must not depend on earlier draws
    heads = _heads(model.config.vision_hidden_size)
    # Scene indices: [0, eval_images) are held out for the accuracy, training draws after them.
    stream_seed = world.seed * 1000 + seed

    def tensors(drawn: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.stack(processor.preprocess_images([image for image, _ in drawn]))
        labels = [_cell_labels(scene) for _, scene in drawn]
        return pixels, torch.tensor([c for c, _ in labels]), torch.tensor([s for _, s in labels])

    def batches():
        for step in range(steps):
            start = eval_images + step * batch_size
            yield tensors(draw_scenes(stream_seed, start, batch_size, world.image_size, min_shapes))

    loss = _train_tower(model, heads, batches(), steps, lr, shape_weight)
    model.eval()
    # The held-out scenes (with fewer than 64 of them, also the first training ones) set the
    # projector's start too: drawn once for both.
    n_projector = min(512, max(eval_images, 64))
    reference = draw_scenes(stream_seed, 0, max(eval_images, n_projector), world.image_size)
    acc = _heldout_accuracy(model, heads, tensors, reference[:eval_images]) if eval_images else {}
    stats = init_projector_from_heads(
        model, processor, heads, [image for image, _ in reference[:n_projector]]
    )
    save_model_dir(model, processor, model_dir)
    if acc:
        log.info(
            "vision pretraining: %d steps, held-out cell colour accuracy %.3f, shape accuracy %.3f",
            steps,
            acc["heldout_colour"],
            acc["heldout_shape"],
        )
    return {
        "steps": steps,
        "batch_size": batch_size,
        "shape_weight": shape_weight,
        "final_loss": loss,
        **acc,
        **stats,
    }


def _train_tower(
    model, heads: tuple[nn.Linear, ...], batches, steps: int, lr: float, shape_weight: float
) -> float:
    """AdamW with a one-cycle schedule on the tower and the heads; returns the last step's loss."""
    colour_head, shape_head, cell_head = heads
    params = [*model.vision_tower.parameters(), *(p for h in heads for p in h.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(batches, total=steps, desc="vision pretraining (CLIP stand-in)", unit="step")
    for step, (pixels, colour_y, shape_y) in enumerate(bar):
        tokens = model.encode_images(pixels).flatten(0, 1)  # (B*4, C), cells row-major
        cell_y = torch.arange(len(POSITIONS)).repeat(len(pixels))
        loss = (
            loss_fn(colour_head(tokens), colour_y.flatten())
            + shape_weight * loss_fn(shape_head(tokens), shape_y.flatten())
            + loss_fn(cell_head(tokens), cell_y)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the stages' Trainer does
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return float(loss.item())


@torch.no_grad()
def _heldout_accuracy(model, heads, tensors, drawn: list) -> dict:
    """Colour and shape accuracy of the heads on the `drawn` scenes, over cells that hold a shape."""
    colour_head, shape_head, _ = heads
    right = {"colour": 0, "shape": 0}
    total = 0
    for start in range(0, len(drawn), 64):
        pixels, colour_y, shape_y = tensors(drawn[start : start + 64])
        tokens = model.encode_images(pixels)
        filled = shape_y > 0
        right["colour"] += int((colour_head(tokens).argmax(-1) == colour_y)[filled].sum())
        right["shape"] += int((shape_head(tokens).argmax(-1) == shape_y)[filled].sum())
        total += int(filled.sum())
    return {f"heldout_{k}": v / max(total, 1) for k, v in right.items()}


@torch.no_grad()
def init_projector_from_heads(
    model, processor, heads: tuple[nn.Linear, ...], images: list, scale: float = 2.0
) -> dict:
    """Start the projector from what the pretraining heads read off each token.

    The first Linear's first rows become the heads' rows (each token's colour, shape and cell
    scores), standardized over `images` to zero mean and std `scale` per row; its other rows
    start at zero. The last Linear's bias is set so the projected tokens average to zero over
    `images`: no image-independent component for the LLM's attention to drown in. The later
    stages train every weight; this only decides what the LLM sees first.
    Returns the constant share of the image tokens' norm before and after.
    """
    first, last = model.projector[0], model.projector[-1]
    rows = sum(h.out_features for h in heads)
    if not isinstance(first, nn.Linear) or first.bias is None or first.out_features < rows:
        raise ConfigError(
            f"the projector must start with a Linear layer (bias, >= {rows} outputs), not {first!r}"
        )
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise ConfigError(f"the projector must end with a Linear layer with bias, not {last!r}")
    if not images:
        raise ConfigError("initializing the projector needs at least one image")
    model.eval()
    feats = []
    for i in range(0, len(images), 128):
        chunk = [str(x) if isinstance(x, Path) else x for x in images[i : i + 128]]
        pixels = torch.stack(processor.preprocess_images(chunk))
        feats.append(model.encode_images(pixels).flatten(0, 1))
    feats = torch.cat(feats)

    def constant_share() -> float:
        tokens = model.projector(feats)
        return (tokens.mean(0).norm() / tokens.norm(dim=-1).mean().clamp_min(1e-12)).item()

    before = constant_share()
    weight = torch.cat([h.weight for h in heads])
    bias = torch.cat([h.bias for h in heads])
    scores = feats @ weight.T + bias
    mean, std = scores.mean(0), scores.std(0).clamp_min(1e-6)
    first.weight.zero_()
    first.bias.zero_()
    first.weight[:rows] = weight * (scale / std)[:, None]
    first.bias[:rows] = (bias - mean) * (scale / std)
    last.bias.sub_(model.projector(feats).mean(0))
    after = constant_share()
    log.info(
        "projector initialized from the pretraining heads: constant share of image tokens %.2f -> %.2f",
        before,
        after,
    )
    return {"projector_rows_from_heads": rows, "constant_share_before": before, "constant_share_after": after}
