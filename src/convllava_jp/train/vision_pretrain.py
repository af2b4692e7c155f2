"""Pretrain the tiny vision tower on the synthetic world: the demo's stand-in for CLIP.

In the article the ConvNeXt arrives CLIP-pretrained before stage 1. The demo's tiny ConvNeXt
starts random, and a random tower's image tokens carry the shapes only weakly (a large
image-independent component dominates them), so the tiny LLM takes thousands of steps to start
reading them. This supervised pass gives the tower what pretraining gives the real one: tokens
that already separate what is in each grid cell. Each of the 2x2 stage-5 tokens predicts the
colour and shape in its cell (or "none") and which cell it is, through linear heads.

What the LLM can learn in the demo's budget depends on how clean its image tokens are
(measured on captions, the LLM trained alone): with exact one-hot colour/shape features it
binds words to image tokens in ~200 steps; with the tower's raw features behind a fresh
projector, where a constant offset is ~96% of every token's norm, not in 600. So the pass ends
by starting the projector from the heads (`init_projector_from_heads`): its first Linear
computes the heads' standardized scores and the tokens are centred, which brings the LLM close
to the one-hot case. The recipe then trains the projector with a small learning rate: at the
full one, the shape scores were overwritten before the LLM learned to read them (held-out
shape_of_colour 28% vs 74% with the projector held).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.synthetic import COLOURS, POSITIONS, SHAPES
from ..errors import ConfigError

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


def pretrain_vision_on_world(
    model_dir: str | Path,
    world_dir: str | Path,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train `model_dir`'s vision tower in place on the world's scenes; returns final accuracies."""
    from ..model.weights import load_model_dir, save_model_dir

    world_dir = Path(world_dir)
    records = json.loads((world_dir / "stage1.json").read_text(encoding="utf-8"))
    records = [r for r in records if isinstance(r.get("scene"), dict)]
    if not records:
        raise ConfigError(f"{world_dir}/stage1.json has no scene metadata to pretrain the vision tower on")
    model, processor = load_model_dir(model_dir, dtype=torch.float32)
    if model.config.image_tokens(128, 128) != len(POSITIONS) and processor.image_processor.image_size != 128:
        raise ConfigError("vision pretraining on the world needs a 2x2 token grid (128 px, stride 64)")
    width = model.config.vision_hidden_size
    colour_head = nn.Linear(width, len(COLOURS) + 1)
    shape_head = nn.Linear(width, len(SHAPES) + 1)
    # Also which cell a token is: the LLM's position embeddings are faint beside the image
    # tokens, so a token has to say itself where it is for words like 左上 to bind to it.
    cell_head = nn.Linear(width, len(POSITIONS))
    heads = (colour_head, shape_head, cell_head)
    params = [*model.vision_tower.parameters(), *(p for h in heads for p in h.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    acc = {"colour": 0.0, "shape": 0.0}
    bar = tqdm(range(steps), desc="vision pretraining (CLIP stand-in)", unit="step")
    for step in bar:
        batch = rng.sample(records, min(batch_size, len(records)))
        pixels = torch.stack(processor.preprocess_images([str(world_dir / r["image"]) for r in batch]))
        labels = [_cell_labels(r["scene"]) for r in batch]
        colour_y = torch.tensor([c for c, _ in labels]).flatten()
        shape_y = torch.tensor([s for _, s in labels]).flatten()
        tokens = model.encode_images(pixels).flatten(0, 1)  # (B*4, C), cells row-major
        colour_logits, shape_logits = colour_head(tokens), shape_head(tokens)
        cell_y = torch.arange(len(POSITIONS)).repeat(len(batch))
        loss = (
            loss_fn(colour_logits, colour_y)
            + loss_fn(shape_logits, shape_y)
            + loss_fn(cell_head(tokens), cell_y)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            acc = {
                "colour": (colour_logits.argmax(-1) == colour_y).float().mean().item(),
                "shape": (shape_logits.argmax(-1) == shape_y).float().mean().item(),
            }
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(
                loss=f"{loss.item():.3f}", colour=f"{acc['colour']:.2f}", shape=f"{acc['shape']:.2f}"
            )
    model.eval()
    stats = init_projector_from_heads(
        model, processor, heads, [world_dir / r["image"] for r in rng.sample(records, min(512, len(records)))]
    )
    save_model_dir(model, processor, model_dir)
    log.info(
        "vision pretraining: %d steps, cell colour acc %.2f, shape acc %.2f",
        steps,
        acc["colour"],
        acc["shape"],
    )
    return {"steps": steps, "final_loss": float(loss.item()), **acc, **stats}


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
        pixels = torch.stack(processor.preprocess_images([str(x) for x in images[i : i + 128]]))
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
