"""An idle batcher waits for requests still on their way, so a burst starts as one batch (issue 18).

`incoming()` is what the server reports: requests being read or prepared, not yet submitted. The
first request waits `batch_wait_s` for others, and while more are said to be coming, up to
`max_batch_wait_s`: never longer, whatever a slow client keeps announcing.
"""

from __future__ import annotations

import threading
import time

import pytest

from convllava_jp.errors import ConfigError
from convllava_jp.infer.batching import ContinuousBatcher
from convllava_jp.infer.generation import GenerationConfig

from ._support import encode, hooked, is_prefill

CONFIG = GenerationConfig(max_new_tokens=4)


def _prefill_sizes(pipeline):
    """A hooked pipeline and the batch size of each prefill call it sees."""
    sizes: list[int] = []

    def hook(kwargs):
        if is_prefill(kwargs):
            sizes.append(kwargs["input_ids"].shape[0])

    return hooked(pipeline, hook), sizes


def _burst(batcher, requests, gap_s: float, coming: list[int]):
    """Submit the requests `gap_s` apart; each is announced in `coming` until it is submitted."""
    tickets, done = [], []
    for i, request in enumerate(requests):
        if i:
            time.sleep(gap_s)
        event = threading.Event()
        done.append(event)
        tickets.append(batcher.submit(request, CONFIG, lambda e, ev=event: ev.set() if e.final else None))
        coming[0] -= 1
    assert all(event.wait(60) for event in done)


def test_requests_announced_as_coming_start_in_one_batch(pipeline, images):
    pipe, sizes = _prefill_sizes(pipeline)
    requests = encode(pipeline, images, ["何色ですか？", "円は？", "四角はいくつ？"])
    coming = [len(requests)]
    batcher = ContinuousBatcher(pipe, max_batch_size=8, batch_wait_s=0.001, max_batch_wait_s=5.0)
    batcher.incoming = lambda: coming[0]
    with batcher:
        _burst(batcher, requests, gap_s=0.1, coming=coming)  # 100x the plain wait apart
    assert sizes == [3]
    assert batcher.stats.prefills == 1


def test_without_announcements_the_plain_wait_applies(pipeline, images):
    pipe, sizes = _prefill_sizes(pipeline)
    requests = encode(pipeline, images, ["何色ですか？", "円は？"])
    batcher = ContinuousBatcher(pipe, max_batch_size=8, batch_wait_s=0.001, max_batch_wait_s=5.0)
    with batcher:
        _burst(batcher, requests, gap_s=0.3, coming=[0])
    assert sizes[0] == 1  # the first did not wait 0.3 s for the second
    assert len(sizes) == 2


def test_a_request_announced_forever_does_not_hold_the_first_past_the_cap(pipeline, images):
    pipe, sizes = _prefill_sizes(pipeline)
    (request,) = encode(pipeline, images, ["何色ですか？"])
    batcher = ContinuousBatcher(pipe, max_batch_size=8, batch_wait_s=0.001, max_batch_wait_s=0.2)
    batcher.incoming = lambda: 1  # e.g. a client that never finishes sending its body
    with batcher:
        start = time.monotonic()
        result = batcher.generate(request, CONFIG, timeout=30)
    assert result.completion_tokens >= 1
    assert time.monotonic() - start < 10  # bounded by the cap (0.2 s), not by the announcement
    assert sizes == [1]


def test_a_full_batch_starts_without_waiting_for_more(pipeline, images):
    pipe, sizes = _prefill_sizes(pipeline)
    requests = encode(pipeline, images, ["何色ですか？", "円は？"])
    coming = [100]  # more announced than fit in a batch of 2
    batcher = ContinuousBatcher(pipe, max_batch_size=2, batch_wait_s=0.001, max_batch_wait_s=30.0)
    batcher.incoming = lambda: coming[0]
    with batcher:
        start = time.monotonic()
        _burst(batcher, requests, gap_s=0.0, coming=coming)
    assert time.monotonic() - start < 25
    assert sizes == [2]


def test_the_cap_is_never_below_the_plain_wait(pipeline):
    with pytest.raises(ConfigError, match="max_batch_wait_s"):
        ContinuousBatcher(pipeline, batch_wait_s=0.5, max_batch_wait_s=0.1)
