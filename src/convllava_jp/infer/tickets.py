"""What a continuous-batching request is: its ticket, its stream events, its errors; the counters.

Split from `batching.py` (the engine), which re-exports these names.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConvLlavaError
from ..model.processing import EncodedConversation
from .generation import GenerationConfig, GenerationResult

log = logging.getLogger(__name__)


class QueueFullError(ConvLlavaError):
    """Every batch slot is busy and the waiting queue is full: try again later."""


class EngineClosedError(ConvLlavaError):
    """The batcher was closed; no more requests are taken."""


class RequestFailedError(ConvLlavaError):
    """The model failed on this request (alone: the others in its batch went on)."""


class RequestTimeoutError(ConvLlavaError, TimeoutError):
    """The request passed its deadline inside the batcher (waiting or running)."""


@dataclass
class StreamEvent:
    """What a request's sink receives: text pieces, then exactly one `result` or `error`."""

    piece: str = ""
    result: GenerationResult | None = None
    error: BaseException | None = None

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


Sink = Callable[[StreamEvent], None]
_ids = itertools.count(1)


class Ticket:
    """One submitted request. `cancel()` (client gone, timeout) frees its slot within a step.

    `deadline` (time.monotonic(), None: none) is a second guard beside the caller's own timeout:
    past it the batcher drops the request (waiting or running) with a RequestTimeoutError.
    """

    def __init__(
        self,
        encoded: EncodedConversation,
        config: GenerationConfig,
        sink: Sink,
        deadline: float | None = None,
    ):
        self.id = next(_ids)
        self.encoded = encoded
        self.config = config
        self.sink = sink
        self.submitted_at = time.monotonic()
        self.deadline = deadline
        self.timed_out = False  # set by the batcher when it dropped the request at its deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def emit(self, event: StreamEvent) -> None:
        try:
            self.sink(event)
        except Exception:  # a consumer gone away (closed event loop) must not stop the engine
            log.debug("request %d: sink failed", self.id, exc_info=True)
            self.cancel()


@dataclass
class BatcherStats:
    """Counters since start: what /health and the benchmark report."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    rejected: int = 0
    retried: int = 0  # prefills or steps that raised and were retried row by row
    steps: int = 0
    tokens: int = 0
    peak_batch: int = 0
    prefills: int = 0
    joined_running: int = 0  # prefills merged into a batch that was already decoding
    first_tokens: int = 0  # requests that got their first token
    first_token_s: float = 0.0  # their waits from submit to the first token, summed
