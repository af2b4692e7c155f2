"""The batcher prefills new requests beside the running rows' decode steps (issue 18, section 2).

A hook around the model (built here, no switch in library code) holds a new request's prefill
until the running request has taken more decode steps: with the prefill run by the engine thread
between two steps, those steps never come. Answers stay exactly the solo greedy answers.
"""

from __future__ import annotations

import threading

import torch

from convllava_jp.infer.batching import ContinuousBatcher, EngineClosedError, RequestFailedError, StreamEvent
from convllava_jp.infer.generation import GenerationConfig

from ._support import encode, hooked, is_prefill

WAIT_S = 10  # how long a held prefill waits for steps before giving up (the failure case only)


class Finals:
    """Sinks that keep each request's final event."""

    def __init__(self, n: int):
        self.events: list[StreamEvent | None] = [None] * n
        self.done = [threading.Event() for _ in range(n)]

    def sink(self, i: int):
        def put(event: StreamEvent) -> None:
            if event.final:
                self.events[i] = event
                self.done[i].set()

        return put

    def wait(self) -> list[StreamEvent]:
        assert all(d.wait(120) for d in self.done)
        return self.events


def test_a_new_request_is_prefilled_while_the_running_ones_decode(pipeline, images):
    *running, new = encode(pipeline, images, ["何色ですか？", "円は？", "画像を説明してください。" * 3])
    long, short = GenerationConfig(max_new_tokens=120), GenerationConfig(max_new_tokens=8)
    want = [pipeline.generate([], long, encoded=[e])[0] for e in running]
    want.append(pipeline.generate([], short, encoded=[new])[0])
    n_new = len(new.input_ids)
    stepping, held = threading.Event(), threading.Event()
    steps_while_held = [0]
    seen: dict[str, object] = {}
    batcher: ContinuousBatcher | None = None

    def hook(kwargs):
        if not is_prefill(kwargs):
            stepping.set()
            if held.is_set():
                steps_while_held[0] += 1
        elif kwargs["attention_mask"].shape[1] == n_new:
            held.set()
            seen["active"] = batcher.active  # the running requests and this one hold slots
            # let the running requests take three steps meanwhile (never, when this call stalls them)
            for _ in range(WAIT_S * 100):
                if steps_while_held[0] >= 3:
                    break
                threading.Event().wait(0.01)
            seen["steps"] = steps_while_held[0]

    finals = Finals(3)
    batcher = ContinuousBatcher(hooked(pipeline, hook), max_batch_size=4, batch_wait_s=0)
    for i, e in enumerate(running):
        batcher.submit(e, long, finals.sink(i))
    with batcher:
        assert stepping.wait(60)
        batcher.submit(new, short, finals.sink(2))
        events = finals.wait()
    assert seen["steps"] >= 3, "the running requests did not decode while the new one was prefilled"
    assert seen["active"] == 3
    assert [e.result for e in events] == want
    assert batcher.stats.joined_running == 1


def test_a_group_as_large_as_half_the_running_batch_is_prefilled_between_steps(pipeline, images):
    *running, new = encode(pipeline, images, ["何色ですか？", "画像を説明してください。" * 3])
    threads: list[str] = []
    stepping = threading.Event()

    def hook(kwargs):
        if is_prefill(kwargs):
            threads.append(threading.current_thread().name)
        else:
            stepping.set()

    finals = Finals(2)
    batcher = ContinuousBatcher(hooked(pipeline, hook), max_batch_size=4, batch_wait_s=0)
    with batcher:
        batcher.submit(running[0], GenerationConfig(max_new_tokens=60), finals.sink(0))
        assert stepping.wait(60)
        batcher.submit(new, GenerationConfig(max_new_tokens=8), finals.sink(1))
        finals.wait()
    assert threads == ["continuous-batcher", "continuous-batcher"]


def test_requests_arriving_together_are_prefilled_together_in_groups(pipeline, images):
    questions = ["何色ですか？", "円は？", "左上は？", "画像を説明してください。", "はい？"]
    encoded = encode(pipeline, images, questions)
    config = GenerationConfig(max_new_tokens=12)
    want = [pipeline.generate([], config, encoded=[e])[0] for e in encoded]
    groups: list[tuple[int, int]] = []  # (prompts, images) per prefill call

    def hook(kwargs):
        if is_prefill(kwargs):
            groups.append((kwargs["input_ids"].shape[0], len(kwargs["pixel_values"])))

    finals = Finals(len(encoded))
    batcher = ContinuousBatcher(hooked(pipeline, hook), max_batch_size=8, max_prefill_batch=2, batch_wait_s=0)
    for i, e in enumerate(encoded):
        batcher.submit(e, config, finals.sink(i))
    with batcher:
        events = finals.wait()
    assert groups == [(2, 2), (2, 2), (1, 1)]  # each call: its prompts and their images as one batch
    assert [e.result for e in events] == want


def test_a_prefill_beside_the_steps_that_raises_fails_only_its_poisoned_request(pipeline, images):
    questions = ["何色ですか？", "左上は？", "はい？", "いいえ？", "円は？", "画像を説明してください。" * 4]
    *running, good, poisoned = encode(pipeline, images, questions)
    long, short = GenerationConfig(max_new_tokens=60), GenerationConfig(max_new_tokens=8)
    want = [pipeline.generate([], long, encoded=[e])[0] for e in running]
    want_good = pipeline.generate([], short, encoded=[good])[0]
    n_poisoned = len(poisoned.input_ids)
    stepping = threading.Event()
    prefills: list[str] = []

    def hook(kwargs):
        if not is_prefill(kwargs):
            stepping.set()
            return
        prefills.append(threading.current_thread().name)
        if kwargs["attention_mask"].sum(-1).max() == n_poisoned:
            raise torch.OutOfMemoryError("injected prefill failure")

    finals = Finals(6)
    batcher = ContinuousBatcher(hooked(pipeline, hook), max_batch_size=6, batch_wait_s=0)
    for i, e in enumerate(running):
        batcher.submit(e, long, finals.sink(i))
    with batcher:
        assert stepping.wait(60)
        with batcher._cond:  # the two arrive together: one group, prefilled beside the four's steps
            batcher.submit(poisoned, short, finals.sink(4))
            batcher.submit(good, short, finals.sink(5))
        events = finals.wait()
    assert isinstance(events[4].error, RequestFailedError)
    assert [e.result for e in events[:4]] == want and events[5].result == want_good
    assert batcher.stats.failed == 1 and batcher.stats.retried == 1
    assert prefills[0] == "continuous-batcher" and all(n != "continuous-batcher" for n in prefills[1:])


def test_closing_during_a_prefill_beside_the_steps_ends_every_request(pipeline, images):
    first, other, second = encode(
        pipeline, images, ["何色ですか？", "円は？", "画像を説明してください。" * 3]
    )
    n_second = len(second.input_ids)
    stepping, held, release = threading.Event(), threading.Event(), threading.Event()

    def hook(kwargs):
        if not is_prefill(kwargs):
            stepping.set()
        elif kwargs["attention_mask"].shape[1] == n_second:
            held.set()
            release.wait(WAIT_S)

    finals = Finals(3)
    batcher = ContinuousBatcher(hooked(pipeline, hook), max_batch_size=4, batch_wait_s=0)
    batcher.submit(first, GenerationConfig(max_new_tokens=3000), finals.sink(0))
    batcher.submit(other, GenerationConfig(max_new_tokens=3000), finals.sink(1))
    batcher.start()
    assert stepping.wait(60)
    batcher.submit(second, GenerationConfig(max_new_tokens=3000), finals.sink(2))
    assert held.wait(60)
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 60})
    closer.start()
    release.set()
    closer.join()
    events = finals.wait()
    assert all(isinstance(e.error, EngineClosedError) for e in events)


def test_time_to_first_token_is_counted(pipeline, images):
    (encoded,) = encode(pipeline, images, ["何色ですか？"])
    with ContinuousBatcher(pipeline, batch_wait_s=0) as batcher:
        batcher.generate(encoded, GenerationConfig(max_new_tokens=3), timeout=60)
        batcher.generate(encoded, GenerationConfig(max_new_tokens=3), timeout=60)
    assert batcher.stats.first_tokens == 2 and batcher.stats.first_token_s > 0
