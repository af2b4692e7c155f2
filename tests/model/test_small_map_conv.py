"""SmallMapConv2d computes what nn.Conv2d computes, outputs and gradients, on maps of every size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convllava_jp.model.small_map_conv import SmallMapConv2d, use_small_map_convs


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 5), (6, 1), (9, 8)])
@pytest.mark.parametrize("kernel, groups", [(7, 8), (7, 1), (5, 8), (3, 2)])
def test_same_output_and_gradients_as_conv2d(size, kernel, groups):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, kernel, padding=kernel // 2, groups=groups).double()
    small = SmallMapConv2d(8, 8, kernel, padding=kernel // 2, groups=groups).double()
    small.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, *size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), small(x2)
    torch.testing.assert_close(y2, y1)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(small.weight.grad, plain.weight.grad)
    torch.testing.assert_close(small.bias.grad, plain.bias.grad)
    reach = min(kernel // 2, size[0] - 1), min(kernel // 2, size[1] - 1)
    if reach != (kernel // 2, kernel // 2):  # the taps no input reaches get no gradient
        outside = torch.ones_like(plain.weight.grad, dtype=torch.bool)
        c = kernel // 2
        outside[:, :, c - reach[0] : c + reach[0] + 1, c - reach[1] : c + reach[1] + 1] = False
        assert plain.weight.grad[outside].abs().max() == 0


def test_only_same_padded_stride_one_convs_are_replaced():
    block = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4),  # patchify: stays
        nn.Conv2d(8, 8, 7, padding=3, groups=8),  # depthwise: replaced
        nn.Conv2d(8, 8, 3, padding=0),  # valid padding: stays
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),  # not zeros: stays
        nn.Sequential(nn.Conv2d(8, 8, 5, padding=2)),  # nested: replaced
    )
    names = sorted(k for k, _ in block.state_dict().items())
    assert use_small_map_convs(block) == 2
    assert sorted(block.state_dict()) == names
    assert [type(m).__name__ for m in block.modules() if isinstance(m, nn.Conv2d)] == [
        "Conv2d",
        "SmallMapConv2d",
        "Conv2d",
        "Conv2d",
        "SmallMapConv2d",
    ]


def test_the_model_tower_uses_it(tiny_model_dir):
    from convllava_jp.model.model_dir import load_model_dir

    model, _ = load_model_dir(tiny_model_dir, dtype=torch.float32)
    dwconvs = [layer.dwconv for stage in model.vision_tower.encoder.stages for layer in stage.layers]
    assert dwconvs and all(isinstance(conv, SmallMapConv2d) for conv in dwconvs)
