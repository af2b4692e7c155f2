"""Tiny models and checkpoints in the real formats (timm, open_clip, GPT-2), shared by the convert tests."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.convnext import ConvNeXt
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from convllava_jp.model.presets import ModelPreset

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


def text_columns(logits: torch.Tensor, model) -> torch.Tensor:
    """Logits without the image placeholder's column (its embedding row is not the source model's)."""
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


def tiny_preset() -> ModelPreset:
    return preset_for(TRUNK_DEPTHS, TRUNK_WIDTHS, stage5_depth=1, stage5_width=256, image_size=128)
