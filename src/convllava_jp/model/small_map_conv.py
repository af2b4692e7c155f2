"""Same-padded convolutions on feature maps smaller than the kernel's reach: the kernel's centre only.

ConvNeXt's 7x7 depthwise convolution runs on every stage's map; on a map of H x W < 4 x 4 (the
added stage 5 at small image sizes: 2 x 2 at the demo's 128 px) every output reads only the
kernel's central (2H-1) x (2W-1) taps, the rest multiplies padding. `SmallMapConv2d` convolves with
that centre and the matching smaller padding: the same sums, the same gradients (zero for the
unused taps, as before), a fraction of the work. On larger maps it is a plain `nn.Conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallMapConv2d(nn.Conv2d):
    """`nn.Conv2d` (stride 1, same padding) that crops its kernel to what a small input can reach."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (h, w) = self.padding, x.shape[-2:]
        r, c = min(ph, h - 1), min(pw, w - 1)
        if (r, c) == (ph, pw):
            return super().forward(x)
        weight = self.weight[:, :, ph - r : ph + r + 1, pw - c : pw + c + 1]
        return F.conv2d(x, weight, self.bias, 1, (r, c), 1, self.groups)


def _croppable(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    kh, kw = conv.kernel_size
    return (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and kh % 2 == 1
        and kw % 2 == 1
        and conv.padding == ((kh - 1) // 2, (kw - 1) // 2)
    )


def use_small_map_convs(module: nn.Module) -> int:
    """Replace every same-padded stride-1 `nn.Conv2d` under `module` by a `SmallMapConv2d`.

    Call before the weights are loaded or initialized (the new modules are fresh); parameter
    names and shapes stay as they were. Returns how many were replaced.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not _croppable(child):
                continue
            new = SmallMapConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                padding=child.padding,
                groups=child.groups,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            setattr(parent, name, new)
            replaced += 1
    return replaced
