"""timm/open_clip ConvNeXt keys <-> transformers ConvNextModel: parity with timm's own forward."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import ConvNextModel

from convllava_jp.convert.convnext_keys import convnext_arch, hf_convnext_to_timm, timm_convnext_to_hf
from convllava_jp.convert.vision_trunk import _trunk_shapes, load_trunk_into
from convllava_jp.errors import CheckpointError
from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config
from convllava_jp.model.presets import build_vision_config

from ._support import (
    ATTO_DEPTHS,
    ATTO_WIDTHS,
    TRUNK_DEPTHS,
    TRUNK_WIDTHS,
    features,
    images,
    max_diff,
    preset_for,
    randomize,
    small_timm,
)


def test_mapped_trunk_matches_timm_forward_features():
    ref = small_timm()
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS))).eval()
    load_trunk_into(model, ref.state_dict() | {})  # head keys included on purpose: dropped
    x = images()
    with torch.no_grad():
        ours = model.encode_images(x)
    expected = features(ref, x)
    assert ours.shape == expected.shape == (2, 4, 128)
    assert max_diff(ours, expected) <= 1e-5


def test_mapping_into_plain_convnextmodel_conv_mlp_variant():
    # convnext_atto uses timm's conv_mlp=True: 1x1-conv MLP weights (out, in, 1, 1).
    ref = randomize(timm.create_model("convnext_atto", pretrained=False))
    hf = ConvNextModel(build_vision_config(ATTO_DEPTHS, ATTO_WIDTHS, stage5_depth=0, stage5_width=0)).eval()
    result = hf.load_state_dict(timm_convnext_to_hf(ref.state_dict()), strict=False)
    assert sorted(result.missing_keys) == ["layernorm.bias", "layernorm.weight"]  # pooled-output norm
    assert result.unexpected_keys == []
    x = images()
    with torch.no_grad():
        ours = hf(x).last_hidden_state.flatten(2).transpose(1, 2)
    assert max_diff(ours, features(ref, x), conv_mlp=True) <= 1e-5


def test_hf_to_timm_is_the_inverse():
    sd = small_timm().state_dict()
    trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
    back = hf_convnext_to_timm(timm_convnext_to_hf(trunk, prefix="vision_tower."), prefix="vision_tower.")
    assert back.keys() == trunk.keys()
    assert all(torch.equal(back[k], trunk[k]) for k in trunk)


def test_mapping_lists_unknown_keys():
    sd = small_timm().state_dict()
    sd["stages.0.blocks.0.mlp.grn.weight"] = torch.zeros(64)  # ConvNeXt-V2, not supported
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.mlp\.grn\.weight"):
        timm_convnext_to_hf(sd)


def test_convnext_large_keys_cover_the_article_preset_on_meta():
    with torch.device("meta"):
        large = timm.create_model("convnext_large")
        model = ConvLlavaForConditionalGeneration(build_config("convllava-jp-1.3b-768"))
    trunk = large.state_dict()
    assert convnext_arch({k: v for k, v in trunk.items() if not k.startswith("head.")}) == (
        [3, 3, 27, 3],
        [192, 384, 768, 1536],
    )
    mapped = timm_convnext_to_hf(trunk)
    expected = _trunk_shapes(model.vision_tower, model.config.trunk_stages)
    assert mapped.keys() == expected.keys()
    assert all(tuple(mapped[k].shape) == tuple(expected[k]) for k in expected)
    assert not any(k.startswith("encoder.stages.4.") for k in expected)  # stage 5 stays fresh
    load_trunk_into(model, trunk)  # no missing / unexpected / mismatched keys
