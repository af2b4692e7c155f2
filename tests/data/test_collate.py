"""Batch building: id padding on either side, and the one "stack if same shape" rule for images."""

from __future__ import annotations

import pytest
import torch

from convllava_jp.data.collate import pad_sequences, stack_images


def test_pad_sequences_right_and_left():
    ids, mask = pad_sequences([[1, 2, 3], [4], []], pad_value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_value=9, padding_side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert pad_sequences([], 0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="padding_side"):
        pad_sequences([[1]], 0, padding_side="middle")


def test_stack_images_stacks_one_size_and_lists_mixed_sizes():
    a, b, wide = torch.zeros(3, 64, 64), torch.ones(3, 64, 64), torch.ones(3, 64, 128)
    stacked = stack_images([a, b])
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 3, 64, 64)
    assert torch.equal(stacked[1], b)
    mixed = stack_images((a, wide))
    assert isinstance(mixed, list) and mixed[0] is a and mixed[1] is wide
    assert stack_images([]) == []
