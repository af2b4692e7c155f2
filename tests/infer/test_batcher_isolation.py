"""One request never fails another inside the ContinuousBatcher (issue 14, section 1).

Faults are injected with a model wrapper built here (no switch in library code): a step or a
prefill that raises after the cache was already extended, an out-of-memory error whenever more
than one row runs, a row whose scores come out NaN. Every good request must still return exactly
the answer it gets alone, and requests waiting in the queue are never failed.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from convllava_jp.errors import ConfigError
from convllava_jp.infer.batching import (
    ContinuousBatcher,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
    StreamEvent,
)
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest

GOOD_TOKENS = 10
POISON_AFTER = 3  # the poisoned request fails on its 3rd decode step


class FaultyModel:
    """Delegates to the model; `fault(kwargs, out)` may raise or corrupt the output after the real
    forward ran (so the KV cache already holds this step's column when the error comes)."""

    def __init__(self, model, fault):
        self._model = model
        self._fault = fault
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        self.calls += 1
        out = self._model(**kwargs)
        self._fault(kwargs, out)
        return out


def faulty_pipeline(pipeline, fault):
    pipe = copy.copy(pipeline)
    pipe.model = FaultyModel(pipeline.model, fault)
    pipe.lock = threading.Lock()
    return pipe


def good_and_poisoned(pipeline, images):
    """Four good requests with short prompts and one poisoned one whose prompt is longer than any
    good request ever gets (prompt + answer), so its positions identify its row in every batch."""
    good = [
        pipeline.encode(GenerationRequest(pipeline.question_messages(q, 1), [images[i]]))
        for i, q in enumerate(["何色ですか？", "円は？", "左上は？", "画像を説明してください。"])
    ]
    long_question = "画像を説明してください。" * 6
    poisoned = pipeline.encode(GenerationRequest(pipeline.question_messages(long_question, 1), [images[0]]))
    n = len(poisoned.input_ids)
    assert max(len(e.input_ids) for e in good) + GOOD_TOKENS < n
    return good, poisoned, n


def solo(pipeline, encoded, config):
    return [pipeline.generate([], config, encoded=[e])[0] for e in encoded]


def run_all(batcher, items):
    """Submit (encoded, config) pairs, then start the engine; their final events, in order."""
    finals: list[StreamEvent | None] = [None] * len(items)
    done = [threading.Event() for _ in items]

    def sink(i):
        def put(event):
            if event.final:
                finals[i] = event
                done[i].set()

        return put

    for i, (encoded, config) in enumerate(items):
        batcher.submit(encoded, config, sink(i))
    batcher.start()  # the caller closes it
    assert all(d.wait(120) for d in done)
    return finals


def poisoned_rows(kwargs, prompt_len: int) -> torch.Tensor:
    """Rows of this call that belong to the poisoned request at or past its POISON_AFTER-th step."""
    positions = kwargs.get("position_ids")
    if kwargs.get("cache") is None or positions is None:
        return torch.zeros(0, dtype=torch.bool)
    return positions[:, -1] >= prompt_len + POISON_AFTER - 1


@pytest.mark.parametrize("where", ["step", "prefill"])
def test_a_request_whose_model_call_raises_fails_alone(pipeline, images, where):
    good, poisoned, n = good_and_poisoned(pipeline, images)
    config = GenerationConfig(max_new_tokens=GOOD_TOKENS)
    want = solo(pipeline, good, config)

    def fault(kwargs, out):
        if where == "step" and poisoned_rows(kwargs, n).any():
            raise RuntimeError("injected step failure")
        if where == "prefill" and kwargs.get("cache") is None and kwargs["attention_mask"].sum(-1).max() == n:
            raise RuntimeError("injected prefill failure")

    # batch of 3: the poisoned request starts with two good ones, the other two wait in the queue
    batcher = ContinuousBatcher(
        faulty_pipeline(pipeline, fault), max_batch_size=3, max_queue=8, batch_wait_s=0
    )
    items = [
        (good[0], config),
        (poisoned, GenerationConfig(max_new_tokens=50)),
        *[(e, config) for e in good[1:]],
    ]
    with batcher:
        finals = run_all(batcher, items)
        assert isinstance(finals[1].error, RequestFailedError)
        assert "injected" not in str(finals[1].error)  # the detail is logged, not handed out
        results = [f.result for i, f in enumerate(finals) if i != 1]
        assert results == want  # the neighbours and the queued requests: exactly their solo answers
        assert batcher.stats.failed == 1 and batcher.stats.retried >= 1
        # the engine goes on serving
        assert batcher.generate(good[0], config, timeout=60) == want[0]
        assert batcher.stats.failed == 1


def test_out_of_memory_in_a_batched_step_is_retried_row_by_row(pipeline, images):
    good, _, _ = good_and_poisoned(pipeline, images)
    config = GenerationConfig(max_new_tokens=GOOD_TOKENS)
    want = solo(pipeline, good, config)
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def fault(kwargs, out):
        if kwargs.get("cache") is not None and kwargs["input_ids"].shape[0] > 1:
            raise oom("injected: CUDA out of memory")

    batcher = ContinuousBatcher(faulty_pipeline(pipeline, fault), max_batch_size=4, batch_wait_s=0)
    with batcher:
        finals = run_all(batcher, [(e, config) for e in good])
    assert [f.result for f in finals] == want
    assert batcher.stats.failed == 0 and batcher.stats.retried >= GOOD_TOKENS - 1


def test_a_row_with_nan_scores_fails_alone(pipeline, images):
    good, poisoned, n = good_and_poisoned(pipeline, images)
    greedy = GenerationConfig(max_new_tokens=GOOD_TOKENS)
    sampled = GenerationConfig(max_new_tokens=GOOD_TOKENS, temperature=0.9, seed=5)
    want = solo(pipeline, good, greedy)

    def fault(kwargs, out):
        rows = poisoned_rows(kwargs, n)
        if rows.any():
            out.logits[rows] = float("nan")

    for config in (greedy, sampled):  # argmax and multinomial alike
        batcher = ContinuousBatcher(faulty_pipeline(pipeline, fault), max_batch_size=8, batch_wait_s=0)
        with batcher:
            finals = run_all(
                batcher, [(good[0], greedy), (poisoned, config), *[(e, greedy) for e in good[1:]]]
            )
        assert isinstance(finals[1].error, RequestFailedError)
        assert [f.result for i, f in enumerate(finals) if i != 1] == want
        assert batcher.stats.failed == 1


def test_values_no_sampler_honours_are_refused_or_decoded_greedily(pipeline, images):
    good, _, _ = good_and_poisoned(pipeline, images)
    greedy = GenerationConfig(max_new_tokens=GOOD_TOKENS)
    want = solo(pipeline, good[:1], greedy)[0]
    with ContinuousBatcher(pipeline, batch_wait_s=0) as batcher:
        for bad in (
            {"seed": 2**64},
            {"seed": -1},
            {"temperature": float("nan")},
            {"temperature": float("inf")},
            {"top_p": 0.0},
            {"repetition_penalty": 1e-300},
            {"repetition_penalty": float("inf")},
        ):
            field = next(iter(bad))
            with pytest.raises(ConfigError, match=field):
                batcher.submit(good[0], GenerationConfig(**{"max_new_tokens": 4, "temperature": 1.0, **bad}))
        # below the floor: greedy (scores / 1e-300 would overflow to inf and softmax to NaN)
        for temperature in (1e-300, 1e-38, 0.001):
            tiny = GenerationConfig(max_new_tokens=GOOD_TOKENS, temperature=temperature, seed=2**64 - 1)
            assert batcher.generate(good[0], tiny, timeout=60) == want
        # extreme but honourable values sample without failing
        for extreme in ({"top_p": 1e-300}, {"repetition_penalty": 0.01}, {"repetition_penalty": 100.0}):
            config = GenerationConfig(max_new_tokens=GOOD_TOKENS, temperature=2.0, seed=1, **extreme)
            assert batcher.generate(good[0], config, timeout=60).completion_tokens == GOOD_TOKENS
        assert batcher.stats.failed == 0


def test_given_up_requests_leave_the_queue_and_deadlines_hold(pipeline, images):
    good, _, _ = good_and_poisoned(pipeline, images)
    long = GenerationConfig(max_new_tokens=3000)
    started = threading.Event()
    batcher = ContinuousBatcher(pipeline, max_batch_size=1, max_queue=1, batch_wait_s=0)
    with batcher:
        first = batcher.submit(good[0], long, lambda e: started.set())
        assert started.wait(60)
        waiting = batcher.submit(good[1], long)
        with pytest.raises(QueueFullError):
            batcher.submit(good[1], long)
        waiting.cancel()  # a client that gave up holds no place in the queue
        errors: list[BaseException] = []
        timed = threading.Event()

        def on_event(event):
            if event.error is not None:
                errors.append(event.error)
                timed.set()

        # a deadline already passed: dropped by the batcher itself, with a timeout error
        batcher.submit(good[1], long, on_event, deadline=0.0)
        assert timed.wait(60)
        assert isinstance(errors[0], RequestTimeoutError) and isinstance(errors[0], TimeoutError)
        first.cancel()
        result = batcher.generate(good[2], GenerationConfig(max_new_tokens=4), timeout=60)
        assert result.completion_tokens == 4
        assert batcher.stats.timed_out == 1 and batcher.stats.cancelled == 2 and batcher.stats.rejected == 1


def test_a_running_request_past_its_deadline_is_dropped(pipeline, images):
    good, _, _ = good_and_poisoned(pipeline, images)
    got: list[StreamEvent] = []
    done = threading.Event()

    def sink(event):
        got.append(event)
        if event.final:
            done.set()

    with ContinuousBatcher(pipeline, batch_wait_s=0) as batcher:
        ticket = batcher.submit(good[0], GenerationConfig(max_new_tokens=3000), sink)
        while not any(e.piece for e in got):
            assert not done.wait(0.01)
        ticket.deadline = 0.0  # now passed: the engine drops the row at its next step
        assert done.wait(60)
        assert isinstance(got[-1].error, RequestTimeoutError)
        assert batcher.stats.timed_out == 1 and batcher.stats.completed == 0
        assert (
            batcher.generate(good[1], GenerationConfig(max_new_tokens=3), timeout=60).completion_tokens == 3
        )


def test_a_row_whose_text_cannot_be_decoded_fails_alone(pipeline, images, monkeypatch):
    import convllava_jp.infer.batching as batching

    class FragileDecoder(batching.IncrementalDecoder):
        def add(self, token_id):
            if "POISON" in self.stop and len(self.ids) >= 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return super().add(token_id)

    monkeypatch.setattr(batching, "IncrementalDecoder", FragileDecoder)
    good, _, _ = good_and_poisoned(pipeline, images)
    config = GenerationConfig(max_new_tokens=GOOD_TOKENS)
    want = solo(pipeline, good, config)
    batcher = ContinuousBatcher(pipeline, max_batch_size=8, batch_wait_s=0)
    poisoned = GenerationConfig(max_new_tokens=GOOD_TOKENS, stop=["POISON"])
    with batcher:
        finals = run_all(batcher, [(good[0], poisoned), *[(e, config) for e in good]])
    assert isinstance(finals[0].error, RequestFailedError)
    assert [f.result for f in finals[1:]] == want
