"""`plain` / `llm-jp-v1`: the token ids, labels and text of fixed conversations never change.

expected.json was written by the code before templates were read from Jinja markers (issue 15);
`tests/fixtures/legacy_templates/make_fixture.py` documents how.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from convllava_jp.model.image_processing import ConvLlavaImageProcessor
from convllava_jp.model.processing import ConvLlavaProcessor

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy_templates"
CASES = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def processor() -> ConvLlavaProcessor:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "tokenizer")
    return ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="pad"), tokenizer)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['template']}-{CASES.index(c)}")
def test_ids_labels_and_text_are_the_pinned_ones(processor, case):
    pixels = [torch.zeros(3, h, w) for h, w in case["image_sizes"]]
    enc = processor.encode_conversation(
        case["conversation"],
        pixel_values=pixels,
        template=case["template"],
        add_generation_prompt=case["add_generation_prompt"],
    )
    assert enc.input_ids == case["input_ids"]
    assert enc.labels == case["labels"]
    assert (
        processor.render(case["conversation"], case["template"], case["add_generation_prompt"])
        == case["text"]
    )
