"""Checkpoints of the reference LLaVA-JP code (github tosiyuki/LLaVA-JP: GPT-2 LLM + ConvNeXt with an
added fifth stage) as model directories of ours."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from ..errors import CheckpointError, ConfigError
from ..model.configuration import ConvLlavaConfig
from ..model.model_dir import save_model_dir
from ..model.modeling import ConvLlavaForConditionalGeneration
from ..model.presets import build_vision_config
from .convnext_keys import TIMM_NON_TRUNK, convnext_arch, timm_convnext_to_hf
from .init import make_processor, prepare_tokenizer
from .state_dicts import check_keys, key_list, read_state_dict

logger = logging.getLogger(__name__)

# GPT-2 fields of the reference config (a GPT2Config subclass with the mm_* fields added).
_GPT2_FIELDS = (
    "activation_function",
    "attn_pdrop",
    "bos_token_id",
    "embd_pdrop",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "layer_norm_epsilon",
    "n_embd",
    "n_head",
    "n_inner",
    "n_layer",
    "n_positions",
    "reorder_and_upcast_attn",
    "resid_pdrop",
    "scale_attn_by_inverse_layer_idx",
    "scale_attn_weights",
    "use_cache",
    "vocab_size",
)
_LLAVA_JP_VISION = "model.vision_tower.vision_tower."
_LLAVA_JP_PROJECTOR = "model.mm_projector."
# Causal-mask buffers older transformers saved with GPT-2; not weights.
_GPT2_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _read_llava_jp_weights(src: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return read_state_dict(src / "model.safetensors", allow_pickle)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a shard index (weight_map): {e}") from e
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_state_dict(src / shard, allow_pickle))
            return state
    if (src / "pytorch_model.bin").is_file():
        return read_state_dict(src / "pytorch_model.bin", allow_pickle)
    raise CheckpointError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _llava_jp_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the LLaVA-JP config: {e}") from e
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llava-jp", "llava") and "LlavaGpt2ForCausalLM" not in archs:
        raise CheckpointError(
            f"{path}: model_type {cfg.get('model_type')!r} / architectures {archs} is not a LLaVA-JP "
            "checkpoint (model_type llava-jp, LlavaGpt2ForCausalLM)"
        )
    if archs and "LlavaGpt2ForCausalLM" not in archs:
        raise CheckpointError(f"{path}: only the GPT-2 LLaVA-JP models are supported, this is {archs}")
    return cfg


@dataclass
class _VisionArch:
    """The reference's ConvNeXt as read from its weights: pretrained trunk + at most one added stage."""

    depths: list[int]
    widths: list[int]
    trunk_stages: int
    stage5_depth: int
    stage5_width: int


def _vision_arch(src: Path, cfg: dict, vision_timm: dict[str, torch.Tensor]) -> _VisionArch:
    """Depths and widths from the weights, checked against the config's `vision_*` / `mm_*` fields."""
    depths, widths = convnext_arch(vision_timm)
    trunk_stages = min(4, len(depths))
    if len(depths) > trunk_stages + 1:
        raise CheckpointError(f"{src}: {len(depths)} ConvNeXt stages; at most one added stage is supported")
    stage5_depth = sum(depths[trunk_stages:])
    stage5_width = widths[trunk_stages] if stage5_depth else 0
    added = int(cfg.get("vision_add_five_stage", 0) or 0)
    if added != stage5_depth or (
        stage5_depth and int(cfg.get("vision_five_stage_width", stage5_width)) != stage5_width
    ):
        raise CheckpointError(
            f"{src}: config says vision_add_five_stage={cfg.get('vision_add_five_stage')}, "
            f"vision_five_stage_width={cfg.get('vision_five_stage_width')}, but the weights have an added "
            f"stage of depth {stage5_depth} and width {stage5_width}"
        )
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != widths[-1]:
        raise CheckpointError(
            f"{src}: mm_hidden_size {mm_hidden} but the vision tower outputs {widths[-1]} channels"
        )
    return _VisionArch(depths, widths, trunk_stages, stage5_depth, stage5_width)


def _lm_head_is_tied(cfg: dict, weights: dict[str, torch.Tensor]) -> bool:
    """Tied when there is no `lm_head.weight`, or the config ties it and it equals the embedding."""
    if "lm_head.weight" not in weights:
        return True
    wte = weights.get("transformer.wte.weight")
    return (
        bool(cfg.get("tie_word_embeddings", False))
        and wte is not None
        and torch.equal(weights["lm_head.weight"], wte)
    )


def _our_config(cfg: dict, arch: _VisionArch, tied: bool) -> ConvLlavaConfig:
    """The reference config's GPT-2 and `mm_*` fields as a `ConvLlavaConfig`."""
    text_config = AutoConfig.for_model(
        "gpt2", **{k: cfg[k] for k in _GPT2_FIELDS if k in cfg}, tie_word_embeddings=tied
    )
    rates = cfg.get("drop_path_rates") or [0.0]
    n = arch.trunk_stages
    return ConvLlavaConfig(
        vision_config=build_vision_config(
            arch.depths[:n], arch.widths[:n], arch.stage5_depth, arch.stage5_width
        ),
        text_config=text_config,
        projector_type=cfg.get("mm_projector_type", "linear"),
        image_token_id=text_config.vocab_size,
        trunk_stages=n,
        stage5_drop_path_rates=[float(rates[0]), float(rates[-1])],
    )


def _map_keys(src: Path, weights: dict[str, torch.Tensor], vision_timm: dict) -> dict[str, torch.Tensor]:
    """Reference keys -> ours: `transformer.*` / `lm_head.weight` -> `language_model.*`, the ConvNeXt
    -> `vision_tower.*`, `model.mm_projector.{i}.*` (or `.weight/.bias` of a bare `linear`) ->
    `projector.{i}.*`."""
    mapped = timm_convnext_to_hf(vision_timm, prefix="vision_tower.")
    unknown: list[str] = []
    for key, value in weights.items():
        if key.startswith(_LLAVA_JP_VISION) or _GPT2_BUFFERS.fullmatch(key):
            continue
        if key.startswith("transformer.") or key == "lm_head.weight":
            mapped["language_model." + key] = value
        elif key.startswith(_LLAVA_JP_PROJECTOR):
            rest = key[len(_LLAVA_JP_PROJECTOR) :]
            mapped["projector." + (rest if rest[0].isdigit() else "0." + rest)] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{src}: keys that are not LLM, vision tower or projector: {key_list(unknown)}")
    return mapped


def _load_model(
    src: Path, config: ConvLlavaConfig, mapped: dict, tied: bool
) -> ConvLlavaForConditionalGeneration:
    """Our model with every weight taken from `mapped` (built on the meta device: nothing is initialised)."""
    try:
        with torch.device("meta"):
            model = ConvLlavaForConditionalGeneration(config)
    except ConfigError as e:
        raise CheckpointError(
            f"{src}: mm_projector_type {config.projector_type!r} is not supported: {e}"
        ) from e
    if tied:
        mapped.pop("language_model.lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(str(src), expected, mapped, optional=["language_model.lm_head.weight"] if tied else [])
    model.load_state_dict(mapped, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise CheckpointError(f"{src}: weights the checkpoint does not provide: {key_list(left)}")
    if len({param.dtype for param in model.parameters()}) > 1:
        model.float()  # a checkpoint with mixed dtypes: one dtype for the whole model
    return model


def convert_llava_jp(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, allow_pickle: bool = False
) -> ConvLlavaForConditionalGeneration:
    """Import a ConvLLaVA checkpoint of the reference LLaVA-JP code as a model directory of ours.

    Reads `config.json` (GPT-2 fields + `mm_vision_resolution`, `vision_add_five_stage`,
    `vision_five_stage_width`, `mm_projector_type`, `drop_path_rates`, `image_aspect_ratio`), the
    weights (`model.safetensors`, sharded safetensors, or `pytorch_model.bin` with `allow_pickle`)
    and the tokenizer; writes model + processor to `dst_dir` and returns the model. The ConvNeXt's
    depths and widths are read from the weights (the added stage is timm's `stages.4`).

    Raises:
        CheckpointError: not a GPT-2 + ConvNeXt LLaVA-JP checkpoint, or keys that do not fit (listed).
    """
    src = Path(src_dir)
    cfg = _llava_jp_config(src)
    weights = _read_llava_jp_weights(src, allow_pickle)
    vision_timm = {
        k[len(_LLAVA_JP_VISION) :]: v
        for k, v in weights.items()
        if k.startswith(_LLAVA_JP_VISION) and not k[len(_LLAVA_JP_VISION) :].startswith(TIMM_NON_TRUNK)
    }
    if not vision_timm:
        raise CheckpointError(
            f"{src}: no ConvNeXt vision tower weights ({_LLAVA_JP_VISION}stem.*); a CLIP-ViT LLaVA-JP "
            "checkpoint cannot be converted to ConvLLaVA"
        )
    arch = _vision_arch(src, cfg, vision_timm)
    tied = _lm_head_is_tied(cfg, weights)
    config = _our_config(cfg, arch, tied)
    model = _load_model(src, config, _map_keys(src, weights, vision_timm), tied)

    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(src)
    prepare_tokenizer(tokenizer, model)
    resolution = int(cfg.get("mm_vision_resolution", 768))
    mode = "pad" if cfg.get("image_aspect_ratio") == "pad" else "crop"
    save_model_dir(model, make_processor(tokenizer, resolution, mode, config.image_stride), dst_dir)
    logger.info(
        "converted %s -> %s (ConvNeXt depths %s widths %s, projector %s, %d px, %s)",
        src,
        dst_dir,
        arch.depths,
        arch.widths,
        config.projector_type,
        resolution,
        mode,
    )
    return model
