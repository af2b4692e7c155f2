"""Named model presets: the article's models, a `small` one for benchmarks and a `tiny` one.

A preset is plain data; `build_config` turns it into a `ConvLlavaConfig`. The vision part is the
pretrained trunk (stages 1-4, as in timm's ConvNeXt of the same name) plus the added stage 5.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from transformers import AutoConfig, ConvNextConfig

from ..errors import ConfigError
from .configuration import ConvLlavaConfig

CONVNEXT_TRUNKS: dict[str, dict] = {
    # timm names -> stage depths / widths of stages 1-4
    "convnext_large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]},
    "convnext_base": {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]},
    "convnext_small": {"depths": [3, 3, 27, 3], "hidden_sizes": [96, 192, 384, 768]},
    "convnext_tiny": {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    "convnext_atto": {"depths": [2, 2, 6, 2], "hidden_sizes": [40, 80, 160, 320]},
}

LLM_JP_13B_V1 = {
    "model_type": "gpt2",
    "n_embd": 2048,
    "n_layer": 24,
    "n_head": 16,
    "n_positions": 2048,
    "vocab_size": 50570,
    "tie_word_embeddings": False,
    "bos_token_id": None,  # the real ids come with the tokenizer (`init --llm`)
    "eos_token_id": None,
}


def _llama(hidden, layers, heads, kv_heads, intermediate, vocab, max_pos, rope_theta, **extra) -> dict:
    """A Llama-architecture text config (ids come with the tokenizer at `init --llm`)."""
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rope_theta": rope_theta,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        **extra,
    }


# Text configs of the modern Japanese LLMs, from each model's published config.json on the HF hub.
LLM_CONFIGS: dict[str, dict] = {
    # llm-jp/llm-jp-3-1.8b (and -instruct): 24 layers, MHA
    "llm-jp/llm-jp-3-1.8b-instruct": _llama(2048, 24, 16, 16, 7168, 99584, 4096, 10000.0),
    # llm-jp/llm-jp-3-3.7b (and -instruct)
    "llm-jp/llm-jp-3-3.7b-instruct": _llama(3072, 28, 24, 24, 8192, 99584, 4096, 10000.0),
    # sbintuitions/sarashina2.2-1b(-instruct-v0.1): head_dim 112; 1.41B parameters = its 2.82 GB bf16 file
    "sbintuitions/sarashina2.2-1b-instruct-v0.1": _llama(
        1792, 24, 16, 8, 6272, 102400, 8192, 500000.0, head_dim=112
    ),
    # sbintuitions/sarashina2.2-3b(-instruct-v0.1)
    "sbintuitions/sarashina2.2-3b-instruct-v0.1": _llama(2560, 32, 16, 8, 8960, 102400, 8192, 500000.0),
    # Qwen/Qwen3-1.7B: tied embeddings, q/k norm (model_type qwen3)
    "Qwen/Qwen3-1.7B": {
        **_llama(2048, 28, 16, 8, 6144, 151936, 40960, 1000000.0, head_dim=128),
        "model_type": "qwen3",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # elyza/Llama-3-ELYZA-JP-8B: Meta-Llama-3-8B's architecture (config.json as Meta-Llama-3-8B-Instruct)
    "elyza/Llama-3-ELYZA-JP-8B": _llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
}


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    trunk_depths: list[int]
    trunk_widths: list[int]
    stage5_depth: int
    stage5_width: int
    text: dict
    projector_type: str = "mlp2x_gelu"
    image_size: int = 768
    image_mode: str = "crop"
    trunk: str | None = None  # timm name of the trunk, where it is a standard one
    stage5_drop_path_rates: list[float] = field(default_factory=lambda: [0.085, 0.1])
    llm: str | None = None  # hub id of the pretrained LLM the preset stands for
    vision: str | None = None  # open_clip / timm id of the pretrained trunk
    template: str = "llm-jp-v1"  # chat template of the instruction stage (model.templates)
    # ConvNeXt's start for each block's layer scale (1e-6: every block starts as the identity).
    layer_scale_init: float = 1e-6


_ARTICLE_768 = ModelPreset(
    name="convllava-jp-1.3b-768",
    description="The article's model: ConvNeXt-Large (CLIP) + stage 5, llm-jp-1.3b-v1.0, 768 px",
    trunk="convnext_large",
    trunk_depths=CONVNEXT_TRUNKS["convnext_large"]["depths"],
    trunk_widths=CONVNEXT_TRUNKS["convnext_large"]["hidden_sizes"],
    stage5_depth=6,
    stage5_width=3072,
    text=LLM_JP_13B_V1,
    image_size=768,
    llm="llm-jp/llm-jp-1.3b-v1.0",
    vision="hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft",
)

# ConvNeXt-L + stage 5 with a modern Japanese instruct LLM: name suffix, hub id, template.
_FAMILIES = [
    ("llm-jp-3-1.8b", "llm-jp/llm-jp-3-1.8b-instruct", "llm-jp-3"),
    ("llm-jp-3-3.7b", "llm-jp/llm-jp-3-3.7b-instruct", "llm-jp-3"),
    ("sarashina2.2-1b", "sbintuitions/sarashina2.2-1b-instruct-v0.1", "sarashina2.2"),
    ("sarashina2.2-3b", "sbintuitions/sarashina2.2-3b-instruct-v0.1", "sarashina2.2"),
    ("qwen3-1.7b", "Qwen/Qwen3-1.7B", "qwen3"),
    ("llama-3-elyza-8b", "elyza/Llama-3-ELYZA-JP-8B", "llama-3"),
]
_FAMILY_PRESETS = [
    replace(
        _ARTICLE_768,
        name=f"convllava-jp-{suffix}-768",
        description=f"ConvNeXt-Large (CLIP) + stage 5, {llm}, 768 px, template {template}",
        text=LLM_CONFIGS[llm],
        llm=llm,
        template=template,
    )
    for suffix, llm, template in _FAMILIES
]

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        _ARTICLE_768,
        replace(
            _ARTICLE_768,
            name="convllava-jp-1.3b-1280",
            description="As convllava-jp-1.3b-768 at 1280 px (400 image tokens)",
            image_size=1280,
        ),
        ModelPreset(
            name="small",
            description="Benchmark size: ConvNeXt-Tiny + stage 5 (width 1536, depth 2), GPT-2 124M, 384 px",
            trunk="convnext_tiny",
            trunk_depths=CONVNEXT_TRUNKS["convnext_tiny"]["depths"],
            trunk_widths=CONVNEXT_TRUNKS["convnext_tiny"]["hidden_sizes"],
            stage5_depth=2,
            stage5_width=1536,
            text={
                "model_type": "gpt2",
                "n_embd": 768,
                "n_layer": 12,
                "n_head": 12,
                "n_positions": 1024,
                "vocab_size": 50570,
                "tie_word_embeddings": False,
                "bos_token_id": None,
                "eos_token_id": None,
            },
            image_size=384,
        ),
        ModelPreset(
            name="tiny",
            description="Tests and the demo: 5-stage ConvNeXt (widths 16-256), GPT-2 width 128 x 2 layers, 128 px",
            trunk_depths=[1, 1, 2, 1],
            trunk_widths=[16, 32, 64, 128],
            stage5_depth=1,
            stage5_width=256,
            text={
                "model_type": "gpt2",
                "n_embd": 128,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 512,
                # About 1/sqrt(width): GPT-2's 0.02 suits widths of 768+ but leaves this LLM's token
                # embeddings far below the image tokens' norm (measurements in docs/training.md).
                "initializer_range": 0.08,
                # GPT-2's tanh GELU as one fused kernel (`gelu_new` is the same formula in ~8
                # elementwise ops): the tiny LLM's steps ~15% faster (docs/training.md).
                "activation_function": "gelu_pytorch_tanh",
                "vocab_size": 1024,
                "tie_word_embeddings": False,
                "bos_token_id": None,
                "eos_token_id": None,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
            },
            image_size=128,
            image_mode="pad",
            stage5_drop_path_rates=[0.0, 0.0],
            # Trained from random weights in minutes (the demo's CLIP stand-in), not from a
            # checkpoint: blocks that start at a tenth of their output learn the world's shapes
            # sooner (held-out cell shape 99.5% against 98.0% after the same steps, seed 1).
            layer_scale_init=0.1,
        ),
        *_FAMILY_PRESETS,
    ]
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def build_vision_config(
    trunk_depths: list[int],
    trunk_widths: list[int],
    stage5_depth: int,
    stage5_width: int,
    drop_path_rate: float = 0.0,
    layer_scale_init: float = 1e-6,
) -> ConvNextConfig:
    """ConvNextConfig of the trunk plus stage 5 as a fifth stage (none when stage5_depth == 0)."""
    if stage5_depth < 0:
        raise ConfigError(f"stage5_depth must be >= 0, got {stage5_depth}")
    depths, widths = list(trunk_depths), list(trunk_widths)
    if stage5_depth:
        depths.append(stage5_depth)
        widths.append(stage5_width)
    return ConvNextConfig(
        num_stages=len(depths),
        depths=depths,
        hidden_sizes=widths,
        patch_size=4,
        layer_scale_init_value=layer_scale_init,
        drop_path_rate=drop_path_rate,
        layer_norm_eps=1e-6,
    )


def build_config(
    preset: str | ModelPreset,
    *,
    text_config=None,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    stage5_depth: int | None = None,
    stage5_width: int | None = None,
    projector_type: str | None = None,
) -> ConvLlavaConfig:
    """ConvLlavaConfig of a preset; `text_config` (e.g. a real LLM's config) replaces the preset's.

    Without a tokenizer the image placeholder id defaults to `vocab_size` (one past the
    vocabulary: placeholders are never embedded).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    vision = build_vision_config(
        p.trunk_depths,
        p.trunk_widths,
        p.stage5_depth if stage5_depth is None else stage5_depth,
        p.stage5_width if stage5_width is None else stage5_width,
        layer_scale_init=p.layer_scale_init,
    )
    if text_config is None:
        text = dict(p.text)
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        text_config = AutoConfig.for_model(**text)
    vocab = text_config.vocab_size
    return ConvLlavaConfig(
        vision_config=vision,
        text_config=text_config,
        projector_type=projector_type or p.projector_type,
        image_token_id=vocab if image_token_id is None else image_token_id,
        trunk_stages=len(p.trunk_depths),
        stage5_drop_path_rates=list(p.stage5_drop_path_rates),
    )
