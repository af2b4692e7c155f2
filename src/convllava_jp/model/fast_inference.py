"""The CPU fast path for reduced-precision inference (bfloat16 / float16 weights on the CPU).

Two layout changes, both inference-only (the model is not meant to be trained or saved after):
- the vision tower in channels_last, so ConvNeXt's depthwise convolutions and the permutes around
  its per-pixel MLPs run without re-layout copies;
- the language model's linear layers (`nn.Linear`, GPT-2's `Conv1D`) as `RowLinear`: one decoded
  row is a matrix-vector product (`torch.mv` on the (out, in) weight), which on the CPU runs the
  bf16 GEMV kernel instead of a one-row GEMM. Several rows (prefill, batched decoding) go
  through `F.linear` as before.
Figures: docs/benchmarks.md ("Side by side with the reference LLaVA-JP").
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

REDUCED = (torch.bfloat16, torch.float16)


class RowLinear(nn.Module):
    """`y = x W^T + b` with the weight as (out, in); a single row takes the GEMV kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module) -> RowLinear:
        """From an `nn.Linear` (weight shared) or a transformers `Conv1D` ((in, out) weight transposed)."""
        bias = None if module.bias is None else module.bias.data
        if isinstance(module, nn.Linear):
            return cls(module.weight.data, bias)
        return cls(module.weight.data.t().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's `malloc_trim`; elsewhere nothing), so that
    transposing layers one by one does not pile up freed copies in the peak RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _row_linears(module: nn.Module) -> int:
    """Replace exact `nn.Linear` / `Conv1D` children (not subclasses: quantized layers) in place."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, child in list(module.named_children()):
        if type(child) in (nn.Linear, Conv1D):
            setattr(module, name, RowLinear.from_module(child))
            if type(child) is Conv1D:  # a transposed copy was made; the original is now free
                del child
                _trim_heap()
            n += 1
        else:
            n += _row_linears(child)
    return n


def uses_fast_path(model: nn.Module) -> bool:
    """The fast path applies to a model in bfloat16 / float16 on the CPU."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in REDUCED


def prepare_cpu_inference(model: nn.Module) -> bool:
    """Apply the fast path to a ConvLLaVA model in reduced precision on the CPU (else nothing).

    Returns whether it applied. The model stays usable for `generate` and forward passes with
    any batch; it is not meant to be trained or saved afterwards (GPT-2's Conv1D weights are
    stored transposed).
    """
    if not uses_fast_path(model):
        return False
    model.vision_tower.to(memory_format=torch.channels_last)
    n = _row_linears(model.language_model)
    log.info("CPU fast path: vision tower channels_last, %d LLM linear layers as RowLinear", n)
    return True
