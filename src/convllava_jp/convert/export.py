"""Export a model dir to transformers' own `FastVlmForConditionalGeneration` (no custom code).

A ConvLLaVA model has FastVLM's shape: the vision tower is `AutoModel.from_config(vision_config)`
(our 5-stage `ConvNextModel`), image features are its `last_hidden_state` flattened to
(B, H*W, C), the projector is Linear -> act -> Linear, and the text model is
`AutoModel.from_config(text_config)` with a separate `lm_head`. So the exported dir loads with
`AutoModelForImageTextToText`, TRL, the Hub and vLLM's Transformers backend, without this package.

What cannot be carried is refused with `ExportError` naming the reason (a projector other than
`linear` / `mlp2x_gelu`, a `keep-aspect` or non-square image processor, an LM head with a bias).
Every export is verified before it is published: the exported model, reloaded from disk with
`AutoModelForImageTextToText`, must give our logits on a probe input (one image, text around it),
so a family that transformers reloads wrongly is refused, not written.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..data.constants import IMAGE_TOKEN
from ..errors import ConfigError
from ..io import publish_dir
from ..model.model_dir import load_model_dir
from ..model.modeling import ConvLlavaForConditionalGeneration
from ..model.processing import ConvLlavaProcessor

logger = logging.getLogger(__name__)

FORMATS = ("transformers",)


class ExportError(ConfigError):
    """A model the requested format cannot carry exactly (says which part and what to do)."""


# What to do with a model the export refuses.
NO_EXPORT = (
    "serve it with the built-in engine (`convllava-jp serve`); vLLM would need the out-of-tree "
    "model plugin (issue 16), not built yet"
)


def _family(model: ConvLlavaForConditionalGeneration) -> str:
    return model.config.text_config.model_type


# --- weights -----------------------------------------------------------------------------------
def _projector_state(model: ConvLlavaForConditionalGeneration) -> tuple[dict[str, torch.Tensor], str]:
    """FastVLM's `multi_modal_projector` (linear_1, act, linear_2) weights and activation name.

    `mlp2x_gelu` maps as it is; `linear` becomes linear_1 -> identity act -> linear_2 = I (exact:
    multiplying by 1 and adding zeros rounds nothing).
    """
    kind = model.config.projector_type
    layers = [m for m in model.projector if isinstance(m, nn.Linear)]
    if kind == "mlp2x_gelu":
        first, second = layers
        act = "gelu"
        w2, b2 = second.weight, second.bias
    elif kind == "linear":
        (first,) = layers
        act = "linear"
        d = first.out_features
        w2 = torch.eye(d, dtype=first.weight.dtype)
        b2 = torch.zeros(d, dtype=first.weight.dtype)
    else:
        raise ExportError(
            f"projector {kind!r} cannot be exported to FastVLM (its projector is Linear-act-Linear); "
            f"only linear and mlp2x_gelu can: {NO_EXPORT}"
        )
    state = {
        "linear_1.weight": first.weight,
        "linear_1.bias": first.bias,
        "linear_2.weight": w2,
        "linear_2.bias": b2,
    }
    return state, act


def _language_parts(model: ConvLlavaForConditionalGeneration) -> tuple[nn.Module, nn.Linear]:
    """(the LM's base model, its LM head); refuses heads FastVLM's bias-free `lm_head` cannot hold."""
    lm = model.language_model
    base = lm.base_model
    head = lm.get_output_embeddings()
    family = _family(model)
    if base is lm or not isinstance(head, nn.Linear):
        raise ExportError(
            f"{family}: the language model {type(lm).__name__} has no separate base model + linear LM head; "
            f"FastVLM cannot hold it: {NO_EXPORT}"
        )
    if head.bias is not None:
        raise ExportError(f"{family}: the LM head has a bias, FastVLM's lm_head has none: {NO_EXPORT}")
    return base, head


def gpt2_as_gpt_bigcode(text: dict, base: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GPT-2 as the same network in GPTBigCode's form (`multi_query=False`): config and weights.

    Why: vLLM's Transformers backend drops every checkpoint key matching GPT-2's ignore pattern
    `attn.bias`, which includes the real `attn.c_attn.bias` (vLLM 0.32), so a GPT-2 served there
    runs without its QKV bias. GPTBigCode is GPT-2's block with Linear instead of Conv1D (weights
    transposed) and Q/K/V interleaved per head in `c_attn` (rows permuted): a relabelling, exact.
    """
    if text.get("scale_attn_by_inverse_layer_idx") or text.get("reorder_and_upcast_attn"):
        raise ExportError(
            "gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn have no GPTBigCode "
            f"equivalent: {NO_EXPORT}"
        )
    heads, width = text["n_head"], text["n_embd"]
    head_dim = width // heads
    config = {
        "model_type": "gpt_bigcode",
        "multi_query": False,
        "scale_attn_weights": text.get("scale_attn_weights", True),
        **{
            key: text[key]
            for key in (
                "vocab_size",
                "n_positions",
                "n_embd",
                "n_layer",
                "n_head",
                "n_inner",
                "activation_function",
                "resid_pdrop",
                "embd_pdrop",
                "attn_pdrop",
                "layer_norm_epsilon",
                "initializer_range",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "use_cache",
            )
            if key in text
        },
    }
    state = {}
    for key, value in base.items():
        if key.endswith("attn.c_attn.weight"):  # Conv1D (E, 3E) [Q|K|V] -> Linear (3E, E), per head
            value = value.t().reshape(3, heads, head_dim, width).transpose(0, 1).reshape(3 * width, width)
        elif key.endswith("attn.c_attn.bias"):
            value = value.reshape(3, heads, head_dim).transpose(0, 1).reshape(3 * width)
        elif key.endswith(("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            value = value.t()
        state[key] = value
    return config, state


def _text_part(model: ConvLlavaForConditionalGeneration) -> tuple[dict, dict[str, torch.Tensor], nn.Linear]:
    """(text config dict, base-model weights, LM head) in the form the export writes."""
    base, head = _language_parts(model)
    text = model.config.text_config.to_dict()
    text["tie_word_embeddings"] = False  # lm_head is written out (tied keys differ per family)
    state = dict(base.state_dict())
    if text["model_type"] == "gpt2":
        text, state = gpt2_as_gpt_bigcode(text, state)
        text["tie_word_embeddings"] = False
    return text, state, head


def fastvlm_state_dict(
    model: ConvLlavaForConditionalGeneration,
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Our weights under FastVLM's keys (LM head untied), the text config dict, the projector act."""
    text, base_state, head = _text_part(model)
    projector, act = _projector_state(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision_tower.state_dict().items():
        state[f"model.vision_tower.{key}"] = value
    # ConvNextModel's pooled-output norm: unused by FastVLM's features, but a key it expects.
    width = model.config.vision_hidden_size
    dtype = next(model.vision_tower.parameters()).dtype
    state["model.vision_tower.layernorm.weight"] = torch.ones(width, dtype=dtype)
    state["model.vision_tower.layernorm.bias"] = torch.zeros(width, dtype=dtype)
    for key, value in projector.items():
        state[f"model.multi_modal_projector.{key}"] = value
    for key, value in base_state.items():
        state[f"model.language_model.{key}"] = value
    state["lm_head.weight"] = head.weight
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, text, act


def fastvlm_config(model: ConvLlavaForConditionalGeneration, text_dict: dict, projector_act: str):
    """`FastVlmConfig`: our ConvNeXt config (+ `hidden_size`), the exported text config, untied."""
    from transformers import AutoConfig, ConvNextConfig, FastVlmConfig

    ours = model.config
    vision = ConvNextConfig(**ours.vision_config.to_dict())
    vision.drop_path_rate = 0.0
    vision.hidden_size = ours.vision_hidden_size  # the projector reads vision_config.hidden_size
    text = AutoConfig.for_model(**text_dict)
    config = FastVlmConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ours.image_token_id,
        image_seq_length=1,
        projector_hidden_act=projector_act,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["FastVlmForConditionalGeneration"]
    return config


# --- processor ---------------------------------------------------------------------------------
_GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")
_CONTENT = re.compile(r"""messages?(\[0\]|\[-1\])?(\['content'\]|\["content"\]|\.content)""")
# OpenAI-style content (a list of parts) rendered as our prompts are: one `<image>` line per image
# part first, then the text parts; a string is used as it is.
_CONTENT_MACRO = (
    "{% macro convllava_content(c) %}{% if c is string %}{{ c }}{% else %}"
    "{% for part in c %}{% if part['type'] in ['image', 'image_url'] %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% endif %}{% endfor %}{% for part in c %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endmacro %}"
)


def chat_template_text(processor: ConvLlavaProcessor, template: str) -> str:
    """The named template's Jinja text for the export: plain Jinja, any content form.

    The export carries this one template as a plain string: vLLM 0.32's server fails on a
    tokenizer whose chat template is a dict of named templates, and plain Jinja (no
    transformers extension) must compile it, so the training-only `{% generation %}` markers go.
    Message contents pass through a macro that also takes OpenAI-style lists of parts, so a
    chat request with images (`--chat-template-content-format openai`) gets its `<image>` lines
    where ours go: vLLM's Transformers backend inserts no placeholder of its own.
    """
    source = _GENERATION_TAG.sub("", processor.template_source(template))
    return _CONTENT_MACRO + _CONTENT.sub(lambda m: f"convllava_content({m.group(0)})", source)


def fastvlm_processor(processor: ConvLlavaProcessor, template: str = "llm-jp-v1"):
    """A `LlavaProcessor` that expands `<image>` as ours does: (H/stride) * (W/stride) tokens.

    `crop` becomes a CLIP image processor (resize the short side, center crop), `pad` LLaVA's
    (pad to square with the mean colour, then resize); both bicubic with our mean/std.
    `keep-aspect` and non-square targets have no transformers equivalent and are refused.
    The tokenizer is a copy whose chat template is `template` alone.
    """
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

    ip = processor.image_processor
    size = ip.image_size if isinstance(ip.image_size, int) else list(ip.image_size)
    if not isinstance(size, int):
        if len(size) != 2 or size[0] != size[1]:
            raise ExportError(
                f"image size {size} is not square: transformers' CLIP/LLaVA image processors cannot "
                f"reproduce our resize: {NO_EXPORT}"
            )
        size = size[0]
    if ip.mode not in ("crop", "pad"):
        raise ExportError(
            f"image mode {ip.mode!r} has no transformers image processor (only crop and pad do): "
            f"{NO_EXPORT}; or save its processor with mode crop or pad first"
        )
    common = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_resize": True,
        "resample": 3,  # PIL.Image.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "do_convert_rgb": True,
    }
    if ip.mode == "pad":
        image_processor = LlavaImageProcessor(do_pad=True, **common)
    else:
        image_processor = CLIPImageProcessor(**common)
    chat_template = chat_template_text(processor, template)
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = chat_template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=processor.stride,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    )


# --- verification ------------------------------------------------------------------------------
def _probe_inputs(model: ConvLlavaForConditionalGeneration, image_size: int) -> dict[str, torch.Tensor]:
    """One image at the processor's size, a few text ids before and after its placeholders."""
    gen = torch.Generator().manual_seed(0)
    config = model.config
    vocab = config.text_config.vocab_size
    n_image = config.image_tokens(image_size, image_size)
    ids = torch.randint(0, vocab, (1, 8), generator=gen)
    ids[ids == config.image_token_id] = 0
    image = torch.full((1, n_image), config.image_token_id)
    input_ids = torch.cat([ids[:, :4], image, ids[:, 4:]], dim=1)
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=gen)
    return {"input_ids": input_ids, "pixel_values": pixel_values}


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].to(dtype))
    return out.logits.float()


def check_logits(expected: torch.Tensor, got: torch.Tensor, family: str, where: str) -> float:
    """Max |difference|; raises ExportError naming the family when it is not float noise."""
    if got.shape != expected.shape:
        raise ExportError(
            f"{family}: the exported model ({where}) gives logits of shape {tuple(got.shape)}, "
            f"ours {tuple(expected.shape)}: transformers cannot carry this family exactly: {NO_EXPORT}"
        )
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max()) + 1.0
    if not diff <= 1e-4 * scale:
        raise ExportError(
            f"{family}: the exported model ({where}) differs from ours by {diff:.3g} in the logits: "
            f"transformers cannot carry this family exactly: {NO_EXPORT}"
        )
    return diff


# --- the command -------------------------------------------------------------------------------
def to_fastvlm(model: ConvLlavaForConditionalGeneration):
    """An in-memory `FastVlmForConditionalGeneration` with our weights (dtype kept)."""
    from transformers import FastVlmForConditionalGeneration

    state, text, act = fastvlm_state_dict(model)
    config = fastvlm_config(model, text, act)
    dtype = next(model.parameters()).dtype
    # Built on the CPU, not on meta: non-persistent buffers (rotary inv_freq) must be computed.
    exported = FastVlmForConditionalGeneration(config)
    try:
        exported.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(
            f"{_family(model)}: FastVLM's {type(exported.model.language_model).__name__} does not take "
            f"our {type(model.language_model.base_model).__name__} weights ({err}): {NO_EXPORT}"
        ) from None
    exported.to(dtype).eval()
    exported.generation_config = copy.deepcopy(model.generation_config)
    return exported


def export_model_dir(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fmt: str = "transformers",
    template: str | None = None,
) -> Path:
    """Write `model_dir` as a transformers FastVLM dir at `output_dir`; verified, then published.

    `template` (a name or .jinja file, as `--template` elsewhere; None: the one the model was
    trained with, as `VLMPipeline` picks it) becomes the export's one chat template, and its end-of-turn token joins the generation config's EOS ids, so servers that
    read only those (vLLM) stop where `VLMPipeline` does.

    Raises:
        ExportError: the model cannot be exported exactly (the message names the part/family).
    """
    from transformers import AutoModelForImageTextToText

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    src = Path(model_dir)
    dst = Path(output_dir)
    if dst.resolve() == src.resolve():
        raise ExportError(f"{dst}: the export must not overwrite its source model dir")
    model, processor = load_model_dir(src)
    family = _family(model)
    template = template or processor.default_template()
    hf_processor = fastvlm_processor(processor, template)
    exported = to_fastvlm(model)
    vocab = model.config.text_config.vocab_size
    stop_ids = [i for i in processor.stop_token_ids(template) if 0 <= i < vocab]
    configured = exported.generation_config.eos_token_id
    for i in configured if isinstance(configured, (list, tuple)) else [configured]:
        if isinstance(i, int) and 0 <= i < vocab and i not in stop_ids:
            stop_ids.append(i)
    exported.generation_config.eos_token_id = stop_ids or None
    size = hf_processor.image_processor.crop_size["height"]
    probe = _probe_inputs(model, size)
    expected = _logits(model, probe)
    check_logits(expected, _logits(exported, probe), family, "in memory")

    def write(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        hf_processor.save_pretrained(tmp)
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp, dtype=next(model.parameters()).dtype)
        diff = check_logits(expected, _logits(reloaded.eval(), probe), family, "reloaded from disk")
        logger.info("export %s: reloaded logits within %.3g of ours", family, diff)

    try:
        publish_dir(dst, write, replace_if=lambda p: (p / "config.json").is_file())
    except FileExistsError as err:
        raise ExportError(f"{err}; give an empty or new directory (or a model dir to replace)") from None
    logger.info("exported %s (%s) to %s as FastVlmForConditionalGeneration", src, family, dst)
    return dst
