"""The continuous batcher's decode loop body: the running batch, one step at a time.

`Stepper` owns the running batch (engine thread only): new rows merge in with their first token,
each `step` runs the model once for every row, samples each row with its own settings, hands the
text pieces to the rows' sinks and drops finished, stopped, cancelled, timed-out and failed rows at
once. A step that raises (out of memory included) is undone and retried row by row; only the rows
that fail alone fail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .generation import GenerationResult
from .running_batch import Row, RunningBatch, sample_tokens
from .tickets import BatcherStats, RequestFailedError, RequestTimeoutError, StreamEvent, Ticket

log = logging.getLogger(__name__)


class Stepper:
    """The running batch and what happens to it between and during decode steps.

    Args:
        pipeline: the loaded model (its `lock` is held around each step's model call).
        stats: the batcher's counters (updated from the engine thread only).
        eos: ids that end an answer.
        suppress: ids never sampled.
    """

    def __init__(self, pipeline, stats: BatcherStats, eos: set[int], suppress: torch.Tensor | None):
        self.pipeline = pipeline
        self.stats = stats
        self.eos = eos
        self.suppress = suppress
        self.batch: RunningBatch | None = None

    @property
    def rows(self) -> int:
        batch = self.batch
        return len(batch.rows) if batch is not None else 0

    # --- failures ----------------------------------------------------------------------------
    def fail(self, ticket: Ticket, err: BaseException, what: str) -> None:
        """Fail one request: the detail goes to the log, the request gets a RequestFailedError."""
        log.error("request %d failed in %s: %s: %s", ticket.id, what, type(err).__name__, err)
        self.stats.failed += 1
        failure = RequestFailedError(
            f"the model failed on request {ticket.id} ({what}: {type(err).__name__})"
        )
        failure.__cause__ = err
        ticket.emit(StreamEvent(error=failure))

    def time_out(self, ticket: Ticket) -> None:
        self.stats.timed_out += 1
        ticket.timed_out = True
        ticket.emit(StreamEvent(error=RequestTimeoutError(f"request {ticket.id} passed its deadline")))

    def fail_running(self, err: BaseException) -> None:
        """Fail the running rows (the waiting requests are left alone)."""
        batch, self.batch = self.batch, None
        for row in batch.rows if batch is not None else []:
            self.stats.failed += 1
            row.ticket.emit(StreamEvent(error=err))

    # --- joining -----------------------------------------------------------------------------
    @torch.inference_mode()
    def merge(self, new: RunningBatch, tokens: torch.Tensor, failed: list[int]) -> None:
        """Append prefilled rows and hand each its first token."""
        self.stats.prefills += 1
        if self.batch is None:
            self.batch = new
        else:
            self.stats.joined_running += 1
            self.batch.extend(new)
        self._take_tokens(tokens, failed, first_row=len(self.batch.rows) - len(new.rows))

    # --- stepping ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, now: float) -> None:
        """One decode step for every running row (rows past their deadline at `now` leave first)."""
        for row in self.batch.rows:
            if not row.ticket.cancelled and row.ticket.expired(now):
                self.time_out(row.ticket)
        self.drop(lambda row: row.ticket.cancelled or row.ticket.timed_out, cancelled=True)
        if self.batch is None:
            return
        try:
            logits = self._forward(self.batch)
        except Exception as err:
            logits = self._retry_rows(err)
            if logits is None:
                return
        self.stats.steps += 1
        tokens, failed = sample_tokens(logits, self.batch.rows, self.suppress)
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

        Returns the logits of the rows left (now `self.batch`), or None when none is.
        """
        batch, self.batch = self.batch, None
        if len(batch.rows) == 1:
            self.fail(batch.rows[0].ticket, err, "decode step")
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
                self.fail(part.rows[0].ticket, row_err, "decode step")
                continue
            parts.append(part)
        del batch
        if not parts:
            return None
        merged = parts[0]
        for part in parts[1:]:
            merged.extend(part)
        self.batch = merged
        return torch.cat(logits)

    # --- tokens ------------------------------------------------------------------------------
    def _take_tokens(self, tokens: torch.Tensor, failed: list[int], first_row: int) -> None:
        """Hand each row its token (from `first_row` on); finished and failed rows leave the batch."""
        batch = self.batch
        finished: dict[int, str] = {}
        gone: set[int] = set()
        values = tokens.tolist()  # one host sync for all rows
        for offset in failed:
            i = first_row + offset
            bad = FloatingPointError("its scores are NaN or allow no token")
            self.fail(batch.rows[i].ticket, bad, "sampling")
            gone.add(i)
        batch.next_token[first_row:] = tokens
        positions = batch.positions[first_row:].tolist()
        for offset, token in enumerate(values):
            i = first_row + offset
            if i in gone:
                continue
            try:
                reason = self._advance(batch.rows[i], token, positions[offset])
            except Exception as err:  # e.g. the tokenizer failing on this row's text: this row only
                self.fail(batch.rows[i].ticket, err, "decoding")
                gone.add(i)
                continue
            if reason is not None:
                finished[i] = reason
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch.rows))
        for i, reason in finished.items():
            try:
                self._finish(batch.rows[i], reason)
            except Exception as err:
                self.fail(batch.rows[i].ticket, err, "decoding")
        if finished or gone:
            self.drop(lambda row: False, indices=set(finished) | gone)

    def _advance(self, row: Row, token: int, position: int) -> str | None:
        """A row takes its token: a text piece to its sink; the finish reason once it is done."""
        row.completion_tokens += 1
        self.stats.tokens += 1
        if row.completion_tokens == 1:
            self.stats.first_tokens += 1
            self.stats.first_token_s += time.monotonic() - row.ticket.submitted_at
        if token in self.eos:
            return "stop"
        piece = row.decoder.add(token)
        if piece:
            row.ticket.emit(StreamEvent(piece=piece))
        if row.seen is not None:
            row.seen = torch.unique(torch.cat([row.seen, row.seen.new_tensor([token])]))
        if row.decoder.stopped:
            return "stop"
        if row.completion_tokens >= row.ticket.config.max_new_tokens:
            return "length"
        if position + 1 >= self.pipeline.max_context:
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

    def drop(
        self, predicate: Callable[[Row], bool], indices: set[int] = frozenset(), cancelled=False
    ) -> None:
        """Remove rows (by index or predicate) from the batch; trim padding no row needs."""
        batch = self.batch
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
            self.batch = None
