"""Every LLM family: `init --llm` of its architecture, its template's labels, two training steps,
generation that stops at its end-of-turn token, and multi-image conversations."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from convllava_jp.convert.init import init_model
from convllava_jp.data.collate import pad_sequences
from convllava_jp.data.constants import IGNORE_INDEX
from convllava_jp.errors import TemplateError
from convllava_jp.infer.batching import ContinuousBatcher
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest, VLMPipeline
from convllava_jp.model.model_dir import load_model_dir

from .families import FAMILIES, build_llm_dir

REPLIES = ["赤い車です。", "猫と犬"]


def _conversation(n_images: tuple[int, int] = (1, 1)) -> list[dict]:
    return [
        {"role": "user", "content": "<image>\n" * n_images[0] + "この画像は何ですか?"},
        {"role": "assistant", "content": REPLIES[0]},
        {"role": "user", "content": "右の画像 " + "<image> " * n_images[1] + "には何が写っていますか?"},
        {"role": "assistant", "content": REPLIES[1]},
    ]


def _pixels(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(3, 128, 128, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name)
    llm = build_llm_dir(family, root / "llm")
    torch.manual_seed(0)
    init_model("tiny", root / "model", llm=str(llm))
    model, processor = load_model_dir(root / "model")
    return family, model, processor


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_exactly_the_replies_and_their_end_of_turn_are_supervised(family_model):
    family, _, processor = family_model
    enc = processor.encode_conversation(_conversation(), pixel_values=_pixels(2), template=family.name)
    runs = _labelled_runs(enc.input_ids, enc.labels)
    tok = processor.tokenizer
    assert [tok.decode(r) for r in runs] == [r + family.end_of_turn for r in REPLIES]
    end_id = tok.convert_tokens_to_ids(family.end_of_turn)
    assert all(r[-1] == end_id for r in runs)
    assert sum(r != IGNORE_INDEX for r in enc.labels) == sum(len(r) for r in runs)


def test_two_training_steps(family_model):
    family, model, processor = family_model
    encoded = [
        processor.encode_conversation(_conversation(n), pixel_values=_pixels(sum(n)), template=family.name)
        for n in [(1, 1), (2, 1)]
    ]
    ids, mask = pad_sequences([e.input_ids for e in encoded], processor.tokenizer.pad_token_id, "right")
    labels, _ = pad_sequences([e.labels for e in encoded], IGNORE_INDEX, "right")
    pixels = torch.stack([p for e in encoded for p in e.pixel_values])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.projector.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    losses = []
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, model.projector.state_dict()[k]) for k, v in before.items())


def test_generation_stops_at_the_end_of_turn_token(family_model):
    family, model, processor = family_model
    pipeline = VLMPipeline(model, processor, template=family.name)
    end_id = processor.tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert end_id in pipeline.stop_token_ids
    assert end_id in model.generation_config.eos_token_id
    head = model.language_model.get_output_embeddings()

    def favour_end(module, args, output):
        output = output.clone()
        output[..., end_id] += 1e4
        return output

    handle = head.register_forward_hook(favour_end)
    try:
        images = [Image.new("RGB", (96, 64), color) for color in ("red", "blue")]
        request = GenerationRequest(_conversation()[:3], images)
        config = GenerationConfig(max_new_tokens=6)
        (result,) = pipeline.generate([request], config)
        streamed = "".join(pipeline.stream(request, config))
        batched = _batcher_result(pipeline, request, config)
    finally:
        handle.remove()
    assert (result.finish_reason, result.completion_tokens, result.text) == ("stop", 1, "")
    assert streamed == ""
    assert (batched.finish_reason, batched.completion_tokens, batched.text) == ("stop", 1, "")


def _batcher_result(pipeline, request, config):
    """The continuous batcher's answer to one request."""
    done, finals = threading.Event(), []

    def sink(event):
        if event.final:
            finals.append(event)
            done.set()

    batcher = ContinuousBatcher(pipeline, batch_wait_s=0)
    batcher.submit(request, config, sink)
    batcher.start()
    try:
        assert done.wait(120)
    finally:
        batcher.close()
    assert finals[0].error is None, finals[0].error
    return finals[0].result


def test_a_batched_forward_equals_the_per_sample_loop_with_several_images(family_model):
    family, model, processor = family_model
    if family.name == "plain":
        pytest.skip("plain keeps only the image tags of a user turn")
    encoded = [
        processor.encode_conversation(_conversation(n), pixel_values=_pixels(sum(n)), template=family.name)
        for n in [(1, 1), (2, 1), (1, 3)]
    ]
    ids, mask = pad_sequences([e.input_ids for e in encoded], processor.tokenizer.pad_token_id, "right")
    pixels = torch.stack([p for e in encoded for p in e.pixel_values])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for i, e in enumerate(encoded):
            single = model(
                input_ids=torch.tensor([e.input_ids]), pixel_values=torch.stack(e.pixel_values)
            ).logits[0]
            torch.testing.assert_close(batched[i, : len(e.input_ids)], single, atol=1e-4, rtol=1e-4)


def test_a_template_without_generation_blocks_is_refused_for_training(family_model, tmp_path):
    family, _, processor = family_model
    stock = tmp_path / "stock.jinja"
    stock.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    with pytest.raises(TemplateError, match=r"\{% generation %\}"):
        processor.check_template(str(stock), training=True)
    with pytest.raises(TemplateError, match=r"\{% generation %\}"):
        processor.encode_conversation(_conversation(), pixel_values=_pixels(2), template=str(stock))
    # still fine for prompting
    processor.encode_conversation(
        _conversation()[:1], pixel_values=_pixels(1), template=str(stock), add_generation_prompt=True
    )
    marked = tmp_path / "mine.jinja"
    marked.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] + eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    processor.check_template(str(marked), training=True)
    enc = processor.encode_conversation(_conversation(), pixel_values=_pixels(2), template=str(marked))
    runs = _labelled_runs(enc.input_ids, enc.labels)
    eos = processor.tokenizer.eos_token
    assert [processor.tokenizer.decode(r) for r in runs] == [r + eos for r in REPLIES]


def test_a_prompt_tokenizes_as_the_start_of_its_training_sample(family_model):
    """Inference renders the same template with the generation prompt: its ids prefix the training ids."""
    family, _, processor = family_model
    if family.name == "plain":
        pytest.skip("plain has no generation prompt")
    full = processor.encode_conversation(_conversation(), pixel_values=_pixels(2), template=family.name)
    prompt = processor.encode_conversation(
        _conversation()[:3], pixel_values=_pixels(2), template=family.name, add_generation_prompt=True
    )
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    reply = full.input_ids[len(prompt.input_ids) :]
    assert processor.tokenizer.decode(reply) == REPLIES[1] + family.end_of_turn + (
        "\n" if family.name in ("qwen3", "gemma") else ""
    )


@pytest.mark.parametrize("metaspace", [False, True], ids=["byte-level", "sentencepiece"])
@pytest.mark.parametrize("name", ["sarashina2.2", "qwen3", "llama-3", "gemma"])
def test_ids_are_the_tokenizers_own_tokenization_of_the_chat(name, metaspace):
    """Where a template's turns meet at special tokens, the pieces tokenize as the whole chat does
    (no SentencePiece word-start marker at each piece), so the LLM sees its own chat format."""
    from convllava_jp.model.image_processing import ConvLlavaImageProcessor
    from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token

    from .families import build_tokenizer

    tokenizer = build_tokenizer(FAMILIES[name], metaspace=metaspace)
    add_image_token(tokenizer)
    processor = ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="pad"), tokenizer)
    conversation = _conversation((0, 0))
    enc = processor.encode_conversation(conversation, template=name)
    text = processor.render(conversation, name)
    assert enc.input_ids == tokenizer.encode(text, add_special_tokens=False)
    prompt = processor.encode_conversation(conversation[:3], template=name, add_generation_prompt=True)
    assert enc.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_init_takes_a_qwen2_directory(tmp_path):
    """Qwen2 / Qwen2.5 (ChatML without the think block; the qwen3 template's turns) as `init --llm`."""
    from dataclasses import replace

    family = replace(FAMILIES["qwen3"], model_type="qwen2", config={**FAMILIES["qwen3"].config})
    family.config.pop("head_dim")
    llm = build_llm_dir(family, tmp_path / "llm")
    init_model("tiny", tmp_path / "model", llm=str(llm))
    model, processor = load_model_dir(tmp_path / "model")
    assert model.config.text_config.model_type == "qwen2"
    enc = processor.encode_conversation(_conversation(), pixel_values=_pixels(2), template="qwen3")
    out = model(
        input_ids=torch.tensor([enc.input_ids]),
        pixel_values=torch.stack(enc.pixel_values),
        labels=torch.tensor([enc.labels]),
    )
    assert torch.isfinite(out.loss)
