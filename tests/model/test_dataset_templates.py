"""The training dataset with the family templates, several images per record, and refused templates."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from convllava_jp.data.constants import IGNORE_INDEX
from convllava_jp.data.dataset import ConversationDataset
from convllava_jp.errors import ConfigError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor
from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token

from .families import FAMILIES, build_tokenizer


@pytest.fixture
def data(tmp_path):
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (96 + 32 * i, 64), color).save(tmp_path / f"{i}.png")
    record = {
        "id": "r1",
        "image": ["0.png", "1.png", "2.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\n左と右の画像の違いは?"},
            {"from": "gpt", "value": "色が違います。"},
            {"from": "human", "value": "では <image> は何色?"},
            {"from": "gpt", "value": "緑色です。"},
        ],
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def processor():
    tokenizer = build_tokenizer(FAMILIES["qwen3"])
    add_image_token(tokenizer)
    image_processor = ConvLlavaImageProcessor(image_size=256, mode="keep-aspect", max_image_tokens=6)
    return ConvLlavaProcessor(image_processor, tokenizer)


def test_a_record_with_three_images_in_two_turns_trains_with_a_family_template(data, processor):
    dataset = ConversationDataset(str(data), processor, "qwen3", 1024, min_japanese_fraction=0)
    sample = dataset[0]
    assert len(sample["pixel_values"]) == 3
    assert all(p.shape[-2] * p.shape[-1] // 64**2 <= 6 for p in sample["pixel_values"])
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    placeholders = sum(t == processor.image_token_id for t in ids)
    assert placeholders == sum(p.shape[-2] * p.shape[-1] // 64**2 for p in sample["pixel_values"])
    learned = processor.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert learned == "色が違います。<|im_end|>緑色です。<|im_end|>"


def test_a_template_without_generation_blocks_is_refused_before_training(data, processor, tmp_path):
    stock = tmp_path / "stock.jinja"
    stock.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"no \{% generation %\} block.*wrap each assistant reply"):
        ConversationDataset(str(data), processor, str(stock), 1024, min_japanese_fraction=0)
    with pytest.raises(ConfigError, match="unknown chat template"):
        ConversationDataset(str(data), processor, "qwen-9", 1024, min_japanese_fraction=0)
