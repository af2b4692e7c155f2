"""Samples -> a padded batch: id padding, image stacking and the training collator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .constants import IGNORE_INDEX
from .skips import SkippedRecord


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to (B, T_max); returns (ids, attention_mask)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        if padding_side == "right":
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        else:
            ids[i, -len(seq) :] = torch.tensor(seq)
            mask[i, -len(seq) :] = 1
    return ids, mask


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """N preprocessed (3, H, W) images -> one (N, 3, H, W) tensor when all share a shape, else a list.

    The one form `pixel_values` takes from the processor to `forward`: the model encodes a stacked
    batch in one pass and groups a list by size itself. A list that holds `CachedImage` stand-ins
    stays a list (the trainer swaps them for their cached features).
    """
    images = list(images)
    if images and all(isinstance(image, torch.Tensor) and image.shape == images[0].shape for image in images):
        return torch.stack(images)
    return images


class DataCollator:
    """Samples (and SkippedRecords) -> a padded batch.

    Returns a dict: ``input_ids`` / ``attention_mask`` (B, T) long, ``labels`` (B, T) padded with
    -100, ``pixel_values`` (`stack_images` of the batch's images in order: (N, 3, H, W) or a list of
    N (3, H, W); absent when no sample has an image), and ``skipped`` (the batch's SkippedRecords,
    so the main process can count skips made in DataLoader workers). When every sample was skipped,
    the tensors have shape (0, 0).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any] | SkippedRecord]) -> dict[str, Any]:
        skipped = [f for f in features if isinstance(f, SkippedRecord)]
        samples = [f for f in features if not isinstance(f, SkippedRecord)]
        input_ids, attention_mask = pad_sequences(
            [s["input_ids"] for s in samples], self.pad_token_id, self.padding_side
        )
        labels, _ = pad_sequences([s["labels"] for s in samples], IGNORE_INDEX, self.padding_side)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [p for s in samples for p in s.get("pixel_values", ())]
        if images:
            batch["pixel_values"] = stack_images(images)
        batch["skipped"] = skipped
        return batch
