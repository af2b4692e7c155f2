"""load_vision_trunk from every accepted source (open_clip dir / hub id, timm file / name) and
load_trunk_into's errors. Checkpoints are written by the test in the real formats; no network."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import save_file
from torch import nn

from convllava_jp.convert import vision_trunk
from convllava_jp.convert.vision_trunk import load_trunk_into, load_vision_trunk
from convllava_jp.errors import CheckpointError
from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config

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


def test_load_trunk_into_lists_missing_unexpected_and_mismatched_keys():
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS)))
    sd = dict(small_timm().state_dict())
    del sd["stages.2.blocks.1.conv_dw.bias"]
    sd["stages.4.blocks.0.gamma"] = torch.zeros(256)  # a stage the trunk does not have
    sd["stem.0.bias"] = torch.zeros(17)
    with pytest.raises(CheckpointError) as info:
        load_trunk_into(model, sd)
    msg = str(info.value)
    assert "missing 1 key(s): encoder.stages.2.layers.1.dwconv.bias" in msg
    assert "unexpected 1 key(s): encoder.stages.4.layers.0.layer_scale_parameter" in msg
    assert "embeddings.patch_embeddings.bias (checkpoint (17,), model (16,))" in msg


def test_load_trunk_into_other_size_names_both_architectures_and_truncates_list():
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS)))
    atto = timm.create_model("convnext_atto", pretrained=False).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_trunk_into(model, atto)
    msg = str(info.value)
    assert "checkpoint ConvNeXt depths [2, 2, 6, 2] widths [40, 80, 160, 320]" in msg
    assert "model trunk depths [1, 1, 2, 1] widths [16, 32, 64, 128]" in msg
    assert "... and " in msg and "more" in msg


def write_open_clip_dir(path: Path, seed: int = 0):
    """A real open_clip CLIP (timm convnext_atto tower) saved as its hub repos are."""
    from open_clip.model import CLIP

    vision_cfg = {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "mlp",
        "timm_drop": 0.0,
        "timm_drop_path": 0.1,
        "image_size": 64,
    }
    text_cfg = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}
    model = randomize(CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg), seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors"
    )
    config = {
        "model_cfg": {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return model


def test_open_clip_directory_loads_and_matches_open_clip(tmp_path):
    import open_clip

    ref = write_open_clip_dir(tmp_path / "clip")
    # open_clip itself reads the directory: it is in the real layout.
    reread = open_clip.create_model("local-dir:" + str(tmp_path / "clip"))
    assert torch.equal(reread.visual.trunk.stem[0].weight, ref.visual.trunk.stem[0].weight)

    trunk = load_vision_trunk(tmp_path / "clip")
    expected = {k: v for k, v in ref.visual.trunk.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in expected)

    model = ConvLlavaForConditionalGeneration(build_config(preset_for(ATTO_DEPTHS, ATTO_WIDTHS))).eval()
    load_trunk_into(model, trunk)
    x = images()
    with torch.no_grad():
        ours = model.encode_images(x)
    assert max_diff(ours, features(ref.visual.trunk, x), conv_mlp=True) <= 1e-5


def test_open_clip_vit_is_refused(tmp_path):
    write_open_clip_dir(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"] = {"width": 768, "layers": 12, "patch_size": 16, "image_size": 224}
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a timm ConvNeXt"):
        load_vision_trunk(tmp_path / "clip")


def not_found(url: str) -> Exception:
    """The error hf_hub_download raises for a file the repo does not have (HTTP 404)."""
    # Built with huggingface_hub's own HTTP library (httpx2 in huggingface_hub 2.x).
    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])
    response = http.Response(404, request=http.Request("HEAD", url))
    return hub_errors.RemoteEntryNotFoundError("404 Entry Not Found", response=response)


def fake_hub(monkeypatch, repo_dir: Path, repo_id: str):
    """hf_hub_download served from a local folder; answers 404 for files the 'repo' lacks."""
    asked = []

    def download(rid, filename, **kwargs):
        assert rid == repo_id
        asked.append(filename)
        if not (repo_dir / filename).is_file():
            raise not_found(f"https://huggingface.co/{rid}/resolve/main/{filename}")
        return str(repo_dir / filename)

    monkeypatch.setattr(vision_trunk, "hf_hub_download", download)
    return asked


def test_open_clip_hub_id(monkeypatch, tmp_path):
    ref = write_open_clip_dir(tmp_path / "repo")
    asked = fake_hub(monkeypatch, tmp_path / "repo", "laion/tiny")
    trunk = load_vision_trunk("hf-hub:laion/tiny")
    assert asked == ["open_clip_model.safetensors", "open_clip_config.json"]
    assert torch.equal(trunk["stages.3.blocks.1.gamma"], ref.visual.trunk.stages[3].blocks[1].gamma)


def test_open_clip_hub_pickle_only_with_allow_pickle(monkeypatch, tmp_path):
    ref = write_open_clip_dir(tmp_path / "repo")
    os.remove(tmp_path / "repo" / "open_clip_model.safetensors")
    torch.save(ref.state_dict(), tmp_path / "repo" / "open_clip_pytorch_model.bin")
    asked = fake_hub(monkeypatch, tmp_path / "repo", "laion/tiny")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_vision_trunk("hf-hub:laion/tiny")
    assert "open_clip_pytorch_model.bin" not in asked  # not even downloaded
    trunk = load_vision_trunk("hf-hub:laion/tiny", allow_pickle=True)
    assert torch.equal(trunk["stem.0.weight"], ref.visual.trunk.stem[0].weight)


def test_hub_without_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(vision_trunk, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="cannot download open_clip_model.safetensors"):
        load_vision_trunk("hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft")


def test_timm_safetensors_file(tmp_path):
    ref = small_timm()
    save_file(ref.state_dict(), tmp_path / "convnext.safetensors")
    trunk = load_vision_trunk(str(tmp_path / "convnext.safetensors"))
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in expected)


def test_pickle_refused_without_allow_pickle_then_loaded_with_weights_only(tmp_path):
    ref = small_timm()
    path = tmp_path / "convnext.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_vision_trunk(path)
    trunk = load_vision_trunk(path, allow_pickle=True)
    assert torch.equal(trunk["stages.2.blocks.1.mlp.fc2.weight"], ref.stages[2].blocks[1].mlp.fc2.weight)


def test_pickle_with_code_is_refused_even_with_allow_pickle(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"stem.0.weight": torch.zeros(1), "obj": nn.Linear(2, 2)}, path)  # a module: not weights_only
    with pytest.raises(CheckpointError, match="weights_only"):
        load_vision_trunk(path, allow_pickle=True)


def test_unknown_specs(tmp_path):
    with pytest.raises(CheckpointError, match="hf-hub:org/name"):
        load_vision_trunk("definitely_not_a_convnext")
    with pytest.raises(CheckpointError, match="no such file"):
        load_vision_trunk(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        load_vision_trunk(tmp_path / "empty")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no ConvNeXt trunk"):
        load_vision_trunk(tmp_path / "other.safetensors")


def test_timm_model_name(monkeypatch):
    ref = small_timm()
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return ref

    monkeypatch.setattr(timm, "create_model", create_model)
    trunk = load_vision_trunk("convnext_tiny.fb_in1k")
    assert calls == [("convnext_tiny.fb_in1k", True)]
    assert torch.equal(trunk["stem.1.weight"], ref.stem[1].weight)

    def no_network(name, pretrained=False, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(CheckpointError, match="timm could not load pretrained 'convnext_large'"):
        load_vision_trunk("convnext_large")
