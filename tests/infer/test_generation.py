"""The Python API: VLMPipeline (transformers' generate) and the ContinuousBatcher, in process."""

from __future__ import annotations

import threading
import time

import pytest

from convllava_jp.errors import ConfigError, ImageError
from convllava_jp.infer.batching import ContinuousBatcher, QueueFullError, StreamEvent
from convllava_jp.infer.decoding import IncrementalDecoder
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest, VLMPipeline

QUESTIONS = ["画像を説明してください。", "何色ですか？", "左上には何がありますか？", "円はいくつありますか？"]


def requests_for(pipeline, images, n: int = 8) -> list[GenerationRequest]:
    """Requests of different prompt lengths and image sizes (so left padding matters)."""
    out = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)] * (1 + i % 3)
        out.append(GenerationRequest(pipeline.question_messages(question, 1), [images[i % len(images)]]))
    return out


def test_batched_generate_matches_one_by_one(pipeline, images):
    requests = requests_for(pipeline, images, 6)
    config = GenerationConfig(max_new_tokens=12)
    single = pipeline.generate(requests, config, batch_size=1)
    batched = pipeline.generate(requests, config, batch_size=4)
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert len({r.prompt_tokens for r in single}) > 1  # the batch really was left-padded
    assert all(r.text for r in single)
    assert all(r.finish_reason in ("stop", "length") for r in single)


def test_chat_with_history_is_the_same_conversation_as_generate(pipeline, images):
    first = pipeline.chat(images[0], QUESTIONS[0], max_new_tokens=8)
    second = pipeline.chat(images[0], QUESTIONS[1], history=[(QUESTIONS[0], first)], max_new_tokens=8)
    messages = [
        {"role": "user", "content": "<image>\n" + QUESTIONS[0]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    expected = pipeline.generate(
        [GenerationRequest(messages, [images[0]])], GenerationConfig(max_new_tokens=8)
    )
    assert second == expected[0].text
    # the history changes the prompt, so the prompt is longer
    assert expected[0].prompt_tokens > pipeline.generate(
        [GenerationRequest(pipeline.question_messages(QUESTIONS[1], 1), [images[0]])],
        GenerationConfig(max_new_tokens=1),
    )[0].prompt_tokens + len(pipeline.tokenizer.encode(first, add_special_tokens=False))


def test_chat_batch_and_chat_stream(pipeline, images):
    pairs = [(images[0], QUESTIONS[0]), (None, QUESTIONS[1]), (images[2], QUESTIONS[2] * 2)]
    answers = pipeline.chat_batch(pairs, batch_size=3, max_new_tokens=10)
    assert answers == [pipeline.chat(image, q, max_new_tokens=10) for image, q in pairs]
    pieces = list(
        pipeline.chat_stream(images[0], QUESTIONS[1], history=[(QUESTIONS[0], answers[0])], max_new_tokens=10)
    )
    assert "".join(pieces) == pipeline.chat(
        images[0], QUESTIONS[1], history=[(QUESTIONS[0], answers[0])], max_new_tokens=10
    )


def test_stream_concatenates_to_generate(pipeline, images):
    request = requests_for(pipeline, images, 2)[1]
    config = GenerationConfig(max_new_tokens=40)
    pieces = list(pipeline.stream(request, config))
    assert len(pieces) > 1
    assert "".join(pieces) == pipeline.generate([request], config)[0].text


def test_stop_strings_cut_the_answer(pipeline, images):
    request = requests_for(pipeline, images, 1)[0]
    full = pipeline.generate([request], GenerationConfig(max_new_tokens=30))[0]
    # a stop string taken from the middle of the greedy answer
    visible = [i for i, ch in enumerate(full.text) if ch not in "\ufffd" and i > 3]
    cut_at = visible[0]
    stop = full.text[cut_at : cut_at + 1]
    expected = full.text[: full.text.index(stop)]
    config = GenerationConfig(max_new_tokens=30, stop=[stop])
    result = pipeline.generate([request], config)[0]
    assert result.text == expected
    assert result.finish_reason == "stop"
    assert "".join(pipeline.stream(request, config)) == expected


def test_seeded_sampling_repeats(pipeline, images):
    request = requests_for(pipeline, images, 1)[0]
    config = GenerationConfig(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    first = pipeline.generate([request], config)[0].text
    assert pipeline.generate([request], config)[0].text == first
    greedy = pipeline.generate([request], GenerationConfig(max_new_tokens=20))[0].text
    assert first != greedy


def test_bad_settings_and_inputs_raise_clear_errors(pipeline, images, tmp_path):
    request = requests_for(pipeline, images, 1)[0]
    with pytest.raises(ConfigError, match="context"):
        pipeline.generate([request], GenerationConfig(max_new_tokens=pipeline.max_context))
    with pytest.raises(ConfigError, match="top_p"):
        pipeline.generate([request], GenerationConfig(top_p=0))
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="missing.png"):
        pipeline.chat(missing, "何色ですか？")


def test_incremental_decoder_holds_back_incomplete_bytes_and_stop_prefixes(pipeline):
    tok = pipeline.tokenizer
    ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "あ".encode()]
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.add(i) for i in ids[:2]]
    assert pieces == ["", ""]  # half a character is not emitted
    pieces.append(decoder.add(ids[2]))
    pieces.append(decoder.add(tok.pad_token_id))  # special tokens are invisible
    pieces.append(decoder.add(tok.convert_tokens_to_ids("<0x41>")))
    pieces.append(decoder.finish())
    assert "".join(pieces) == decoder.text == tok.decode(ids + [tok.convert_tokens_to_ids("<0x41>")])

    text_ids = tok.encode("赤い円があります。", add_special_tokens=False)
    decoder = IncrementalDecoder(tok, stop=["があ"])
    out = ""
    for i in text_ids:
        out += decoder.add(i)
        assert not out.endswith("が")  # could be the start of the stop string
        if decoder.stopped:
            break
    out += decoder.finish()
    assert decoder.stopped and out == decoder.text == "赤い円"


# --- ContinuousBatcher ------------------------------------------------------------------------
def test_batcher_concurrent_requests_match_the_pipeline(pipeline, images):
    requests = requests_for(pipeline, images, 8)
    encoded = [pipeline.encode(r) for r in requests]
    configs = [GenerationConfig(max_new_tokens=12 + 2 * i) for i in range(len(requests))]  # rows end apart
    expected = [pipeline.generate([r], c)[0] for r, c in zip(requests, configs)]
    results: list = [None] * len(requests)
    with ContinuousBatcher(pipeline, max_batch_size=4, batch_wait_s=0.002) as batcher:

        def run(i: int) -> None:
            time.sleep(0.005 * i)  # staggered: later requests join a batch that is already decoding
            results[i] = batcher.generate(encoded[i], configs[i], timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = batcher.stats
    assert [r.text for r in results] == [r.text for r in expected]
    assert [r.prompt_tokens for r in results] == [r.prompt_tokens for r in expected]
    assert [r.finish_reason for r in results] == [r.finish_reason for r in expected]
    assert stats.peak_batch > 1 and stats.completed == len(requests)
    assert stats.joined_running >= 1  # continuous: a prefill merged into a running batch


def test_batcher_stream_and_per_request_settings(pipeline, images):
    encoded = [pipeline.encode(r) for r in requests_for(pipeline, images, 2)]
    greedy = GenerationConfig(max_new_tokens=24)
    sampled = GenerationConfig(max_new_tokens=24, temperature=1.2, top_p=0.8, repetition_penalty=1.3, seed=3)
    events: dict[str, list[StreamEvent]] = {"greedy": [], "sampled": [], "sampled2": []}
    batcher = ContinuousBatcher(pipeline, max_batch_size=4, batch_wait_s=0)
    done = {name: threading.Event() for name in events}

    def sink(name):
        def put(event: StreamEvent) -> None:
            events[name].append(event)
            if event.final:
                done[name].set()

        return put

    # queued before the engine starts: it admits all three as one batch, whatever the clock says
    batcher.submit(encoded[0], greedy, sink("greedy"))
    batcher.submit(encoded[1], sampled, sink("sampled"))
    batcher.submit(encoded[1], sampled, sink("sampled2"))
    with batcher:
        assert all(d.wait(60) for d in done.values())
        assert batcher.stats.peak_batch == 3 and batcher.stats.prefills == 1
    text = {name: "".join(e.piece for e in evs) for name, evs in events.items()}
    results = {name: evs[-1].result for name, evs in events.items()}
    # a greedy row is not disturbed by sampled rows beside it; pieces add up to the result
    assert (
        text["greedy"] == results["greedy"].text == pipeline.generate([], greedy, encoded=encoded[:1])[0].text
    )
    assert text["sampled"] == results["sampled"].text
    # seeded rows repeat, even side by side in one batch; and sampling differs from greedy
    assert results["sampled"].text == results["sampled2"].text
    assert results["sampled"].text != pipeline.generate([], greedy, encoded=encoded[1:])[0].text


def test_batcher_cancel_frees_the_slot_and_queue_limit(pipeline, images):
    request = requests_for(pipeline, images, 1)[0]
    long = GenerationConfig(max_new_tokens=3000)
    events: list[StreamEvent] = []
    with ContinuousBatcher(pipeline, max_batch_size=1, max_queue=1, batch_wait_s=0) as batcher:
        first = batcher.submit(request, long, events.append)
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:  # running
            time.sleep(0.01)
        assert batcher.active == 1
        second = batcher.submit(request, long)  # waits in the queue
        with pytest.raises(QueueFullError):
            batcher.submit(request, long)
        first.cancel()
        second.cancel()
        deadline = time.monotonic() + 10
        while (batcher.active or batcher.queued) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.active == 0
        assert not any(e.final for e in events)  # a cancelled request gets no result
        result = batcher.generate(request, GenerationConfig(max_new_tokens=4), timeout=30)
        assert result.completion_tokens <= 4
        assert batcher.stats.cancelled >= 1 and batcher.stats.rejected == 1


def test_pipeline_loads_with_options(model_dir):
    import torch

    pipe = VLMPipeline.from_pretrained(model_dir, device="auto", dtype="bfloat16")
    assert pipe.model.dtype == torch.bfloat16
    assert pipe.max_context == 4096


def test_eos_ends_the_answer_the_same_way_in_pipeline_and_batcher(pipeline, images):
    """A copy of the model whose EOS row outbids one token: the answer ends where it would appear."""
    import copy

    import torch

    request = requests_for(pipeline, images, 1)[0]
    config = GenerationConfig(max_new_tokens=30)
    inputs = pipeline.batch_inputs([pipeline.encode(request)])
    with torch.inference_mode():
        out = pipeline.model.generate(**inputs, max_new_tokens=30, do_sample=False, pad_token_id=0)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    model = copy.deepcopy(pipeline.model)
    rows = model.get_output_embeddings().weight
    with torch.no_grad():
        rows[pipeline.tokenizer.eos_token_id] = rows[ids[5]] * 1.05  # wins wherever ids[5] would
    eos_pipeline = VLMPipeline(model, pipeline.processor)
    eos = pipeline.tokenizer.eos_token_id
    with torch.inference_mode():  # where transformers' greedy search ends with the same model
        ref = model.generate(**inputs, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ref_ids = ref[0, inputs["input_ids"].shape[1] :].tolist()
    assert ref_ids[-1] == eos and len(ref_ids) <= ids.index(ids[5]) + 1  # EOS came early
    result = eos_pipeline.generate([request], config)[0]
    assert result.finish_reason == "stop"
    assert result.completion_tokens == len(ref_ids)  # the answer + EOS
    with ContinuousBatcher(eos_pipeline) as batcher:
        assert batcher.generate(request, config, timeout=30) == result
        assert "".join(batcher.stream(request, config, timeout=30)) == result.text
    assert "".join(eos_pipeline.stream(request, config)) == result.text


def test_the_image_placeholder_is_never_generated(pipeline, images):
    """A copy of the model whose placeholder logit outbids every token: the pipeline and the batcher
    still never emit it (the model's generation_config.suppress_tokens) and answer as the original."""
    import copy

    request = requests_for(pipeline, images, 1)[0]
    config = GenerationConfig(max_new_tokens=10)
    want = pipeline.generate([request], config)[0]
    model = copy.deepcopy(pipeline.model)
    image_id = model.config.image_token_id
    assert 0 <= image_id < model.get_output_embeddings().weight.shape[0]

    def boost(module, inputs, logits):
        logits[..., image_id] = logits.abs().amax() * 10 + 100

    model.get_output_embeddings().register_forward_hook(boost)
    boosted = VLMPipeline(model, pipeline.processor)
    assert boosted.generate([request], config)[0] == want
    with ContinuousBatcher(boosted) as batcher:
        assert batcher.generate(request, config, timeout=30) == want
        assert "".join(batcher.stream(request, config, timeout=30)) == want.text
