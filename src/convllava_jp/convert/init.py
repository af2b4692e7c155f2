"""The starting model of stage 1: pretrained LLM + pretrained ConvNeXt trunk + fresh stage 5 and
projector, written with its processor as a model directory."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data.constants import IMAGE_TOKEN
from ..errors import CheckpointError, ConfigError
from ..model.image_processing import ConvLlavaImageProcessor
from ..model.model_dir import resolve_dtype, save_model_dir
from ..model.modeling import ConvLlavaForConditionalGeneration
from ..model.presets import ModelPreset, build_config, get_preset
from ..model.processing import ConvLlavaProcessor, add_image_token
from .state_dicts import check_keys
from .vision_trunk import load_trunk_into, load_vision_trunk

logger = logging.getLogger(__name__)


def prepare_tokenizer(tokenizer, model: ConvLlavaForConditionalGeneration) -> int:
    """Pad token (EOS if none), `<image>` token and chat templates; model resized if needed.

    Sets and returns `model.config.image_token_id`.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    image_token_id = add_image_token(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    needed = max(len(tokenizer), image_token_id + 1)
    if needed > rows:
        # The placeholder is never embedded, but keep every tokenizer id a valid embedding row.
        model.resize_token_embeddings(needed)
        logger.info("resized token embeddings %d -> %d (%s id %d)", rows, needed, IMAGE_TOKEN, image_token_id)
    model.set_image_token_id(image_token_id)
    return image_token_id


def make_processor(tokenizer, image_size: int, mode: str, stride: int) -> ConvLlavaProcessor:
    """A `ConvLlavaProcessor` around `tokenizer` with the given image settings."""
    return ConvLlavaProcessor(
        ConvLlavaImageProcessor(image_size=image_size, mode=mode, stride=stride), tokenizer
    )


def _add_stop_ids(
    model: ConvLlavaForConditionalGeneration, processor: ConvLlavaProcessor, template: str
) -> None:
    """The preset's template's end-of-turn token joins `generation_config.eos_token_id`, so plain
    `model.generate` stops there too (`VLMPipeline` adds the template it is given on load)."""
    config = model.generation_config
    ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    ids = [i for i in ids if i is not None]
    ids += [i for i in processor.stop_token_ids(template) if i not in ids]
    if ids:
        config.eos_token_id = ids


def _load_llm_into(model: ConvLlavaForConditionalGeneration, llm: str) -> None:
    """The causal LM's weights (and generation config) into `model.language_model`."""
    source = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
    source_state = source.state_dict()
    expected = {k: v.shape for k, v in model.language_model.state_dict().items()}
    check_keys(f"LLM {llm}", expected, source_state)
    model.language_model.load_state_dict(source_state)
    if source.generation_config is not None:
        model.generation_config = source.generation_config


def init_model(
    preset: str | ModelPreset,
    output_dir: str | os.PathLike,
    llm: str | None = None,
    vision: str | None = None,
    tokenizer: str | None = None,
    allow_pickle: bool = False,
    dtype: str | torch.dtype | None = None,
) -> ConvLlavaForConditionalGeneration:
    """Write the starting model of stage 1 to `output_dir` and return it.

    Args:
        preset: a preset name (`convllava-jp-1.3b-768`, ...) or a `ModelPreset`.
        llm: HF hub id or local directory of the causal LM (`AutoModelForCausalLM`); its config
            replaces the preset's text config. Default: the preset's LLM; a preset without one
            gets a randomly initialised LLM of the preset's size.
        vision: the ConvNeXt trunk, any form `load_vision_trunk` accepts. Default: the preset's;
            a preset without one keeps a fresh trunk.
        tokenizer: hub id or directory of the tokenizer; default the LLM's (required when no LLM).
        allow_pickle: allow pickle checkpoints for the trunk (`torch.load(weights_only=True)`).
        dtype: dtype of the saved weights (default float32).

    Stage 5 and the projector start fresh. `<image>` is added to the tokenizer and
    `config.image_token_id` set to its id; the embeddings grow only if that id has no row.
    """
    p = preset if isinstance(preset, ModelPreset) else get_preset(preset)
    llm = llm if llm is not None else p.llm
    vision = vision if vision is not None else p.vision
    tokenizer_source = tokenizer if tokenizer is not None else llm
    if tokenizer_source is None:
        raise ConfigError(f"preset {p.name!r} names no LLM: give a tokenizer (hub id or directory) or an LLM")
    torch_dtype = resolve_dtype(dtype)
    tok = AutoTokenizer.from_pretrained(tokenizer_source)

    if llm is not None:
        logger.info("loading LLM %s", llm)
        model = ConvLlavaForConditionalGeneration(
            build_config(p, text_config=AutoConfig.from_pretrained(llm))
        )
        _load_llm_into(model, llm)
    else:
        logger.warning("preset %s names no LLM: the language model starts from random weights", p.name)
        # A fresh LLM gets exactly the tokenizer's vocabulary (with <image>).
        model = ConvLlavaForConditionalGeneration(
            build_config(p, vocab_size=len(tok) + (IMAGE_TOKEN not in tok.get_vocab()))
        )
    if vision is not None:
        load_trunk_into(model, load_vision_trunk(vision, allow_pickle=allow_pickle))
    else:
        logger.warning(
            "preset %s names no vision trunk: the ConvNeXt stages start from random weights", p.name
        )

    prepare_tokenizer(tok, model)
    if torch_dtype is not None:
        model.to(torch_dtype)
    processor = make_processor(tok, p.image_size, p.image_mode, model.config.image_stride)
    _add_stop_ids(model, processor, p.template)
    save_model_dir(model, processor, output_dir)
    return model
