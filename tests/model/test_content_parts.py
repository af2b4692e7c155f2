"""Images anywhere: OpenAI-style content lists map to `<image>` tags in place, in every entry point."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from convllava_jp.errors import TemplateError
from convllava_jp.infer.generation import GenerationRequest
from convllava_jp.model.image_processing import ConvLlavaImageProcessor
from convllava_jp.model.processing import ConvLlavaProcessor
from convllava_jp.model.templates import content_text, split_content_parts

from .test_templates_pinned import FIXTURE


def _png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def test_parts_become_tags_where_they_stand():
    red, blue = _png("red"), _png("blue")
    url = "data:image/png;base64," + base64.b64encode(blue).decode()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "左"}, {"type": "image", "image": red}]},
        {"role": "assistant", "content": "赤"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "右は?"},
                {"type": "image_url", "image_url": url},
            ],
        },
    ]
    turns, images = split_content_parts(messages)
    assert [t["content"] for t in turns] == ["<image>\n左", "赤", "<image>\n右は?\n<image>"]
    assert images == [red, blue, blue]
    request = GenerationRequest(messages)
    assert request.messages == turns and request.images == images
    with pytest.raises(TemplateError, match="both"):
        GenerationRequest(messages, [red])


def test_bad_parts_and_tags_in_text_are_refused():
    with pytest.raises(TemplateError, match="part 0"):
        content_text([{"type": "audio"}])
    with pytest.raises(TemplateError, match="<image>"):
        content_text([{"type": "text", "text": "a <image> b"}])


def test_a_tag_and_image_count_mismatch_is_a_clear_error():
    from transformers import AutoTokenizer

    processor = ConvLlavaProcessor(
        ConvLlavaImageProcessor(image_size=128, mode="pad"),
        AutoTokenizer.from_pretrained(FIXTURE / "tokenizer"),
    )
    messages = [{"role": "user", "content": "<image> と <image> を比べて"}]
    with pytest.raises(TemplateError, match="2 <image> tags but 1 images"):
        processor.encode_conversation(messages, pixel_values=[torch.zeros(3, 128, 128)], template="llm-jp-v1")
    parts = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "何?"}]}
    ]
    enc = processor.encode_conversation(parts, pixel_values=[torch.zeros(3, 128, 128)], template="llm-jp-v1")
    same = processor.encode_conversation(
        [{"role": "user", "content": "<image>\n何?"}],
        pixel_values=[torch.zeros(3, 128, 128)],
        template="llm-jp-v1",
    )
    assert enc.input_ids == same.input_ids


def test_a_template_that_drops_image_tags_is_an_error_not_a_silent_shift():
    """llm-jp-3's template does not render a system turn's text: its image would shift the others."""
    from transformers import AutoTokenizer

    processor = ConvLlavaProcessor(
        ConvLlavaImageProcessor(image_size=128, mode="pad"),
        AutoTokenizer.from_pretrained(FIXTURE / "tokenizer"),
    )
    messages = [{"role": "system", "content": "<image>"}, {"role": "user", "content": "<image>\n何?"}]
    with pytest.raises(TemplateError, match="renders 1 of the conversation's 2"):
        processor.encode_conversation(
            messages, pixel_values=[torch.zeros(3, 128, 128)] * 2, template="llm-jp-3"
        )


def test_predict_records_with_content_lists_resolve_part_images_under_the_root(tmp_path):
    from convllava_jp.errors import DataError
    from convllava_jp.infer.predict import record_request

    record = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "左"},
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "と右"},
                    {"type": "image_url", "image_url": {"url": "/abs/b.png"}},
                ],
            }
        ]
    }
    request = record_request("r", record, tmp_path)
    assert request.messages[0]["content"] == "左\n<image>\nと右\n<image>"
    assert request.images == [str(tmp_path / "a.png"), "/abs/b.png"]
    with pytest.raises(DataError, match="both"):
        record_request("r", {**record, "image": "c.png"}, tmp_path)
