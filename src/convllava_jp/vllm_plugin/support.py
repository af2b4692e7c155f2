"""What the vLLM plugin needs from a model dir, without vLLM: token counts, templates, the LLM class.

Pure functions over our own config / processor objects, so the main test suite checks them
without vLLM installed (vLLM lives in its own venv, see docs/vllm.md).
"""

from __future__ import annotations

import re

from ..data.constants import IMAGE_TOKEN
from ..errors import ConfigError

ARCHITECTURE = "ConvLlavaForConditionalGeneration"  # `architectures` in our config.json
_GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def image_input_size(image_processor) -> tuple[int, int]:
    """(height, width) of an input image that makes the most image tokens (vLLM's profiling image).

    `crop` / `pad` make the model's size from any image; `keep-aspect` makes the most tokens from a
    square at the long-side target (every other aspect has a shorter side).
    """
    size = image_processor.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def max_image_tokens(image_processor) -> int:
    """An upper bound on the image tokens one image can take, for vLLM's encoder budget.

    `keep-aspect` with a token budget never exceeds the budget; without one, the square at the
    long-side target is the largest grid.
    """
    height, width = image_input_size(image_processor)
    stride = image_processor.stride
    tokens = (height // stride) * (width // stride)
    if image_processor.mode == "keep-aspect" and image_processor.max_image_tokens is not None:
        return min(tokens, int(image_processor.max_image_tokens))
    return tokens


def served_chat_template(processor, template: str | None = None) -> str:
    """The one chat template vLLM's chat endpoint applies: `template` (a name or .jinja file), else
    the one the model was trained with (as `VLMPipeline`), as plain Jinja.

    vLLM 0.32 fails on a dict of named templates (our tokenizers carry one), so the processor vLLM
    loads carries this single string. The training-only `{% generation %}` markers are dropped.
    Message contents stay strings: vLLM puts the images' `<image>` placeholders (the plugin's
    `get_placeholder_str`) before the text, one line each, as our prompts have them.
    """
    source = processor.template_source(template or processor.default_template())
    return _GENERATION_TAG.sub("", source)


def causal_lm_architecture(text_config) -> str:
    """The causal-LM class name of the LLM (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...), which
    vLLM's registry maps to its own implementation of the family."""
    if getattr(text_config, "architectures", None):
        return text_config.architectures[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_config.model_type)
    if not name:
        raise ConfigError(
            f"LLM family {text_config.model_type!r} has no causal-LM class in transformers; "
            "the vLLM plugin serves causal LMs only"
        )
    return name


def placeholder(modality: str) -> str:
    """The text vLLM's chat endpoint puts in the prompt for one image: our `<image>` tag."""
    if modality.startswith("image"):
        return IMAGE_TOKEN
    raise ConfigError(f"ConvLLaVA models take images only, not {modality!r}")


def served_processor_class():
    """`ConvLlavaProcessor` whose chat template is `served_chat_template` (one string): what
    AutoProcessor gives vLLM for our config, whose chat template vLLM's chat endpoint applies."""
    from ..model.processing import ConvLlavaProcessor

    class ConvLlavaServedProcessor(ConvLlavaProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
            if tokenizer is not None:
                self.chat_template = served_chat_template(self)

    # AutoProcessor finds the class by the name processor_config.json records.
    ConvLlavaServedProcessor.__name__ = ConvLlavaProcessor.__name__
    return ConvLlavaServedProcessor
