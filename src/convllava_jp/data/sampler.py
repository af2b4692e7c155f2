"""Modality- and length-grouped sampling, as LLaVA's ``group_by_modality_length``.

Image and text-only samples never share a batch, and a batch holds samples of similar length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import ConfigError


def modality_length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    megabatch_mult: int = 50,
) -> list[int]:
    """An epoch's sample order in which every run of ``batch_size`` indices is one modality.

    As LLaVA's ``group_by_modality_length``: ``lengths`` > 0 are image samples, < 0 text-only.
    Each modality is shuffled, cut into megabatches of ``megabatch_mult * batch_size``, sorted by
    length inside each (so a batch holds similar lengths) and cut into batches; the batches of
    both modalities are then shuffled together. Unlike LLaVA, whose last batch mixes the
    leftovers of both modalities, a modality's last partial batch is filled up with repeats of
    that modality's samples, so no batch ever mixes: the result can be up to
    ``batch_size - 1`` indices per modality longer than ``lengths``.

    Args:
        lengths: signed modality lengths (`ConversationDataset.lengths`); none may be 0.
        batch_size: the global batch (per-device batch x world size x accumulation steps, as
            LLaVA's sampler), so a whole optimizer step is one modality on every device.
        seed / generator: randomness; the same seed gives the same order.
        megabatch_mult: how many batches are length-sorted together.
    """
    if batch_size < 1 or megabatch_mult < 1:
        raise ConfigError(f"batch_size and megabatch_mult must be >= 1, got {batch_size}, {megabatch_mult}")
    signed = np.asarray(lengths, dtype=np.int64)
    if (signed == 0).any():
        raise ConfigError("modality lengths must be non-zero (> 0 with images, < 0 text-only)")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    magnitude = np.abs(signed)
    batches: list[np.ndarray] = []
    for members in (np.flatnonzero(signed > 0), np.flatnonzero(signed < 0)):
        if not len(members):
            continue
        order = members[torch.randperm(len(members), generator=generator).numpy()]
        shortfall = -len(order) % batch_size
        if shortfall:
            order = np.concatenate([order, np.resize(order, shortfall)])
        megabatch = megabatch_mult * batch_size
        for start in range(0, len(order), megabatch):
            chunk = order[start : start + megabatch]
            chunk = chunk[np.argsort(-magnitude[chunk], kind="stable")]
            batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [int(i) for b in shuffled for i in batches[b]]


class ModalityLengthGroupedSampler(Sampler[int]):
    """A train sampler yielding `modality_length_grouped_indices`, reshuffled per epoch.

    Args:
        lengths: signed modality lengths (`ConversationDataset.lengths`).
        batch_size: the global batch (per-device batch x world size x accumulation steps).
        seed: base seed; epoch ``e`` uses ``seed + e`` (call `set_epoch`, as the Trainer does).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_mult: int = 50
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.epoch = 0
        images = int((self.lengths > 0).sum())
        texts = len(self.lengths) - images
        self._len = sum(math.ceil(n / batch_size) * batch_size for n in (images, texts))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from modality_length_grouped_indices(
            self.lengths, self.batch_size, generator=generator, megabatch_mult=self.megabatch_mult
        )
