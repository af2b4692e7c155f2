"""The continuous batcher's admission: new requests' prompts run (images spliced in) as one batch.

`Prefiller.run` turns waiting tickets into a `RunningBatch` with each row's first token, ready to
be merged into the running one. It only computes: failures and counters come back in the
`Prefilled` outcome and the engine thread applies them, so `run` may execute in a worker thread
while the engine keeps stepping the running rows. A group whose prefill raises is retried one
ticket at a time; only the tickets that fail alone fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .running_batch import Row, RunningBatch, check_cache_layers, sample_tokens
from .tickets import Ticket

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """What prefilling some tickets gave: batches to merge (with their first tokens and the rows
    whose scores no sampler can use) and the tickets whose prefill failed alone."""

    parts: list[tuple[RunningBatch, torch.Tensor, list[int]]] = field(default_factory=list)
    failures: list[tuple[Ticket, BaseException]] = field(default_factory=list)
    retried: int = 0  # groups that raised and were retried one ticket at a time

    @property
    def rows(self) -> int:
        return sum(len(batch.rows) for batch, _, _ in self.parts)


class Prefiller:
    """Runs new tickets' prompts through the model (left-padded, images spliced in).

    Args:
        pipeline: the loaded model.
        new_row: a ticket's running state (decoder, sampler), made by the engine.
        suppress: ids never sampled.
    """

    def __init__(self, pipeline, new_row: Callable[[Ticket], Row], suppress: torch.Tensor | None):
        self.pipeline = pipeline
        self.new_row = new_row
        self.suppress = suppress

    def run(self, tickets: list[Ticket], lock=None) -> Prefilled:
        """Prefill `tickets` together; on an error, each alone. Never raises for a model error.

        `lock` is held around each model call (None: none, as beside the engine's steps: a forward
        pass only reads the model, so it may run while a step runs).
        """
        outcome = Prefilled()
        with torch.inference_mode():
            self._run(tickets, lock, outcome)
        return outcome

    def _run(self, tickets: list[Ticket], lock, outcome: Prefilled) -> None:
        try:
            outcome.parts.append(self._group(tickets, lock))
        except Exception as err:
            if len(tickets) == 1:
                outcome.failures.append((tickets[0], err))
                return
            outcome.retried += 1
            log.warning("prefill of %d requests failed (%s); retrying each alone", len(tickets), err)
            for ticket in tickets:
                self._run([ticket], lock, outcome)

    def _group(self, tickets: list[Ticket], lock) -> tuple[RunningBatch, torch.Tensor, list[int]]:
        pipe = self.pipeline
        inputs = pipe.batch_inputs([t.encoded for t in tickets])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(inputs, position_ids=positions, use_cache=True, logits_to_keep=1, return_dict=True)
        if lock is None:
            out = pipe.model(**kwargs)
        else:
            with lock:
                out = pipe.model(**kwargs)
        check_cache_layers(out.cache)
        rows = [self.new_row(t) for t in tickets]
        tokens, failed = sample_tokens(out.logits[:, -1, :], rows, self.suppress)
        batch = RunningBatch(out.cache, mask, mask.sum(-1), torch.zeros_like(mask[:, 0]), rows)
        return batch, tokens, failed
