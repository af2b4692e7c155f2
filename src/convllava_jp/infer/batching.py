"""Continuous batching: many concurrent requests share one model, token step by token step.

One background thread owns the model. Each loop it admits waiting requests (prefilled together,
left-padded, images spliced in), merges them into the running batch's KV cache, runs one decode
step for every running request, samples each row with its own settings and hands the text pieces
to the request's `sink`. Finished, stopped, cancelled and timed-out rows leave the batch at once,
so their slot is free for the next request on the next step.

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

import torch

from ..errors import ConfigError
from ..model.processing import EncodedConversation
from .decoding import IncrementalDecoder
from .generation import GenerationConfig, GenerationRequest, GenerationResult, VLMPipeline
from .running_batch import Row, RunningBatch, check_cache_layers, sample_tokens, suppressed_ids
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
        self._eos = set(getattr(pipeline, "stop_token_ids", None) or [tok.eos_token_id])  # EOS + end of turn
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
                self._time_out(ticket)
            else:
                kept.append(ticket)
        self._pending = kept

    def _time_out(self, ticket: Ticket) -> None:
        self.stats.timed_out += 1
        ticket.timed_out = True
        ticket.emit(StreamEvent(error=RequestTimeoutError(f"request {ticket.id} passed its deadline")))

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
        while True:
            new = self._admit()
            if new is None:
                break
            try:
                if new:
                    self._prefill(new)
                if self._batch is not None:
                    self._step()
            except Exception as err:  # a fault outside the guarded model calls: the running rows
                # fail, the waiting requests do not, the engine goes on
                log.exception("batcher loop failed; failing the %d running requests", self.active)
                self._fail_running(err)
        self._fail_running(EngineClosedError("the server is shutting down"))
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for ticket in pending:
            ticket.emit(StreamEvent(error=EngineClosedError("the server is shutting down")))
        log.info("batcher stopped")

    def _admit(self) -> list[Ticket] | None:
        """Waiting requests for the free slots (None: closed). Blocks while nothing runs."""
        with self._cond:
            if self._batch is None:
                while not self._pending and not self._closed:
                    self._cond.wait(timeout=1.0)
                    self._purge_locked()
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
            self._purge_locked()
            free = self.max_batch_size - self.active
            taken = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
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

    def _fail(self, ticket: Ticket, err: BaseException, what: str) -> None:
        """Fail one request: the detail goes to the log, the request gets a RequestFailedError."""
        log.error("request %d failed in %s: %s: %s", ticket.id, what, type(err).__name__, err)
        self.stats.failed += 1
        failure = RequestFailedError(
            f"the model failed on request {ticket.id} ({what}: {type(err).__name__})"
        )
        failure.__cause__ = err
        ticket.emit(StreamEvent(error=failure))

    @torch.inference_mode()
    def _prefill(self, tickets: list[Ticket]) -> None:
        """Run the new requests' prompts (images spliced in) and merge them into the batch.

        A group whose prefill raises is retried one request at a time; only those that fail alone fail.
        """
        try:
            new = self._prefill_group(tickets)
        except Exception as err:
            if len(tickets) == 1:
                self._fail(tickets[0], err, "prefill")
                return
            self.stats.retried += 1
            log.warning("prefill of %d requests failed (%s); retrying each alone", len(tickets), err)
            for ticket in tickets:
                self._prefill([ticket])
            return
        batch, tokens, failed = new
        self._merge(batch)
        self._take_tokens(tokens, failed, first_row=len(self._batch.rows) - len(batch.rows))

    def _prefill_group(self, tickets: list[Ticket]) -> tuple[RunningBatch, torch.Tensor, list[int]]:
        pipe = self.pipeline
        inputs = pipe.batch_inputs([t.encoded for t in tickets])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with pipe.lock:
            out = pipe.model(
                **inputs, position_ids=positions, use_cache=True, logits_to_keep=1, return_dict=True
            )
        check_cache_layers(out.cache)
        rows = [self._new_row(t) for t in tickets]
        tokens, failed = sample_tokens(out.logits[:, -1, :], rows, self._suppress)
        batch = RunningBatch(out.cache, mask, mask.sum(-1), torch.zeros_like(mask[:, 0]), rows)
        return batch, tokens, failed

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for every running row."""
        now = time.monotonic()
        for row in self._batch.rows:
            if not row.ticket.cancelled and row.ticket.expired(now):
                self._time_out(row.ticket)
        self._drop(lambda row: row.ticket.cancelled or row.ticket.timed_out, cancelled=True)
        if self._batch is None:
            return
        try:
            logits = self._forward(self._batch)
        except Exception as err:
            logits = self._retry_rows(err)
            if logits is None:
                return
        self.stats.steps += 1
        tokens, failed = sample_tokens(logits, self._batch.rows, self._suppress)
        self._take_tokens(tokens, failed, first_row=0)

    def _forward(self, batch: RunningBatch) -> torch.Tensor:
        """One decode step of `batch` -> last logits (B, V); on an error the batch is as before."""
        pipe = self.pipeline
        length = batch.mask.shape[1]
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        try:
            with pipe.lock:
                out = pipe.model(
                    input_ids=batch.next_token[:, None],
                    attention_mask=mask,
                    position_ids=batch.positions[:, None],
                    cache=batch.cache,
                    use_cache=True,
                    return_dict=True,
                )
        except Exception:
            batch.truncate_cache(length)  # layers that ran already appended this step's column
            raise
        batch.cache, batch.mask, batch.positions = out.cache, mask, batch.positions + 1
        return out.logits[:, -1, :]

    def _retry_rows(self, err: Exception) -> torch.Tensor | None:
        """A step of the whole batch raised: step each row alone; the rows that fail alone fail.

        Returns the logits of the rows left (now `self._batch`), or None when none is.
        """
        batch, self._batch = self._batch, None
        if len(batch.rows) == 1:
            self._fail(batch.rows[0].ticket, err, "decode step")
            return None
        self.stats.retried += 1
        log.warning("decode step of %d rows failed (%s); retrying each row alone", len(batch.rows), err)
        parts: list[RunningBatch] = []
        logits: list[torch.Tensor] = []
        for i in range(len(batch.rows)):
            part = batch.subset([i])
            try:
                logits.append(self._forward(part))
            except Exception as row_err:
                self._fail(part.rows[0].ticket, row_err, "decode step")
                continue
            parts.append(part)
        del batch
        if not parts:
            return None
        merged = parts[0]
        for part in parts[1:]:
            merged.extend(part)
        self._batch = merged
        return torch.cat(logits)

    def _merge(self, new: RunningBatch) -> None:
        self.stats.prefills += 1
        if self._batch is None:
            self._batch = new
            return
        self.stats.joined_running += 1
        self._batch.extend(new)

    def _take_tokens(self, tokens: torch.Tensor, failed: list[int], first_row: int) -> None:
        """Hand each row its token (from `first_row` on); finished and failed rows leave the batch."""
        batch = self._batch
        finished: dict[int, str] = {}
        gone: set[int] = set()
        values = tokens.tolist()
        for offset in failed:
            i = first_row + offset
            bad = FloatingPointError("its scores are NaN or allow no token")
            self._fail(batch.rows[i].ticket, bad, "sampling")
            gone.add(i)
        for offset, token in enumerate(values):
            i = first_row + offset
            if i in gone:
                continue
            try:
                reason = self._advance(i, token, tokens[offset : offset + 1])
            except Exception as err:  # e.g. the tokenizer failing on this row's text: this row only
                self._fail(batch.rows[i].ticket, err, "decoding")
                gone.add(i)
                continue
            if reason is not None:
                finished[i] = reason
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch.rows))
        for i, reason in finished.items():
            try:
                self._finish(batch.rows[i], reason)
            except Exception as err:
                self._fail(batch.rows[i].ticket, err, "decoding")
        if finished or gone:
            self._drop(lambda row: False, indices=set(finished) | gone)

    def _advance(self, i: int, token: int, token_tensor: torch.Tensor) -> str | None:
        """Row i takes its token: a text piece to its sink; the finish reason once it is done."""
        batch = self._batch
        row = batch.rows[i]
        batch.next_token[i] = token
        row.completion_tokens += 1
        self.stats.tokens += 1
        if token in self._eos:
            return "stop"
        piece = row.decoder.add(token)
        if piece:
            row.ticket.emit(StreamEvent(piece=piece))
        if row.seen is not None:
            row.seen = torch.unique(torch.cat([row.seen, token_tensor]))
        if row.decoder.stopped:
            return "stop"
        if row.completion_tokens >= row.ticket.config.max_new_tokens:
            return "length"
        if int(batch.positions[i]) + 1 >= self.pipeline.max_context:
            return "length"
        return None

    def _finish(self, row: Row, reason: str) -> None:
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
            n = sum(1 for i in gone if batch.rows[i].ticket.cancelled and not batch.rows[i].ticket.timed_out)
            self.stats.cancelled += n
            log.info("dropped %d cancelled and %d timed-out requests", n, len(gone) - n)
        keep = [i for i in range(len(batch.rows)) if i not in gone]
        if keep:
            batch.keep(keep)
        else:
            self._batch = None

    def _fail_running(self, err: BaseException) -> None:
        """Fail the running rows (the waiting requests are left alone)."""
        batch, self._batch = self._batch, None
        for row in batch.rows if batch is not None else []:
            self.stats.failed += 1
            row.ticket.emit(StreamEvent(error=err))
