"""Modality- and length-grouped sampling: batches never mix modalities, orders are reproducible."""

from __future__ import annotations

import random

import numpy as np
import pytest

from convllava_jp.data.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices


def _random_lengths(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    images = rng.integers(5, 500, 103).tolist()
    texts = (-rng.integers(1, 500, 57)).tolist()
    lengths = images + texts
    random.Random(seed).shuffle(lengths)
    return lengths


def test_sampler_never_mixes_modalities_and_is_deterministic():
    lengths = _random_lengths()
    batch_size = 8
    order = modality_length_grouped_indices(lengths, batch_size, seed=3, megabatch_mult=4)
    assert len(order) == 13 * 8 + 8 * 8  # each modality filled up to whole batches
    assert set(order) == set(range(len(lengths)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in batches:
        assert len({lengths[i] > 0 for i in batch}) == 1
    kinds = [lengths[b[0]] > 0 for b in batches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # batch order is shuffled

    # length grouping: batches are much tighter than random batches of the same modality
    def spread(bs):
        return sum(max(abs(lengths[i]) for i in b) - min(abs(lengths[i]) for i in b) for b in bs)

    rng = np.random.default_rng(0)
    random_batches = []
    for sign in (1, -1):
        members = rng.permutation([i for i, v in enumerate(lengths) if v * sign > 0]).tolist()
        random_batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    assert spread(batches) < 0.5 * spread(random_batches)

    assert modality_length_grouped_indices(lengths, batch_size, seed=3, megabatch_mult=4) == order
    assert modality_length_grouped_indices(lengths, batch_size, seed=4, megabatch_mult=4) != order

    sampler = ModalityLengthGroupedSampler(lengths, batch_size, seed=3)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(ModalityLengthGroupedSampler(lengths, batch_size, seed=3)) == epoch0


def test_sampler_with_one_modality_and_zero_length():
    order = modality_length_grouped_indices([-3, -5, -1, -2, -7], 2, seed=0)
    assert sorted(set(order)) == [0, 1, 2, 3, 4] and len(order) == 6
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0, -1], 2)
