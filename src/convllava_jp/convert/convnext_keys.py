"""timm ConvNeXt trunk keys (what open_clip's `visual.trunk` is) <-> transformers `ConvNextModel`.

One table of key pairs serves both directions. The reference LLaVA-JP code names the block's
layer scale `weight` instead of timm's `gamma` (transformers<5 renamed `gamma` on load), so both
spellings are read and `gamma` is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..errors import CheckpointError
from .state_dicts import key_list

# (timm name, ConvNextModel name); `{i}` is the stage, `{j}` the block.
_KEY_PAIRS = [
    ("stem.0.{wb}", "embeddings.patch_embeddings.{wb}"),
    ("stem.1.{wb}", "embeddings.layernorm.{wb}"),
    ("stages.{i}.downsample.{k}.{wb}", "encoder.stages.{i}.downsampling_layer.{k}.{wb}"),
    ("stages.{i}.blocks.{j}.{gamma}", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
    ("stages.{i}.blocks.{j}.conv_dw.{wb}", "encoder.stages.{i}.layers.{j}.dwconv.{wb}"),
    ("stages.{i}.blocks.{j}.norm.{wb}", "encoder.stages.{i}.layers.{j}.layernorm.{wb}"),
    ("stages.{i}.blocks.{j}.mlp.fc1.{wb}", "encoder.stages.{i}.layers.{j}.pwconv1.{wb}"),
    ("stages.{i}.blocks.{j}.mlp.fc2.{wb}", "encoder.stages.{i}.layers.{j}.pwconv2.{wb}"),
]
_GROUPS = {"i": r"\d+", "j": r"\d+", "k": "[01]", "wb": "weight|bias", "gamma": "gamma|weight"}
_PATTERN_FIELDS = {name: f"(?P<{name}>{regex})" for name, regex in _GROUPS.items()}
_TEMPLATE_FIELDS = {name: rf"\g<{name}>" for name in _GROUPS} | {"gamma": "gamma"}
# Parts of a timm ConvNeXt that are not the trunk: the classifier head and the (usually identity)
# norm before it. The vision tower ends at the last stage's feature map.
TIMM_NON_TRUNK = ("head.", "norm_pre.")


def _table(pairs: Iterable[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    """(source, target) templates -> (regex over source keys, `match.expand` template)."""
    return [
        (re.compile(src.replace(".", r"\.").format(**_PATTERN_FIELDS)), dst.format(**_TEMPLATE_FIELDS))
        for src, dst in pairs
    ]


_TIMM_TO_HF = _table(_KEY_PAIRS)
_HF_TO_TIMM = _table((hf, timm) for timm, hf in _KEY_PAIRS)


def _map_keys(state_dict: Mapping[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, template in table:
            if match := pattern.fullmatch(key):
                out[match.expand(template)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not keys of {what}: {key_list(unknown)}")
    return out


def timm_convnext_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm ConvNeXt keys -> transformers `ConvNextModel` keys (prefixed with `prefix`).

    Maps the trunk (`stem.*`, `stages.{i}.*`, any number of stages); `head.*` and `norm_pre.*`
    are dropped. 1x1-conv MLP weights (timm's `conv_mlp=True`, shape (out, in, 1, 1)) become the
    Linear weights (out, in) `ConvNextModel` uses. Tensors are not copied.

    Raises:
        CheckpointError: keys that are neither trunk nor head (listed), e.g. ConvNeXt-V2's GRN.
    """
    trunk = {k: v for k, v in state_dict.items() if not k.startswith(TIMM_NON_TRUNK)}
    mapped = _map_keys(trunk, _TIMM_TO_HF, "a timm ConvNeXt trunk (stem.*, stages.*)")
    return {
        prefix + k: v.flatten(1) if k.endswith(("pwconv1.weight", "pwconv2.weight")) and v.ndim == 4 else v
        for k, v in mapped.items()
    }


def hf_convnext_to_timm(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers `ConvNextModel` keys -> timm ConvNeXt trunk keys (the inverse mapping).

    Only keys starting with `prefix` are read (e.g. `vision_tower.` on our full model's state
    dict); the pooled-output `layernorm.*` is dropped. MLP weights stay Linear-shaped, as in timm's
    default `conv_mlp=False`.

    Raises:
        CheckpointError: keys under `prefix` that are not ConvNeXt keys (listed).
    """
    inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    inner = {k: v for k, v in inner.items() if not k.startswith("layernorm.")}
    return _map_keys(inner, _HF_TO_TIMM, "a transformers ConvNextModel")


def convnext_arch(timm_state_dict: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(depths, widths) per stage of a timm-keyed ConvNeXt trunk, read from its keys and shapes."""
    blocks: dict[int, set[int]] = {}
    for key in timm_state_dict:
        if match := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"ConvNeXt stages are not numbered 0..n-1: found stages {stages}")
    depths, widths = [], []
    for i in stages:
        if blocks[i] != set(range(len(blocks[i]))):
            raise CheckpointError(f"ConvNeXt stage {i} has gaps in its block numbers: {sorted(blocks[i])}")
        dw = timm_state_dict.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if dw is None:
            raise CheckpointError(f"ConvNeXt stage {i}: no stages.{i}.blocks.0.conv_dw.weight")
        depths.append(len(blocks[i]))
        widths.append(int(dw.shape[0]))
    return depths, widths
