"""Which modules train: the recipe's `trainable` list -> `requires_grad` on the model's parameters."""

from __future__ import annotations

from ..errors import ConfigError
from ..model.modeling import parameter_counts


def apply_trainable(model, trainable: list, allow_empty: bool = False) -> dict[str, int]:
    """Freeze everything, then unfreeze the recipe's modules; returns trainable params per part.

    Names: `stage5` (the added stages), `vision` (whole tower), `{vision_from_stage: N}`
    (stages N.. of the tower, 1-based), `projector`, `llm`. `allow_empty` lets a caller that
    adds trainable parameters afterwards (LoRA adapters) pass a list that selects nothing.
    The counts are `parameter_counts(model, trainable_only=True)`: vision_trunk, stage5,
    projector, llm and total.
    """
    model.requires_grad_(False)
    stages = model.vision_tower.encoder.stages
    trunk = model.config.trunk_stages
    for item in trainable:
        if isinstance(item, dict):
            ((key, value),) = item.items()
        else:
            key, value = item, None
        if key == "stage5":
            if len(stages) <= trunk:
                raise ConfigError("`stage5` is trainable in the recipe but the model has no stage 5")
            for stage in stages[trunk:]:
                stage.requires_grad_(True)
        elif key == "vision":
            model.vision_tower.requires_grad_(True)
        elif key == "vision_from_stage":
            first = int(value)
            if not 1 <= first <= len(stages):
                raise ConfigError(f"vision_from_stage must be in 1..{len(stages)}, got {value}")
            for stage in stages[first - 1 :]:
                stage.requires_grad_(True)
        elif key == "projector":
            model.projector.requires_grad_(True)
        elif key == "llm":
            model.language_model.requires_grad_(True)
        else:
            raise ConfigError(f"unknown trainable module {item!r}")
    counts = parameter_counts(model, trainable_only=True)
    if not counts["total"] and not allow_empty:
        raise ConfigError("the recipe stage trains nothing: `trainable` selects no parameters")
    return counts
