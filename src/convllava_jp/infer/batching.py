"""Continuous batching: many concurrent requests share one model, token step by token step.

One background thread owns the model. Each loop it admits waiting requests (prefilled together,
left-padded, images spliced in: `prefill.Prefiller`), merges them into the running batch's KV
cache and runs one decode step for every running request (`stepping.Stepper`): each row is sampled
with its own settings and its text pieces go to the request's `sink`. Finished, stopped, cancelled
and timed-out rows leave the batch at once, so their slot is free for the next request.

When at least twice as many rows are decoding as are joining, the joining group's prefill (vision
tower included) runs in a worker thread beside the steps instead of stalling them, and is merged
between two steps once done. A larger group is prefilled between two steps: where no core is
free, a small batch stepping beside the prefill only slows it down (measured in
docs/benchmarks-infer.md). Requests that arrive together are prefilled together, at most
`max_prefill_batch` at a time (a bigger batch through the vision tower costs more per image on CPU).

One request never fails another: a row whose scores cannot be decoded (NaN, nothing allowed)
fails alone; a prefill or decode step that raises (out of memory included) is undone and retried
once row by row, and only the rows that fail alone are failed; waiting requests are never touched.

Written by hand because transformers' own continuous batching takes token ids only, and our
prompts carry image features spliced into the input embeddings.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import ConfigError
from ..model.processing import EncodedConversation
from .compute_threads import one_intra_op_thread, set_intra_op_threads
from .decoding import IncrementalDecoder
from .generation import GenerationConfig, GenerationRequest, GenerationResult, VLMPipeline
from .prefill import Prefilled, Prefiller
from .running_batch import Row, suppressed_ids
from .stepping import Stepper
from .tickets import (
    BatcherStats,
    EngineClosedError,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
    Sink,
    StreamEvent,
    Ticket,
)

log = logging.getLogger(__name__)

__all__ = [
    "BatcherStats",
    "ContinuousBatcher",
    "EngineClosedError",
    "QueueFullError",
    "RequestFailedError",
    "RequestTimeoutError",
    "StreamEvent",
    "Ticket",
]


class ContinuousBatcher:
    """Serve concurrent requests from one `VLMPipeline` with continuous batching.

    Args:
        pipeline: the loaded model.
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a slot; beyond it `submit` raises QueueFullError.
        batch_wait_s: when idle, how long the first request waits for others to join its batch.
        max_batch_wait_s: when idle and `incoming()` says more requests are on their way (being
            read or prepared by the server), the first one waits for them up to this long: a burst
            of clients then starts as one batch instead of a few small ones joined later.
        max_prefill_batch: most requests prefilled in one model call (vision tower included).
        overlap_prefill: prefill joining requests in a worker thread while at least twice as many
            running rows decode (False: the engine thread prefills between two steps, stalling them).
    """

    def __init__(
        self,
        pipeline: VLMPipeline,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.005,
        max_prefill_batch: int = 8,
        overlap_prefill: bool = True,
        max_batch_wait_s: float = 0.25,
    ):
        if (
            max_batch_size < 1
            or max_queue < 0
            or batch_wait_s < 0
            or max_prefill_batch < 1
            or max_batch_wait_s < batch_wait_s
        ):
            raise ConfigError(
                f"max_batch_size and max_prefill_batch must be >= 1, max_queue >= 0 and 0 <= "
                f"batch_wait_s <= max_batch_wait_s, got {max_batch_size}, {max_prefill_batch}, "
                f"{max_queue}, {batch_wait_s}, {max_batch_wait_s}"
            )
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.max_batch_wait_s = max_batch_wait_s
        # How many requests are on their way to `submit` (set by the server: read or being prepared).
        self.incoming: Callable[[], int] = lambda: 0
        self.max_prefill_batch = max_prefill_batch
        self.overlap_prefill = overlap_prefill
        self.stats = BatcherStats()
        self.threads = torch.get_num_threads()  # the engine computes with these (compute_threads.py)
        self._pending: deque[Ticket] = deque()
        self._prefilling: list[Ticket] = []  # taken from the queue, their prefill not merged yet
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        tok = pipeline.tokenizer
        eos = set(getattr(pipeline, "stop_token_ids", None) or [tok.eos_token_id])  # EOS + end of turn
        suppress = suppressed_ids(pipeline.model, pipeline.device)
        self._stepper = Stepper(pipeline, self.stats, eos, suppress)
        self._prefiller = Prefiller(pipeline, self._new_row, suppress)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ContinuousBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, fail the waiting and running ones, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ContinuousBatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Requests holding a batch slot: decoding, or being prefilled to join."""
        return self._stepper.rows + len(self._prefilling)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def capacity(self) -> int:
        """Most requests held at once, running and waiting."""
        return self.max_batch_size + self.max_queue

    def purge(self) -> None:
        """Drop waiting requests that were cancelled or passed their deadline now (not at the next step)."""
        with self._cond:
            self._purge_locked()

    def _purge_locked(self) -> None:
        """Drop waiting tickets that were cancelled or passed their deadline (holding `_cond`)."""
        now = time.monotonic()
        if not any(t.cancelled or t.expired(now) for t in self._pending):
            return
        kept: deque[Ticket] = deque()
        for ticket in self._pending:
            if ticket.cancelled:
                self.stats.cancelled += 1
            elif ticket.expired(now):
                self._stepper.time_out(ticket)
            else:
                kept.append(ticket)
        self._pending = kept

    # --- submitting --------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest | EncodedConversation,
        config: GenerationConfig | None = None,
        sink: Sink | None = None,
        deadline: float | None = None,
    ) -> Ticket:
        """Queue a request; its pieces and result go to `sink` (called from the engine thread).

        `deadline`: time.monotonic() after which the request is dropped with a RequestTimeoutError.
        Raises ConfigError (bad settings, too long for the context), ImageError / TemplateError
        (from encoding a GenerationRequest), QueueFullError, EngineClosedError.
        """
        config = (config or GenerationConfig()).validate()
        encoded = request if isinstance(request, EncodedConversation) else self.pipeline.encode(request)
        self.pipeline.check_fits(encoded, config)
        ticket = Ticket(encoded, config, sink or (lambda event: None), deadline)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the batcher is closed")
            self._purge_locked()  # requests already given up on hold no place
            if self.active + len(self._pending) >= self.capacity:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"server busy: {self.active} requests running and {len(self._pending)} waiting "
                    f"(limits {self.max_batch_size} + {self.max_queue}); retry later"
                )
            self._pending.append(ticket)
            self.stats.requests += 1
            self._cond.notify()
        return ticket

    def _events(
        self,
        request: GenerationRequest | EncodedConversation,
        config: GenerationConfig | None,
        timeout: float | None,
    ) -> Iterator[StreamEvent]:
        """Submit and yield the request's events until its result; cancelled when left early.

        Raises the request's error, or TimeoutError after `timeout` s.
        """
        events: queue.Queue[StreamEvent] = queue.Queue()
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = self.submit(request, config, events.put, deadline)
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    event = events.get(timeout=left)
                except queue.Empty:
                    raise TimeoutError(f"no answer within {timeout} s") from None
                yield event
                if event.error is not None:
                    raise event.error
                if event.result is not None:
                    return
        finally:
            ticket.cancel()

    def generate(
        self,
        request: GenerationRequest | EncodedConversation,
        config: GenerationConfig | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Blocking: submit and wait for the result (TimeoutError after `timeout` s, request cancelled)."""
        for event in self._events(request, config, timeout):
            if event.error is None and event.result is not None:
                return event.result
        raise RuntimeError("the request ended without a result")  # _events returns only after one

    def stream(
        self,
        request: GenerationRequest | EncodedConversation,
        config: GenerationConfig | None = None,
        timeout: float | None = None,
    ) -> Iterator[str]:
        """Blocking iterator of text pieces; leaving it early cancels the request."""
        for event in self._events(request, config, timeout):
            if event.piece:
                yield event.piece

    # --- engine ------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("batcher started (max batch %d, queue %d)", self.max_batch_size, self.max_queue)
        set_intra_op_threads(self.threads)
        workers = None
        if self.overlap_prefill:  # on one intra-op thread: a second OpenMP team slows every step
            workers = ThreadPoolExecutor(1, "batcher-prefill", initializer=one_intra_op_thread)
        inflight: Future | None = None  # the worker's prefill, merged between two steps once done
        while True:
            try:
                if inflight is not None and (inflight.done() or self._stepper.batch is None):
                    future, inflight = inflight, None
                    self._join(future)  # waits only when nothing is decoding
                new = self._admit()
                if new is None:
                    break
                if new and workers is not None and self._stepper.rows >= 2 * len(new):
                    inflight = workers.submit(self._prefiller.run, new)  # beside the steps
                elif new:
                    self._apply(self._prefiller.run(new, lock=self.pipeline.lock), new)
                if self._stepper.batch is not None:
                    self._stepper.step(time.monotonic())
            except Exception as err:  # a fault outside the guarded model calls: the running rows
                # fail, the waiting requests do not, the engine goes on
                log.exception("batcher loop failed; failing the %d running requests", self.active)
                self._stepper.fail_running(err)
        try:
            if inflight is not None:
                self._join(inflight)  # its requests join the running ones, which fail below
        except Exception:
            log.exception("merging the last prefill failed")
        if workers is not None:
            workers.shutdown()
        self._stepper.fail_running(EngineClosedError("the server is shutting down"))
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for ticket in pending:
            ticket.emit(StreamEvent(error=EngineClosedError("the server is shutting down")))
        log.info("batcher stopped")

    def _join(self, future: Future) -> None:
        """Merge a finished worker prefill; if the worker itself broke, its requests fail."""
        tickets = list(self._prefilling)
        try:
            outcome = future.result()
        except Exception as err:
            log.exception("prefill worker failed; failing its %d requests", len(tickets))
            with self._cond:
                self._prefilling = []
            for ticket in tickets:
                self._stepper.fail(ticket, err, "prefill")
            return
        self._apply(outcome, tickets)

    def _apply(self, outcome: Prefilled, tickets: list[Ticket]) -> None:
        """Merge prefilled rows into the running batch (first tokens handed out), fail the rest."""
        self.stats.retried += outcome.retried
        error: Exception | None = None
        try:
            for ticket, err in outcome.failures:
                self._stepper.fail(ticket, err, "prefill")
            for batch, tokens, failed in outcome.parts:
                try:
                    self._stepper.merge(batch, tokens, failed)
                except Exception as err:  # these rows never joined: they fail, the loop fails the rest
                    error = err
                    running = self._stepper.batch.rows if self._stepper.batch is not None else []
                    for row in batch.rows:
                        if not any(r is row for r in running):
                            self._stepper.fail(row.ticket, err, "prefill")
        finally:
            with self._cond:
                self._prefilling = [t for t in self._prefilling if t not in tickets]
        if error is not None:
            raise error

    def _admit(self) -> list[Ticket] | None:
        """Waiting requests for the free slots, at most `max_prefill_batch` (None: closed).

        Blocks while nothing runs. Takes none while a prefill is in flight (the next group gathers
        in the queue meanwhile, to be prefilled together).
        """
        with self._cond:
            if self._stepper.batch is None and not self._prefilling:
                while not self._pending and not self._closed:
                    self._cond.wait(timeout=1.0)
                    self._purge_locked()
                if self._closed:
                    return None
                if self.batch_wait_s:
                    self._gather_locked()
            elif self._closed:
                return None
            if self._prefilling:
                return []
            self._purge_locked()
            free = min(self.max_batch_size - self.active, self.max_prefill_batch)
            taken = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            self._prefilling = list(taken)
            return taken

    def _gather_locked(self) -> None:
        """Idle engine, a request waiting: let concurrent ones arrive so they start as one batch.

        Waits `batch_wait_s` after the first, and as long as more are on their way (`incoming()`)
        up to `max_batch_wait_s`; never past a full batch. Holding `_cond`.
        """
        start = time.monotonic()
        while len(self._pending) < self.max_batch_size and not self._closed:
            expected = self.incoming() > 0
            left = start + (self.max_batch_wait_s if expected else self.batch_wait_s) - time.monotonic()
            if left <= 0:
                break
            # A request that fails its preparation never notifies: look again every few ms.
            self._cond.wait(timeout=min(left, 0.005) if expected else left)

    def _new_row(self, ticket: Ticket) -> Row:
        cfg = ticket.config
        generator = None
        if not cfg.greedy:
            generator = torch.Generator(device=self.pipeline.device)
            generator.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ticket.encoded.input_ids)), device=self.pipeline.device)
        decoder = IncrementalDecoder(self.pipeline.tokenizer, cfg.stop, self.pipeline.byte_ids)
        return Row(ticket, decoder, generator, seen)
