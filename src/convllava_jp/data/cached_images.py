"""A stand-in for a preprocessed image whose vision-tower features are already computed.

When a stage trains with the vision tower frozen, the tower's output for an image never changes:
`train.feature_cache` computes it once per image file before the stage, and the dataset then
hands out a `CachedImage` in place of the (3, H, W) pixel tensor, without opening the file. It has
the shape the tensor would have, so everything that counts image tokens from a shape keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachedImage:
    """Row `key` of a feature cache; `shape` is the (3, H, W) its pixel tensor would have."""

    key: int
    shape: tuple[int, int, int]
