"""The presets and recipes of the modern Japanese LLMs: `info --json`, recipes built on the meta device,
and the keep-aspect token budget of the JDocQA recipe."""

from __future__ import annotations

import json

import pytest
import torch

from convllava_jp.cli import main
from convllava_jp.data.images import image_token_count, preprocessed_size
from convllava_jp.errors import ConfigError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor, with_image_options
from convllava_jp.model.modeling import ConvLlavaForConditionalGeneration, parameter_counts
from convllava_jp.model.presets import build_config, get_preset
from convllava_jp.model.templates import JINJA_TEMPLATES
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.recipe import load_recipe

# preset -> LLM parameters (the published models' sizes: 1.87B, 3.78B, 1.41B, 3.36B, 1.72B, 8.03B)
FAMILY_PRESETS = {
    "convllava-jp-llm-jp-3-1.8b-768": 1_867_614_208,
    "convllava-jp-llm-jp-3-3.7b-768": 3_782_913_024,
    "convllava-jp-sarashina2.2-1b-768": 1_407_538_944,
    "convllava-jp-sarashina2.2-3b-768": 3_355_609_600,
    "convllava-jp-qwen3-1.7b-768": 1_720_574_976,
    "convllava-jp-llama-3-elyza-8b-768": 8_030_261_248,
}


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_info_json_of_every_family_preset(name, capsys):
    assert main(["info", "--json", "--preset", name]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == name and info["image_tokens"] == 144
    assert info["template"] == get_preset(name).template and info["llm"] == get_preset(name).llm
    assert info["params"]["llm"] == FAMILY_PRESETS[name]
    assert info["params"]["stage5"] == 472_934_400


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_family_recipes_load_and_build_on_the_meta_device(name):
    recipe = load_recipe(name)
    preset = get_preset(recipe.model.preset)
    assert recipe.model.llm == preset.llm and preset.template in JINJA_TEMPLATES
    assert [recipe.stages[s].template for s in ("1", "2", "3")] == ["plain", "plain", preset.template]
    with torch.device("meta"):
        model = ConvLlavaForConditionalGeneration(build_config(preset))
    total = parameter_counts(model)
    assert total["llm"] == FAMILY_PRESETS[name]
    for stage in recipe.stages.values():
        trainable = [t for t in stage.trainable if stage.lora is None or t != "llm"]
        counts = apply_trainable(model, trainable, allow_empty=True)
        assert counts["total"] > 0 or stage.lora is not None


def test_the_jdocqa_recipe_keeps_pages_in_shape_within_576_tokens():
    recipe = load_recipe("jdocqa-keep-aspect")
    stage = recipe.stages["3"]
    assert recipe.model.init and stage.template == "llm-jp-3"
    processor = with_image_options(ConvLlavaImageProcessor(image_size=768, mode="crop"), stage.image)
    assert (processor.mode, processor.max_image_tokens) == ("keep-aspect", 576)
    for height, width in [(3508, 2480), (2480, 3508), (6000, 800), (800, 800), (100, 4000)]:
        h, w = processor.output_size(height, width)
        assert image_token_count(h, w, 64) <= 576
        assert abs(h / w - height / width) / (height / width) < 0.25 or min(h, w) == 64
    # A4 at 2048 px would take 32 x 23 = 736 tokens: downscaled to the budget, not cropped.
    assert processor.output_size(3508, 2480) == (1792, 1280)
    assert preprocessed_size(3508, 2480, 2048, "keep-aspect", 64) == (2048, 1472)
    reloaded = ConvLlavaImageProcessor.from_dict(processor.to_dict())
    assert reloaded.max_image_tokens == 576


def test_a_token_budget_needs_keep_aspect_and_known_keys():
    with pytest.raises(ConfigError, match="keep-aspect"):
        ConvLlavaImageProcessor(image_size=768, mode="crop", max_image_tokens=100)
    with pytest.raises(ConfigError, match="unknown keys"):
        with_image_options(ConvLlavaImageProcessor(), {"budget": 3})


def test_stage_image_options_and_templates_are_checked_when_the_recipe_loads():
    from convllava_jp.train.recipe import StageConfig

    with pytest.raises(ConfigError, match="image must be"):
        StageConfig(name="3", data=[{"path": "x.jsonl"}], image={"budget": 576})
    with pytest.raises(ConfigError, match="template must be one of"):
        StageConfig(name="3", data=[{"path": "x.jsonl"}], template="qwen-9")
    for template in ("qwen3", "gemma", "default", "my/template.jinja"):
        StageConfig(name="3", data=[{"path": "x.jsonl"}], template=template)
