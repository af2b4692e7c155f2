"""Weight import: trunk key mapping (parity with timm / open_clip), loaders, init_model, LLaVA-JP.

Every checkpoint here is small and written by the test in the real format (timm state dicts,
open_clip's hub layout written from a real `open_clip` CLIP, the reference LLaVA-JP key names);
nothing touches the network.
"""

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
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXt, ConvNeXtStage
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import ConvNextModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from convllava_jp.errors import CheckpointError, ConfigError
from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config
from convllava_jp.model import weights as W
from convllava_jp.model.presets import ModelPreset, build_vision_config

TRUNK_DEPTHS = [1, 1, 2, 1]
TRUNK_WIDTHS = [16, 32, 64, 128]
ATTO_DEPTHS = [2, 2, 6, 2]
ATTO_WIDTHS = [40, 80, 160, 320]
TINY_TEXT = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "vocab_size": 60,
    "bos_token_id": 1,
    "eos_token_id": 1,
}


# --------------------------------------------------------------------------------------------------
# Fixtures: tiny models and checkpoints in the real formats
# --------------------------------------------------------------------------------------------------


def _text_columns(logits: torch.Tensor, model) -> torch.Tensor:
    """Logits without the image placeholder's column (our model never predicts the placeholder)."""
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    if 0 <= model.config.image_token_id < logits.shape[-1]:
        keep[model.config.image_token_id] = False
    return logits[..., keep]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter matter: layer scale starts at 1e-6, which would hide mapping errors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def small_timm(seed: int = 0) -> ConvNeXt:
    return randomize(ConvNeXt(depths=TRUNK_DEPTHS, dims=TRUNK_WIDTHS, num_classes=10), seed)


def preset_for(depths, widths, stage5_depth=0, stage5_width=0, image_size=128) -> ModelPreset:
    return ModelPreset(
        name="test",
        description="test",
        trunk_depths=list(depths),
        trunk_widths=list(widths),
        stage5_depth=stage5_depth,
        stage5_width=stage5_width,
        text=dict(TINY_TEXT),
        image_size=image_size,
        image_mode="pad",
        stage5_drop_path_rates=[0.0, 0.0],
    )


def features(timm_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features as (B, H*W, C), row-major as the vision tower flattens."""
    with torch.no_grad():
        return timm_model.forward_features(x).flatten(2).transpose(1, 2)


def max_diff(ours: torch.Tensor, expected: torch.Tensor, conv_mlp: bool = False) -> float:
    """Max abs difference; for timm's conv_mlp variants relative to the output scale.

    conv_mlp=True computes the block MLP as a 1x1 convolution (ConvNextModel: a Linear), a
    different summation order, so the fp32 error grows with the activations (~10 here).
    """
    diff = (ours - expected).abs().max().item()
    return diff / max(1.0, expected.abs().max().item()) if conv_mlp else diff


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def word_tokenizer(n_words: int = 50) -> PreTrainedTokenizerFast:
    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def write_llm(path: Path, vocab_size: int = 60, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    text = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    cfg = GPT2Config(**(text | {"vocab_size": vocab_size}), tie_word_embeddings=False)
    llm = GPT2LMHeadModel(cfg).eval()
    llm.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return llm


def text_ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 11, 3, 7]])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any hub access is a bug in a test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access in a test: hf_hub_download{args}")

    monkeypatch.setattr(W, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------
# Key mapping: parity with timm
# --------------------------------------------------------------------------------------------------


def test_mapped_trunk_matches_timm_forward_features():
    ref = small_timm()
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS))).eval()
    W.load_trunk_into(model, ref.state_dict() | {})  # head keys included on purpose: dropped
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
    result = hf.load_state_dict(W.timm_convnext_to_hf(ref.state_dict()), strict=False)
    assert sorted(result.missing_keys) == ["layernorm.bias", "layernorm.weight"]  # pooled-output norm
    assert result.unexpected_keys == []
    x = images()
    with torch.no_grad():
        ours = hf(x).last_hidden_state.flatten(2).transpose(1, 2)
    assert max_diff(ours, features(ref, x), conv_mlp=True) <= 1e-5


def test_hf_to_timm_is_the_inverse():
    sd = small_timm().state_dict()
    trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
    back = W.hf_convnext_to_timm(W.timm_convnext_to_hf(trunk, prefix="vision_tower."), prefix="vision_tower.")
    assert back.keys() == trunk.keys()
    assert all(torch.equal(back[k], trunk[k]) for k in trunk)


def test_mapping_lists_unknown_keys():
    sd = small_timm().state_dict()
    sd["stages.0.blocks.0.mlp.grn.weight"] = torch.zeros(64)  # ConvNeXt-V2, not supported
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.mlp\.grn\.weight"):
        W.timm_convnext_to_hf(sd)


def test_convnext_large_keys_cover_the_article_preset_on_meta():
    with torch.device("meta"):
        large = timm.create_model("convnext_large")
        model = ConvLlavaForConditionalGeneration(build_config("convllava-jp-1.3b-768"))
    trunk = large.state_dict()
    assert W.convnext_arch({k: v for k, v in trunk.items() if not k.startswith("head.")}) == (
        [3, 3, 27, 3],
        [192, 384, 768, 1536],
    )
    mapped = W.timm_convnext_to_hf(trunk)
    expected = W._trunk_shapes(model.vision_tower, model.config.trunk_stages)
    assert mapped.keys() == expected.keys()
    assert all(tuple(mapped[k].shape) == tuple(expected[k]) for k in expected)
    assert not any(k.startswith("encoder.stages.4.") for k in expected)  # stage 5 stays fresh
    W.load_trunk_into(model, trunk)  # no missing / unexpected / mismatched keys


# --------------------------------------------------------------------------------------------------
# load_trunk_into errors
# --------------------------------------------------------------------------------------------------


def test_load_trunk_into_lists_missing_unexpected_and_mismatched_keys():
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS)))
    sd = dict(small_timm().state_dict())
    del sd["stages.2.blocks.1.conv_dw.bias"]
    sd["stages.4.blocks.0.gamma"] = torch.zeros(256)  # a stage the trunk does not have
    sd["stem.0.bias"] = torch.zeros(17)
    with pytest.raises(CheckpointError) as info:
        W.load_trunk_into(model, sd)
    msg = str(info.value)
    assert "missing 1 key(s): encoder.stages.2.layers.1.dwconv.bias" in msg
    assert "unexpected 1 key(s): encoder.stages.4.layers.0.layer_scale_parameter" in msg
    assert "embeddings.patch_embeddings.bias (checkpoint (17,), model (16,))" in msg


def test_load_trunk_into_other_size_names_both_architectures_and_truncates_list():
    model = ConvLlavaForConditionalGeneration(build_config(preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS)))
    atto = timm.create_model("convnext_atto", pretrained=False).state_dict()
    with pytest.raises(CheckpointError) as info:
        W.load_trunk_into(model, atto)
    msg = str(info.value)
    assert "checkpoint ConvNeXt depths [2, 2, 6, 2] widths [40, 80, 160, 320]" in msg
    assert "model trunk depths [1, 1, 2, 1] widths [16, 32, 64, 128]" in msg
    assert "... and " in msg and "more" in msg


# --------------------------------------------------------------------------------------------------
# load_vision_trunk: the accepted sources
# --------------------------------------------------------------------------------------------------


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

    trunk = W.load_vision_trunk(tmp_path / "clip")
    expected = {k: v for k, v in ref.visual.trunk.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in expected)

    model = ConvLlavaForConditionalGeneration(build_config(preset_for(ATTO_DEPTHS, ATTO_WIDTHS))).eval()
    W.load_trunk_into(model, trunk)
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
        W.load_vision_trunk(tmp_path / "clip")


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

    monkeypatch.setattr(W, "hf_hub_download", download)
    return asked


def test_open_clip_hub_id(monkeypatch, tmp_path):
    ref = write_open_clip_dir(tmp_path / "repo")
    asked = fake_hub(monkeypatch, tmp_path / "repo", "laion/tiny")
    trunk = W.load_vision_trunk("hf-hub:laion/tiny")
    assert asked == ["open_clip_model.safetensors", "open_clip_config.json"]
    assert torch.equal(trunk["stages.3.blocks.1.gamma"], ref.visual.trunk.stages[3].blocks[1].gamma)


def test_open_clip_hub_pickle_only_with_allow_pickle(monkeypatch, tmp_path):
    ref = write_open_clip_dir(tmp_path / "repo")
    os.remove(tmp_path / "repo" / "open_clip_model.safetensors")
    torch.save(ref.state_dict(), tmp_path / "repo" / "open_clip_pytorch_model.bin")
    asked = fake_hub(monkeypatch, tmp_path / "repo", "laion/tiny")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        W.load_vision_trunk("hf-hub:laion/tiny")
    assert "open_clip_pytorch_model.bin" not in asked  # not even downloaded
    trunk = W.load_vision_trunk("hf-hub:laion/tiny", allow_pickle=True)
    assert torch.equal(trunk["stem.0.weight"], ref.visual.trunk.stem[0].weight)


def test_hub_without_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(W, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="cannot download open_clip_model.safetensors"):
        W.load_vision_trunk("hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft")


def test_timm_safetensors_file(tmp_path):
    ref = small_timm()
    save_file(ref.state_dict(), tmp_path / "convnext.safetensors")
    trunk = W.load_vision_trunk(str(tmp_path / "convnext.safetensors"))
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in expected)


def test_pickle_refused_without_allow_pickle_then_loaded_with_weights_only(tmp_path):
    ref = small_timm()
    path = tmp_path / "convnext.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        W.load_vision_trunk(path)
    trunk = W.load_vision_trunk(path, allow_pickle=True)
    assert torch.equal(trunk["stages.2.blocks.1.mlp.fc2.weight"], ref.stages[2].blocks[1].mlp.fc2.weight)


def test_pickle_with_code_is_refused_even_with_allow_pickle(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"stem.0.weight": torch.zeros(1), "obj": nn.Linear(2, 2)}, path)  # a module: not weights_only
    with pytest.raises(CheckpointError, match="weights_only"):
        W.load_vision_trunk(path, allow_pickle=True)


def test_unknown_specs(tmp_path):
    with pytest.raises(CheckpointError, match="hf-hub:org/name"):
        W.load_vision_trunk("definitely_not_a_convnext")
    with pytest.raises(CheckpointError, match="no such file"):
        W.load_vision_trunk(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        W.load_vision_trunk(tmp_path / "empty")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no ConvNeXt trunk"):
        W.load_vision_trunk(tmp_path / "other.safetensors")


def test_timm_model_name(monkeypatch):
    ref = small_timm()
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return ref

    monkeypatch.setattr(timm, "create_model", create_model)
    trunk = W.load_vision_trunk("convnext_tiny.fb_in1k")
    assert calls == [("convnext_tiny.fb_in1k", True)]
    assert torch.equal(trunk["stem.1.weight"], ref.stem[1].weight)

    def no_network(name, pretrained=False, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(CheckpointError, match="timm could not load pretrained 'convnext_large'"):
        W.load_vision_trunk("convnext_large")


# --------------------------------------------------------------------------------------------------
# init_model, save/load of model directories
# --------------------------------------------------------------------------------------------------


def tiny_preset() -> ModelPreset:
    return preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS, stage5_depth=1, stage5_width=256, image_size=128)


def test_init_model_writes_a_loadable_dir_with_the_source_weights(tmp_path):
    src_llm = write_llm(tmp_path / "llm", vocab_size=60)
    ref = small_timm()
    save_file(ref.state_dict(), tmp_path / "trunk.safetensors")

    out = tmp_path / "stage0"
    W.init_model(tiny_preset(), out, llm=str(tmp_path / "llm"), vision=str(tmp_path / "trunk.safetensors"))
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model, processor = W.load_model_dir(out)
    assert isinstance(model, ConvLlavaForConditionalGeneration)
    # LLM weights are the source's, untouched (vocab 60 > 53 tokens: no resize).
    src_sd, ours = src_llm.state_dict(), model.language_model.state_dict()
    assert src_sd.keys() == ours.keys()
    assert all(torch.equal(src_sd[k], ours[k]) for k in src_sd)
    with torch.no_grad():
        assert torch.equal(
            _text_columns(model(input_ids=text_ids()).logits, model),
            _text_columns(src_llm(text_ids()).logits, model),
        )
    # Trunk from the timm checkpoint; stage 5 present and fresh.
    assert torch.equal(
        model.vision_tower.encoder.stages[3].layers[0].layer_scale_parameter, ref.stages[3].blocks[0].gamma
    )
    assert len(model.vision_tower.encoder.stages) == 5
    # Tokenizer + processor.
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == processor.image_token_id == 52
    assert processor.tokenizer.pad_token == "</s>"
    assert processor.image_processor.image_size == 128 and processor.image_processor.mode == "pad"
    assert processor.stride == model.config.image_stride == 64
    assert model.get_input_embeddings().num_embeddings == 60


def test_init_model_resizes_only_when_the_image_token_has_no_row(tmp_path):
    src_llm = write_llm(tmp_path / "llm", vocab_size=52)  # exactly the tokenizer's 52 tokens
    out = tmp_path / "out"
    model = W.init_model(tiny_preset(), out, llm=str(tmp_path / "llm"), dtype="bfloat16")
    assert model.config.image_token_id == 52
    assert model.get_input_embeddings().num_embeddings == 53
    reloaded, _ = W.load_model_dir(out)
    assert reloaded.dtype == torch.bfloat16  # saved dtype kept
    wte = reloaded.language_model.transformer.wte.weight
    assert torch.equal(wte[:52], src_llm.transformer.wte.weight.to(torch.bfloat16))
    fp32, _ = W.load_model_dir(out, dtype="float32")
    assert fp32.dtype == torch.float32


def test_init_model_of_a_preset_without_llm_or_trunk(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        W.init_model("tiny", tmp_path / "out")
    word_tokenizer().save_pretrained(tmp_path / "tok")
    model = W.init_model("tiny", tmp_path / "out", tokenizer=str(tmp_path / "tok"))
    assert model.config.image_token_id == 52
    assert model.get_input_embeddings().num_embeddings == 53  # the tokenizer's vocabulary, <image> included
    reloaded, processor = W.load_model_dir(tmp_path / "out")
    assert processor.image_processor.image_size == 128 and len(processor.tokenizer) == 53
    assert torch.equal(reloaded.projector[0].weight, model.projector[0].weight)
    # the tiny LLM is drawn at its preset's scale (0.08 at width 128), not GPT-2's 0.02
    llm = model.language_model
    for weight in (llm.get_input_embeddings().weight, llm.transformer.h[0].attn.c_attn.weight):
        assert abs(weight.detach().std().item() - 0.08) < 0.01


def test_save_model_dir_refuses_to_replace_a_foreign_directory(tmp_path):
    write_llm(tmp_path / "llm")
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model directory"):
        W.init_model(tiny_preset(), out, llm=str(tmp_path / "llm"))
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm", "results"]


def test_save_model_dir_replaces_an_older_model_dir(tmp_path):
    write_llm(tmp_path / "llm")
    out = tmp_path / "out"
    W.init_model(tiny_preset(), out, llm=str(tmp_path / "llm"))
    (out / "stale-shard.safetensors").write_text("old")
    model, processor = W.load_model_dir(out)
    W.save_model_dir(model, processor, out)
    assert not (out / "stale-shard.safetensors").exists()
    assert W.load_model_dir(out)[0].config.image_token_id == model.config.image_token_id


def test_load_model_dir_of_a_non_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        W.load_model_dir(tmp_path)


# --------------------------------------------------------------------------------------------------
# LLaVA-JP reference checkpoints
# --------------------------------------------------------------------------------------------------


class ReferenceLlavaJp:
    """A tiny checkpoint as the reference LLaVA-JP code writes it (ConvNeXt + added stage, GPT-2)."""

    def __init__(self, seed: int = 0, stage5_depth: int = 2, stage5_width: int = 256):
        torch.manual_seed(seed)
        vision = ConvNeXt(depths=TRUNK_DEPTHS, dims=TRUNK_WIDTHS)
        # As ConvNeXtCLIPVisionTower.add_stage: stage '4' appended, head replaced by Identity.
        vision.stages.add_module(
            "4",
            ConvNeXtStage(
                TRUNK_WIDTHS[-1],
                stage5_width,
                depth=stage5_depth,
                ls_init_value=1.0,
                norm_layer=LayerNorm2d,
                norm_layer_cl=LayerNorm,
            ),
        )
        vision.head = nn.Identity()
        self.vision = randomize(vision, seed)
        self.projector = randomize(
            nn.Sequential(nn.Linear(stage5_width, 32), nn.GELU(), nn.Linear(32, 32)), seed + 1
        )
        cfg = GPT2Config(
            **{k: v for k, v in TINY_TEXT.items() if k != "model_type"}, tie_word_embeddings=False
        )
        self.llm = randomize(GPT2LMHeadModel(cfg), seed + 2)
        self.stage5 = (stage5_depth, stage5_width)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"transformer.{k}": v for k, v in self.llm.transformer.state_dict().items()}
        sd["lm_head.weight"] = self.llm.lm_head.weight
        for k, v in self.vision.state_dict().items():
            # The reference's ConvNeXtBlock names its layer scale `weight` (not timm's `gamma`).
            k = k.replace(".gamma", ".weight")
            sd[f"model.vision_tower.vision_tower.{k}"] = v
        sd |= {f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()}
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def config(self) -> dict:
        return {
            "architectures": ["LlavaGpt2ForCausalLM"],
            "model_type": "llava-jp",
            "activation_function": "gelu_new",
            "attn_pdrop": 0.1,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "embd_pdrop": 0.1,
            "resid_pdrop": 0.1,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05,
            "n_embd": 32,
            "n_head": 2,
            "n_inner": None,
            "n_layer": 2,
            "n_positions": 64,
            "vocab_size": 60,
            "drop_path_rates": [0.085, 0.1],
            "image_aspect_ratio": "square",
            "mm_hidden_size": self.stage5[1],
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_resolution": 128,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": "convnext_large",
            "vision_add_five_stage": self.stage5[0],
            "vision_five_stage_width": self.stage5[1],
            "vision_encoder_type": "ConvNeXt",
            "tokenizer_model_max_length": 1532,
            "tokenizer_padding_side": "right",
            "torch_dtype": "float32",
            "transformers_version": "4.38.2",
            "use_mm_proj": True,
        }

    def write(self, path: Path, shards: int = 2, state: dict | None = None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state is None else state
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, path / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, name)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (path / "config.json").write_text(json.dumps(self.config()))
        word_tokenizer().save_pretrained(path)
        return path

    def logits_with_image(self, pre: list[int], image: torch.Tensor, post: list[int]) -> torch.Tensor:
        """As the reference's prepare_inputs_labels_for_multimodal: text, image features, text."""
        with torch.no_grad():
            feats = self.projector(features(self.vision, image[None]))[0]
            wte = self.llm.transformer.wte
            embeds = torch.cat([wte(torch.tensor(pre)), feats, wte(torch.tensor(post))])
            return self.llm(inputs_embeds=embeds[None]).logits


def test_convert_llava_jp_gives_the_reference_outputs(tmp_path):
    ref = ReferenceLlavaJp()
    src = ref.write(tmp_path / "ref")
    W.convert_llava_jp(src, tmp_path / "ours")

    model = ConvLlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    loaded, processor = W.load_model_dir(tmp_path / "ours")
    assert loaded.config.to_dict() == model.config.to_dict()
    vc = model.config.vision_config
    assert vc.depths == [1, 1, 2, 1, 2] and vc.hidden_sizes == [16, 32, 64, 128, 256]
    assert model.config.stage5_drop_path_rates == [0.085, 0.1]
    assert processor.image_processor.image_size == 128 and processor.image_processor.mode == "crop"

    x = images(size=128)
    with torch.no_grad():
        ours = model.encode_images(x)
    expected = features(ref.vision, x)
    assert ours.shape == expected.shape == (2, 4, 256)
    assert max_diff(ours, expected) <= 1e-5

    with torch.no_grad():
        text_logits = model(input_ids=text_ids()).logits
        ref_logits = ref.llm(text_ids()).logits
    assert (
        _text_columns(text_logits[..., :60], model) - _text_columns(ref_logits, model)
    ).abs().max().item() <= 1e-5

    # Image + text: our placeholder run against the reference's splice at IMAGE_TOKEN_INDEX.
    pre, post = [2, 5, 9], [11, 3]
    n = model.config.image_tokens(128, 128)
    ids = torch.tensor([pre + [model.config.image_token_id] * n + post])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=x[:1]).logits
    expected_logits = ref.logits_with_image(pre, x[0], post)
    assert (
        _text_columns(logits[..., :60], model) - _text_columns(expected_logits, model)
    ).abs().max().item() <= 1e-5


def test_convert_llava_jp_lists_missing_and_unexpected_keys(tmp_path):
    ref = ReferenceLlavaJp()
    state = ref.state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["model.mm_projector.4.weight"] = torch.zeros(32, 32)
    src = ref.write(tmp_path / "ref", state=state)
    with pytest.raises(CheckpointError) as info:
        W.convert_llava_jp(src, tmp_path / "ours")
    msg = str(info.value)
    assert "missing 1 key(s): language_model.transformer.h.1.mlp.c_fc.bias" in msg
    assert "unexpected 1 key(s): projector.4.weight" in msg
    assert not (tmp_path / "ours").exists()


def test_convert_llava_jp_config_must_match_the_weights(tmp_path):
    ref = ReferenceLlavaJp()
    src = ref.write(tmp_path / "ref")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_add_five_stage"] = 6
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vision_add_five_stage=6"):
        W.convert_llava_jp(src, tmp_path / "ours")


def test_convert_llava_jp_pickle_needs_allow_pickle(tmp_path):
    ref = ReferenceLlavaJp()
    src = tmp_path / "ref"
    ref.write(src)
    for p in src.glob("model*"):
        p.unlink()
    torch.save(ref.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        W.convert_llava_jp(src, tmp_path / "ours")
    W.convert_llava_jp(src, tmp_path / "ours", allow_pickle=True)
    assert (tmp_path / "ours" / "model.safetensors").is_file()


def test_convert_llava_jp_tied_lm_head_linear_projector_and_old_gpt2_buffers(tmp_path):
    ref = ReferenceLlavaJp(seed=3)
    ref.projector = randomize(nn.Linear(256, 32), 7)  # mm_projector_type "linear": a bare Linear
    state = ref.state_dict()
    del state["lm_head.weight"]  # tied: save_pretrained writes only the input embedding
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # transformers<4.31 buffers
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    src = ref.write(tmp_path / "ref", state=state)
    cfg = json.loads((src / "config.json").read_text()) | {
        "mm_projector_type": "linear",
        "tie_word_embeddings": True,
    }
    (src / "config.json").write_text(json.dumps(cfg))

    W.convert_llava_jp(src, tmp_path / "ours")
    model, _ = W.load_model_dir(tmp_path / "ours")
    assert model.config.text_config.tie_word_embeddings
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight[:60], ref.llm.transformer.wte.weight)
    with torch.no_grad():
        assert torch.equal(model.projector[0].weight, ref.projector.weight)
        ref.llm.lm_head.weight = ref.llm.transformer.wte.weight
        ours = _text_columns(model(input_ids=text_ids()).logits[..., :60], model)
        diff = (ours - _text_columns(ref.llm(text_ids()).logits, model)).abs().max().item()
    assert diff <= 1e-5


def test_convert_llava_jp_keeps_a_bf16_checkpoint_bf16(tmp_path):
    ref = ReferenceLlavaJp()
    state = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    W.convert_llava_jp(ref.write(tmp_path / "ref", state=state), tmp_path / "ours")
    model, _ = W.load_model_dir(tmp_path / "ours")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.projector[2].bias, state["model.mm_projector.2.bias"])
