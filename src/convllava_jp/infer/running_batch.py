"""The continuous batcher's running batch: per-row state, the shared KV cache, sampling.

Rows join (`RunningBatch.extend`: both caches left-padded to one length) and leave
(`RunningBatch.keep`: padding no remaining row needs is trimmed) between decode steps;
`subset` copies some rows out (a failed step is retried row by row) and `truncate_cache` undoes a
step that failed half way. `sample_tokens` picks each row's next token with that row's own
settings and names the rows whose scores no sampler can use (NaN, nothing allowed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .decoding import IncrementalDecoder

if TYPE_CHECKING:
    from .tickets import Ticket


@dataclass
class Row:
    """A running request: its decoder, sampler state and counters."""

    ticket: Ticket
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    seen: torch.Tensor | None  # unique ids for the repetition penalty, (K,) long; None when 1.0
    completion_tokens: int = 0


def check_cache_layers(cache) -> list:
    """The per-layer K/V holders of a full-attention DynamicCache, or ConfigError."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise ConfigError(
            "continuous batching needs a full-attention dynamic KV cache (GPT-2, Llama, GPT-NeoX); "
            f"this model's cache is {type(cache).__name__} with {sorted({type(x).__name__ for x in layers or []})}"
        )
    return layers


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class RunningBatch:
    """The running batch. The cache holds every token but each row's `next_token`.

    cache: KV cache, (B, heads, T, head_dim) per layer; mask (B, T) 1 where a real token is;
    positions (B,): position id of `next_token`.
    """

    cache: object
    mask: torch.Tensor
    positions: torch.Tensor
    next_token: torch.Tensor
    rows: list[Row] = field(default_factory=list)

    def extend(self, new: RunningBatch) -> None:
        """Append `new`'s rows; the shorter of the two caches is left-padded to the longer."""
        t_old, t_new = self.mask.shape[1], new.mask.shape[1]
        length = max(t_old, t_new)
        for a, b in zip(check_cache_layers(self.cache), check_cache_layers(new.cache)):
            a.keys = torch.cat([_pad_left(a.keys, length - t_old, 2), _pad_left(b.keys, length - t_new, 2)])
            a.values = torch.cat(
                [_pad_left(a.values, length - t_old, 2), _pad_left(b.values, length - t_new, 2)]
            )
        self.mask = torch.cat(
            [_pad_left(self.mask, length - t_old, 1), _pad_left(new.mask, length - t_new, 1)]
        )
        self.positions = torch.cat([self.positions, new.positions])
        self.next_token = torch.cat([self.next_token, new.next_token])
        self.rows += new.rows

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (non-empty); trim the columns that are padding in all of them."""
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).nonzero()[0, 0])
        for layer in check_cache_layers(self.cache):
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions[idx]
        self.next_token = self.next_token[idx]
        self.rows = [self.rows[i] for i in keep]

    def subset(self, keep: list[int]) -> RunningBatch:
        """A new batch of copies of the rows at `keep`; this one is left as it is."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in check_cache_layers(self.cache)]
        new = RunningBatch(cache, self.mask, self.positions, self.next_token, list(self.rows))
        new.keep(keep)
        return new

    def truncate_cache(self, length: int) -> None:
        """Drop cache columns past `length` (what a failed step had already appended to some layers)."""
        for layer in check_cache_layers(self.cache):
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def suppressed_ids(model, device: torch.device) -> torch.Tensor | None:
    """The ids in the model's `generation_config.suppress_tokens` (e.g. the image placeholder)."""
    ids = getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or []
    ids = sorted({int(i) for i in ids if int(i) >= 0})
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def sample_tokens(
    logits: torch.Tensor, rows: list[Row], suppress: torch.Tensor | None
) -> tuple[torch.Tensor, list[int]]:
    """Next token of each row, (B,), with each row's penalty, temperature and top-p; and the
    indices of the rows that cannot be decoded (a NaN score, no token allowed, or sampling
    probabilities that are not finite): their tokens are meaningless, the caller fails them alone.

    The `suppress` ids are never picked, as with transformers' `generate` and `suppress_tokens`.
    """
    logits = logits.float()
    for i, row in enumerate(rows):
        if row.seen is not None:
            p = row.ticket.config.repetition_penalty
            score = logits[i, row.seen]
            logits[i, row.seen] = torch.where(score < 0, score * p, score / p)
    if suppress is not None:
        logits[:, suppress[suppress < logits.shape[-1]]] = float("-inf")
    tokens = logits.argmax(-1)
    # One pass over the scores: argmax picks a NaN when there is one, and -inf only when all are.
    best = logits.gather(-1, tokens[:, None])[:, 0]
    bad = torch.isnan(best) | (best == float("-inf"))
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        probs = torch.stack([_probabilities(logits[i], rows[i].ticket.config) for i in sampled])
        usable = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
        bad[sampled] |= ~usable
    failed = bad.nonzero().flatten().tolist()  # the one host sync of the sampler
    for j, i in enumerate(sampled):
        if i not in failed:
            tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return tokens, failed


def _probabilities(scores: torch.Tensor, cfg) -> torch.Tensor:
    """One row's sampling distribution: temperature, then top-p (as transformers' TopPLogitsWarper)."""
    scores = scores / cfg.temperature
    if cfg.top_p < 1.0:
        # Drop the low tail whose mass is <= 1 - top_p; the most likely token always stays.
        sorted_scores, order = torch.sort(scores)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - cfg.top_p
        remove[-1] = False
        scores[order[remove]] = float("-inf")
    return scores.softmax(-1)
