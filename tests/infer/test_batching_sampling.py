"""`sample_tokens` finds the rows no sampler can use in one pass over the scores (issue 18, section 2)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from convllava_jp.infer.generation import GenerationConfig
from convllava_jp.infer.running_batch import sample_tokens


def row(config: GenerationConfig, seed: int | None = None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SimpleNamespace(ticket=SimpleNamespace(config=config), generator=generator, seen=None)


def test_one_nan_score_or_no_allowed_token_fails_only_that_row():
    logits = torch.randn(5, 50)
    logits[1, 17] = float("nan")  # one NaN among finite scores
    logits[2] = float("-inf")  # nothing allowed
    logits[3, :40] = float("-inf")  # some disallowed: fine
    logits[4, 3] = float("nan")  # sampled row with a NaN
    greedy, sampled = GenerationConfig(), GenerationConfig(temperature=0.7)
    rows = [row(greedy), row(greedy), row(greedy), row(greedy), row(sampled, seed=1)]
    tokens, failed = sample_tokens(logits.clone(), rows, suppress=torch.tensor([0]))
    assert failed == [1, 2, 4]
    assert int(tokens[0]) == int(logits[0, 1:].argmax()) + 1  # suppressed id 0 never picked
    assert int(tokens[3]) >= 40


def test_suppressed_ids_leaving_nothing_fail_the_row():
    logits = torch.full((1, 4), float("-inf"))
    logits[0, 2] = 1.0
    _, failed = sample_tokens(logits, [row(GenerationConfig())], suppress=torch.tensor([2]))
    assert failed == [0]
