"""Shared fixtures: a tiny synthetic world and a tiny random model built from it (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small synthetic world (images, LLaVA JSON, tokenizer)."""
    from convllava_jp.demo.world import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, 64, 16, seed=0, progress=False, n_pretrain_text=200)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_world, tmp_path_factory):
    """A randomly initialised `tiny` model dir (model + processor) using the world's tokenizer."""
    from convllava_jp.convert.init import init_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    init_model("tiny", out, tokenizer=str(tiny_world / "tokenizer"))
    return out
