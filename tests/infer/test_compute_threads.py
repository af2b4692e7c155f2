"""Only the batcher's engine thread computes with torch's intra-op threads (compute_threads.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from convllava_jp.infer.batching import ContinuousBatcher
from convllava_jp.infer.compute_threads import call_in_passing_thread, one_intra_op_thread
from convllava_jp.infer.generation import GenerationConfig

from ._support import encode, hooked


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def in_thread(fn):
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(value=fn()))
    thread.start()
    thread.join()
    return seen["value"]


def test_a_preparing_thread_runs_on_one_intra_op_thread(two_threads):
    def prepare():
        one_intra_op_thread()
        return torch.get_num_threads()

    assert in_thread(prepare) == 1


def test_the_engine_keeps_the_count_it_was_built_with(pipeline, images, two_threads):
    seen = []
    pipe = hooked(pipeline, lambda kwargs: seen.append(torch.get_num_threads()))
    batcher = ContinuousBatcher(pipe, batch_wait_s=0)
    # A request prepared in another thread first: it drops the global count to 1 for threads
    # that have not started computing yet, the engine's included.
    in_thread(one_intra_op_thread)
    (request,) = encode(pipeline, images, ["何色ですか？"])
    with batcher:
        batcher.generate(request, GenerationConfig(max_new_tokens=3), timeout=60)
    assert seen and set(seen) == {2}


def test_the_prefill_worker_runs_on_one_intra_op_thread(pipeline, images, two_threads):
    seen = {}

    def hook(kwargs):
        seen.setdefault(threading.current_thread().name.split("_")[0], set()).add(torch.get_num_threads())

    batcher = ContinuousBatcher(hooked(pipeline, hook), batch_wait_s=0)
    batcher.start()
    *running, new = encode(pipeline, images, ["何色ですか？", "円は？", "四角は？"])
    long, short = GenerationConfig(max_new_tokens=40), GenerationConfig(max_new_tokens=2)
    try:
        tickets = [batcher.submit(r, long) for r in running]
        while batcher.stats.steps < 2:
            threading.Event().wait(0.01)
        batcher.generate(new, short, timeout=60)  # two rows decoding, one joining: overlapped
        for ticket in tickets:
            ticket.cancel()
    finally:
        batcher.close()
    assert seen.get("batcher-prefill") == {1}, seen
    assert seen.get("continuous-batcher") == {2}, seen


def test_a_passing_thread_hands_back_the_value_or_the_error():
    assert call_in_passing_thread(lambda: threading.current_thread().name) == "loader"
    with pytest.raises(ValueError, match="bad model dir"):
        call_in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad model dir")))


def test_a_stream_prepares_and_generates_in_its_thread_with_the_callers_count(pipeline, images, two_threads):
    """The caller's thread runs no parallel op (its OpenMP team would slow the generating one)."""
    import copy

    from convllava_jp.infer.generation import GenerationRequest

    seen = []
    pipe = copy.copy(pipeline)
    encode = pipe.encode
    pipe.encode = lambda request: (
        seen.append((threading.current_thread().name, torch.get_num_threads())) or encode(request)
    )
    in_thread(one_intra_op_thread)  # the global count is 1 now; the caller's own is 2
    request = GenerationRequest(pipeline.question_messages("何色ですか？", 1), [images[0]])
    pieces = list(pipe.stream(request, GenerationConfig(max_new_tokens=3)))
    assert pieces
    assert seen == [("vlm-stream", 2)]
