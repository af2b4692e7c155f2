"""Continuous batching: many concurrent requests share one model, token step by token step.

One background thread owns the model. Each loop it admits waiting requests (prefilled together,
left-padded, images spliced in), merges them into the running batch's KV cache, runs one decode
step for every running request, samples each row with its own settings and hands the text pieces
to the request's `sink`. Finished, stopped and cancelled rows leave the batch at once, so their
slot is free for the next request on the next step.

Written by hand because transformers' own continuous batching takes token ids only, and our
prompts carry image features spliced into the input embeddings.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ConvLlavaError
from ..model.processing import EncodedConversation
from .decoding import IncrementalDecoder
from .generation import GenerationConfig, GenerationRequest, GenerationResult, VLMPipeline
from .running_batch import Row, RunningBatch, check_cache_layers, sample_tokens, suppressed_ids

log = logging.getLogger(__name__)


class QueueFullError(ConvLlavaError):
    """Every batch slot is busy and the waiting queue is full: try again later."""


class EngineClosedError(ConvLlavaError):
    """The batcher was closed; no more requests are taken."""


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
    """One submitted request. `cancel()` (client gone, timeout) frees its slot within a step."""

    def __init__(self, encoded: EncodedConversation, config: GenerationConfig, sink: Sink):
        self.id = next(_ids)
        self.encoded = encoded
        self.config = config
        self.sink = sink
        self.submitted_at = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

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
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    tokens: int = 0
    peak_batch: int = 0
    prefills: int = 0
    joined_running: int = 0  # prefills merged into a batch that was already decoding


class ContinuousBatcher:
    """Serve concurrent requests from one `VLMPipeline` with continuous batching.

    Args:
        pipeline: the loaded model.
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a slot; beyond it `submit` raises QueueFullError.
        batch_wait_s: when idle, how long the first request waits for others to join its batch.
    """

    def __init__(
        self,
        pipeline: VLMPipeline,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.005,
    ):
        if max_batch_size < 1 or max_queue < 0 or batch_wait_s < 0:
            raise ConfigError(
                f"max_batch_size must be >= 1, max_queue >= 0 and batch_wait_s >= 0, got "
                f"{max_batch_size}, {max_queue}, {batch_wait_s}"
            )
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.stats = BatcherStats()
        self._pending: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch: RunningBatch | None = None
        self._thread: threading.Thread | None = None
        tok = pipeline.tokenizer
        self._eos = tok.eos_token_id
        self._pad = tok.pad_token_id
        self._suppress = suppressed_ids(pipeline.model, pipeline.device)

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
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    # --- submitting --------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest | EncodedConversation,
        config: GenerationConfig | None = None,
        sink: Sink | None = None,
    ) -> Ticket:
        """Queue a request; its pieces and result go to `sink` (called from the engine thread).

        Raises ConfigError (bad settings, too long for the context), ImageError / TemplateError
        (from encoding a GenerationRequest), QueueFullError, EngineClosedError.
        """
        config = (config or GenerationConfig()).validate()
        encoded = request if isinstance(request, EncodedConversation) else self.pipeline.encode(request)
        self.pipeline.check_fits(encoded, config)
        ticket = Ticket(encoded, config, sink or (lambda event: None))
        with self._cond:
            if self._closed:
                raise EngineClosedError("the batcher is closed")
            if self.active + len(self._pending) >= self.max_batch_size + self.max_queue:
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
        ticket = self.submit(request, config, events.put)
        deadline = None if timeout is None else time.monotonic() + timeout
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
        while True:
            new = self._admit()
            if new is None:
                break
            try:
                if new:
                    self._prefill(new)
                if self._batch is not None:
                    self._step()
            except Exception as err:  # the engine survives; the requests in flight get the error
                log.exception("generation failed; failing %d running requests", self.active)
                self._fail_all(err)
        self._fail_all(EngineClosedError("the server is shutting down"))
        log.info("batcher stopped")

    def _admit(self) -> list[Ticket] | None:
        """Waiting requests for the free slots (None: closed). Blocks while nothing runs."""
        with self._cond:
            if self._batch is None:
                while not self._pending and not self._closed:
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    return None
                if self.batch_wait_s and len(self._pending) < self.max_batch_size:
                    # Idle engine: let concurrent requests arrive so they start as one batch.
                    deadline = time.monotonic() + self.batch_wait_s
                    while len(self._pending) < self.max_batch_size and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(timeout=left)
            elif self._closed:
                return None
            free = self.max_batch_size - self.active
            taken: list[Ticket] = []
            while self._pending and len(taken) < free:
                ticket = self._pending.popleft()
                if ticket.cancelled:
                    self.stats.cancelled += 1
                else:
                    taken.append(ticket)
            return taken

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

    @torch.inference_mode()
    def _prefill(self, tickets: list[Ticket]) -> None:
        """Run the new requests' prompts (images spliced in) and merge them into the batch."""
        pipe = self.pipeline
        try:
            inputs = pipe.batch_inputs([t.encoded for t in tickets])
            mask = inputs["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with pipe.lock:
                out = pipe.model(
                    **inputs, position_ids=positions, use_cache=True, logits_to_keep=1, return_dict=True
                )
            check_cache_layers(out.cache)
            rows = [self._new_row(t) for t in tickets]
            tokens = sample_tokens(out.logits[:, -1, :], rows, self._suppress)
        except Exception as err:  # only these requests fail; the running batch goes on
            log.exception("prefill of %d requests failed", len(tickets))
            for t in tickets:
                self.stats.failed += 1
                t.emit(StreamEvent(error=err))
            return
        self._merge(RunningBatch(out.cache, mask, mask.sum(-1), torch.zeros_like(mask[:, 0]), rows))
        self._take_tokens(tokens, first_row=len(self._batch.rows) - len(rows))

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for every running row."""
        pipe = self.pipeline
        self._drop(lambda row: row.ticket.cancelled, cancelled=True)
        if self._batch is None:
            return
        batch = self._batch
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        with pipe.lock:
            out = pipe.model(
                input_ids=batch.next_token[:, None],
                attention_mask=batch.mask,
                position_ids=batch.positions[:, None],
                cache=batch.cache,
                use_cache=True,
                return_dict=True,
            )
        batch.cache = out.cache
        batch.positions = batch.positions + 1
        self.stats.steps += 1
        tokens = sample_tokens(out.logits[:, -1, :], batch.rows, self._suppress)
        self._take_tokens(tokens, first_row=0)

    def _merge(self, new: RunningBatch) -> None:
        self.stats.prefills += 1
        if self._batch is None:
            self._batch = new
            return
        self.stats.joined_running += 1
        self._batch.extend(new)

    def _take_tokens(self, tokens: torch.Tensor, first_row: int) -> None:
        """Hand each row its token (from `first_row` on); finished rows leave the batch."""
        batch = self._batch
        max_context = self.pipeline.max_context
        finished: dict[int, str] = {}
        values = tokens.tolist()
        for offset, token in enumerate(values):
            i = first_row + offset
            row = batch.rows[i]
            batch.next_token[i] = token
            row.completion_tokens += 1
            self.stats.tokens += 1
            if token == self._eos:
                finished[i] = "stop"
                continue
            piece = row.decoder.add(token)
            if piece:
                row.ticket.emit(StreamEvent(piece=piece))
            if row.seen is not None:
                row.seen = torch.unique(torch.cat([row.seen, tokens[offset : offset + 1]]))
            if row.decoder.stopped:
                finished[i] = "stop"
            elif row.completion_tokens >= row.ticket.config.max_new_tokens:
                finished[i] = "length"
            elif int(batch.positions[i]) + 1 >= max_context:
                finished[i] = "length"
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch.rows))
        for i, reason in finished.items():
            row = batch.rows[i]
            piece = row.decoder.finish()
            if piece:
                row.ticket.emit(StreamEvent(piece=piece))
            result = GenerationResult(
                text=row.decoder.text,
                prompt_tokens=len(row.ticket.encoded.input_ids),
                completion_tokens=row.completion_tokens,
                finish_reason=reason,
            )
            self.stats.completed += 1
            row.ticket.emit(StreamEvent(result=result))
        if finished:
            self._drop(lambda row: False, indices=set(finished))

    def _drop(
        self, predicate: Callable[[Row], bool], indices: set[int] = frozenset(), cancelled=False
    ) -> None:
        """Remove rows (by index or predicate) from the batch; trim padding no row needs."""
        batch = self._batch
        if batch is None:
            return
        gone = {i for i, row in enumerate(batch.rows) if i in indices or predicate(row)}
        if not gone:
            return
        if cancelled:
            self.stats.cancelled += len(gone)
            log.info("dropped %d cancelled requests", len(gone))
        keep = [i for i in range(len(batch.rows)) if i not in gone]
        if keep:
            batch.keep(keep)
        else:
            self._batch = None

    def _fail_all(self, err: BaseException) -> None:
        batch, self._batch = self._batch, None
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for row in batch.rows if batch is not None else []:
            self.stats.failed += 1
            row.ticket.emit(StreamEvent(error=err))
        for ticket in pending:
            ticket.emit(StreamEvent(error=err))
