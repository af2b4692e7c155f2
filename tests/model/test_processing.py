"""`ConvLlavaProcessor`: model dirs of earlier versions load, placeholders per image, one pixel form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from convllava_jp.data.collate import stack_images
from convllava_jp.data.constants import TEMPLATE_NAMES
from convllava_jp.data.images import image_token_count
from convllava_jp.errors import TemplateError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor
from convllava_jp.model.processing import ConvLlavaProcessor
from convllava_jp.model.templates import JINJA_TEMPLATES

LEGACY_MODEL = Path(__file__).parents[1] / "fixtures" / "legacy_model_dir" / "model"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def legacy() -> ConvLlavaProcessor:
    return AutoProcessor.from_pretrained(LEGACY_MODEL)


@pytest.fixture(scope="module")
def aspect(legacy) -> ConvLlavaProcessor:
    """The legacy tokenizer with a keep-aspect image processor: images of different sizes."""
    return ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="keep-aspect"), legacy.tokenizer)


def test_a_processor_saved_before_the_move_loads_and_saves_the_same_files(legacy, tmp_path):
    assert type(legacy) is ConvLlavaProcessor
    assert type(legacy.image_processor) is ConvLlavaImageProcessor
    legacy.save_pretrained(tmp_path)
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (LEGACY_MODEL / name).read_bytes(), name


def test_each_image_takes_image_token_count_placeholders(aspect):
    images = [_image(200, 100), _image(90, 300, seed=1), _image(128, 128, seed=2)]
    batch = aspect(text=["<image>\na", "<image>b<image>"], images=images)
    sizes = [tuple(p.shape[-2:]) for p in batch["pixel_values"]]
    assert sizes == [(64, 128), (128, 64), (128, 128)]
    expected = [image_token_count(h, w, aspect.stride) for h, w in sizes]
    placeholders = (batch["input_ids"] == aspect.image_token_id).sum(dim=1).tolist()
    assert placeholders == [expected[0], expected[1] + expected[2]] == [2, 6]
    for image, count in zip(images, expected):
        assert aspect.image_processor.num_image_tokens(image.height, image.width) == count

    messages = [{"from": "human", "value": "<image>\n何?"}, {"from": "gpt", "value": "円"}]
    encoded = aspect.encode_conversation(messages, images=images[:1])
    assert encoded.input_ids.count(aspect.image_token_id) == expected[0]
    with pytest.raises(TemplateError, match="1 <image> tags but 2 images"):
        aspect.encode_conversation(messages, images=images[:2])


def test_pixel_values_take_one_form_from_processor_to_forward(aspect):
    """A stacked (N, 3, H, W) tensor when the sizes match, else a list; the image processor, the
    processor and the collator's `stack_images` agree; nothing else (no image_sizes) is returned."""
    same = [_image(100, 100), _image(60, 60, seed=1)]
    batch = aspect(text="<image><image>", images=same)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert isinstance(batch["pixel_values"], torch.Tensor) and batch["pixel_values"].shape == (2, 3, 128, 128)
    assert torch.equal(batch["pixel_values"], aspect.image_processor(same)["pixel_values"])

    mixed = [_image(200, 100), _image(100, 100, seed=1)]
    batch = aspect(text="<image><image>", images=mixed)
    direct = aspect.image_processor(mixed)["pixel_values"]
    assert isinstance(batch["pixel_values"], list) and isinstance(direct, list)
    assert [p.shape for p in batch["pixel_values"]] == [(3, 64, 128), (3, 128, 128)]
    assert all(torch.equal(a, b) for a, b in zip(batch["pixel_values"], direct))

    singles = aspect.preprocess_images(mixed)
    assert isinstance(stack_images(singles), list)
    assert stack_images(singles[:1]).shape == (1, 3, 64, 128)
    assert "pixel_values" not in aspect(text="no image")


def test_the_dataset_knows_every_chat_template():
    """`data/` validates template names without importing the model: the two lists must agree."""
    assert tuple(JINJA_TEMPLATES) == TEMPLATE_NAMES


def test_a_model_dir_is_prompted_with_the_template_its_chat_stage_was_trained_with(tiny_model_dir, tmp_path):
    """Training records a chat stage's template in the dir; inference and eval default to it."""
    from convllava_jp.eval.runner import EvalSettings
    from convllava_jp.infer.generation import VLMPipeline
    from convllava_jp.model.model_dir import load_model_dir, save_model_dir
    from convllava_jp.model.templates import default_template_name

    model, processor = load_model_dir(tiny_model_dir)
    assert default_template_name(tiny_model_dir) == "llm-jp-v1"  # nothing recorded: today's default
    assert VLMPipeline(model, processor).template == "llm-jp-v1"
    processor.record_trained_template("plain")  # captioning stages are not recorded
    assert processor.default_template() == "llm-jp-v1"
    processor.record_trained_template("qwen3")  # a built-in template keeps its name (its tokenization)
    assert processor.default_template() == "qwen3"
    save_model_dir(model, processor, tmp_path / "builtin")
    assert default_template_name(tmp_path / "builtin") == "qwen3"

    custom = tmp_path / "mine.jinja"
    custom.write_text(JINJA_TEMPLATES["llm-jp-v1"].replace("ユーザー", "利用者"), encoding="utf-8")
    processor.record_trained_template(str(custom))
    save_model_dir(model, processor, tmp_path / "trained")
    assert default_template_name(tmp_path / "trained") == "trained"
    assert EvalSettings().template_for(tmp_path / "trained") == "trained"
    assert EvalSettings(template="plain").template_for(tmp_path / "trained") == "plain"

    pipe = VLMPipeline.from_pretrained(tmp_path / "trained")
    assert pipe.template == "trained"
    prompt = pipe.processor.render(
        [{"role": "user", "content": "こんにちは"}], pipe.template, add_generation_prompt=True
    )
    assert "利用者" in prompt and "ユーザー" not in prompt
