"""convert_llava_jp: reference LLaVA-JP checkpoints (written by the test in the reference's key
names) give the reference's outputs as model dirs of ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXt, ConvNeXtStage
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from convllava_jp.convert.llava_jp import convert_llava_jp
from convllava_jp.errors import CheckpointError
from convllava_jp.model import ConvLlavaForConditionalGeneration
from convllava_jp.model.model_dir import load_model_dir

from ._support import (
    TINY_TEXT,
    TRUNK_DEPTHS,
    TRUNK_WIDTHS,
    features,
    images,
    max_diff,
    randomize,
    text_columns,
    text_ids,
    word_tokenizer,
)


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
    convert_llava_jp(src, tmp_path / "ours")

    model = ConvLlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    loaded, processor = load_model_dir(tmp_path / "ours")
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
        text_columns(text_logits[..., :60], model) - text_columns(ref_logits, model)
    ).abs().max().item() <= 1e-5

    # Image + text: our placeholder run against the reference's splice at IMAGE_TOKEN_INDEX.
    pre, post = [2, 5, 9], [11, 3]
    n = model.config.image_tokens(128, 128)
    ids = torch.tensor([pre + [model.config.image_token_id] * n + post])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=x[:1]).logits
    expected_logits = ref.logits_with_image(pre, x[0], post)
    assert (
        text_columns(logits[..., :60], model) - text_columns(expected_logits, model)
    ).abs().max().item() <= 1e-5


def test_convert_llava_jp_lists_missing_and_unexpected_keys(tmp_path):
    ref = ReferenceLlavaJp()
    state = ref.state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["model.mm_projector.4.weight"] = torch.zeros(32, 32)
    src = ref.write(tmp_path / "ref", state=state)
    with pytest.raises(CheckpointError) as info:
        convert_llava_jp(src, tmp_path / "ours")
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
        convert_llava_jp(src, tmp_path / "ours")


def test_convert_llava_jp_pickle_needs_allow_pickle(tmp_path):
    ref = ReferenceLlavaJp()
    src = tmp_path / "ref"
    ref.write(src)
    for p in src.glob("model*"):
        p.unlink()
    torch.save(ref.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert_llava_jp(src, tmp_path / "ours")
    convert_llava_jp(src, tmp_path / "ours", allow_pickle=True)
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

    convert_llava_jp(src, tmp_path / "ours")
    model, _ = load_model_dir(tmp_path / "ours")
    assert model.config.text_config.tie_word_embeddings
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight[:60], ref.llm.transformer.wte.weight)
    with torch.no_grad():
        assert torch.equal(model.projector[0].weight, ref.projector.weight)
        ref.llm.lm_head.weight = ref.llm.transformer.wte.weight
        ours = text_columns(model(input_ids=text_ids()).logits[..., :60], model)
        diff = (ours - text_columns(ref.llm(text_ids()).logits, model)).abs().max().item()
    assert diff <= 1e-5


def test_convert_llava_jp_keeps_a_bf16_checkpoint_bf16(tmp_path):
    ref = ReferenceLlavaJp()
    state = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    convert_llava_jp(ref.write(tmp_path / "ref", state=state), tmp_path / "ours")
    model, _ = load_model_dir(tmp_path / "ours")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.projector[2].bias, state["model.mm_projector.2.bias"])
