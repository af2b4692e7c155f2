"""The vLLM plugin's pure parts, in the main venv (no vLLM needed): token bounds, templates, LLM class."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("convllava_jp.model", reason="this package's transformers is not installed")

from transformers import AutoConfig  # noqa: E402

from convllava_jp.errors import ConfigError  # noqa: E402
from convllava_jp.model import ConvLlavaConfig  # noqa: E402
from convllava_jp.model.image_processing import ConvLlavaImageProcessor  # noqa: E402
from convllava_jp.model.model_dir import load_processor  # noqa: E402
from convllava_jp.model.templates import JINJA_TEMPLATES  # noqa: E402
from convllava_jp.vllm_plugin import support  # noqa: E402

SIZES = [1, 37, 64, 100, 128, 191, 192, 300, 640, 1000, 4000]


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 128, "mode": "pad"},
        {"image_size": [128, 256], "mode": "crop"},
        {"image_size": 256, "mode": "keep-aspect"},
        {"image_size": 256, "mode": "keep-aspect", "max_image_tokens": 10},
        {"image_size": 768, "mode": "keep-aspect", "max_image_tokens": 7},
    ],
)
def test_max_image_tokens_bounds_every_image(options):
    """vLLM budgets the encoder cache with this bound: no image may take more tokens."""
    processor = ConvLlavaImageProcessor(stride=64, **options)
    bound = support.max_image_tokens(processor)
    budget = options.get("max_image_tokens")
    # Aspects over the budget (e.g. 1:13 with 7 tokens) are left out: data/images.py's
    # _token_budget_size gives them a zero side (reported to the lead; not this module's).
    pairs = [
        (h, w) for h, w in itertools.product(SIZES, SIZES) if not budget or max(h, w) / min(h, w) <= budget
    ]
    counts = [processor.num_image_tokens(h, w) for h, w in pairs]
    assert max(counts) <= bound
    # The profiling image reaches it, except where a budget cuts the square below it.
    height, width = support.image_input_size(processor)
    if budget is None:
        assert processor.num_image_tokens(height, width) == bound
    else:
        assert bound == min(options["max_image_tokens"], (options["image_size"] // 64) ** 2)


def test_served_chat_template_is_the_trained_one_as_one_string(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    template = support.served_chat_template(processor)
    assert isinstance(template, str) and "{% generation" not in template and "endgeneration" not in template
    assert template.replace(" ", "") != ""
    # the default is what VLMPipeline prompts with (the trained template, else llm-jp-v1)
    name = processor.default_template()
    expected = support._GENERATION_TAG.sub("", processor.template_source(name))
    assert template == expected
    assert support.served_chat_template(processor, "qwen3") == support._GENERATION_TAG.sub(
        "", JINJA_TEMPLATES["qwen3"]
    )
    # A trained template recorded in the tokenizer wins over the default.
    processor.record_trained_template("qwen3")
    assert support.served_chat_template(processor) == support.served_chat_template(processor, "qwen3")


def test_served_processor_carries_one_template(tiny_model_dir):
    """vLLM takes the chat template from AutoProcessor's result: a dict of named templates fails."""
    ours = load_processor(tiny_model_dir)
    assert isinstance(ours.chat_template, dict)
    served = support.served_processor_class()(ours.image_processor, ours.tokenizer)
    assert served.chat_template == support.served_chat_template(ours)
    # AutoProcessor finds the class by the name processor_config.json records
    assert type(served).__name__ == type(ours).__name__


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("gpt2", "GPT2LMHeadModel"),
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
        ("gpt_neox", "GPTNeoXForCausalLM"),
    ],
)
def test_causal_lm_architecture(model_type, expected):
    assert support.causal_lm_architecture(AutoConfig.for_model(model_type)) == expected


def test_causal_lm_architecture_refuses_a_non_causal_lm():
    with pytest.raises(ConfigError, match="clip_vision_model"):
        support.causal_lm_architecture(AutoConfig.for_model("clip_vision_model"))


def test_placeholder_is_our_image_tag():
    assert support.placeholder("image") == "<image>"
    with pytest.raises(ConfigError, match="audio"):
        support.placeholder("audio")


def test_config_builds_sub_configs_without_sub_config_specs():
    """transformers < 5.20 (vLLM's CPU wheel pins 5.19) has no SubConfigSpec: dicts become configs."""
    config = ConvLlavaConfig()
    config.text_config = {"model_type": "llama", "hidden_size": 64}
    config.vision_config = None
    config._build_sub_configs()
    assert type(config.text_config).__name__ == "LlamaConfig" and config.text_config.hidden_size == 64
    assert type(config.vision_config).__name__ == "ConvNextConfig"
