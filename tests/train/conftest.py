"""Helpers for the training tests: small stage configs, recipe files, CLI subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SRC = Path(__file__).resolve().parents[2] / "src"
HOLD_RUNNER = Path(__file__).resolve().parent / "_hold_runner.py"

# Settings every test stage shares: fp32, no workers, no checkpointing, a loss logged every step.
TEST_DEFAULTS = {
    "per_device_batch": 4,
    "grad_accum": 1,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "max_length": 96,
    "num_workers": 0,
    "optimizer": "adamw",
    "schedule": "cosine",
    "warmup_ratio": 0.1,
    "logging_steps": 1,
    "save_steps": 0,
    "lr": 1.0e-3,
}


def write_recipe(path: Path, output_dir: Path, init_dir: Path, stages: dict, **defaults) -> Path:
    """A recipe YAML starting from `init_dir` with TEST_DEFAULTS (+ `defaults`) for every stage."""
    recipe = {
        "name": "test",
        "model": {"init": str(init_dir)},
        "output_dir": str(output_dir),
        "defaults": {**TEST_DEFAULTS, **defaults},
        "stages": stages,
    }
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `python -m convllava_jp.cli` subprocess (offline, src on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def start_train(recipe: Path, log_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start `convllava-jp train` in a subprocess; output goes to `log_path`."""
    out = open(log_path, "ab")  # inherited by the child; closed when the test ends
    return subprocess.Popen(
        [sys.executable, "-m", "convllava_jp.cli", "train", "--recipe", str(recipe), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=cli_env(**env),
    )


def start_held_train(recipe: Path, log_path: Path, *args: str) -> subprocess.Popen:
    """Start `_hold_runner.py` (train, then hold at a point `args` name until killed) in a subprocess."""
    out = open(log_path, "ab")  # inherited by the child; closed when the test ends
    return subprocess.Popen(
        [sys.executable, str(HOLD_RUNNER), str(recipe), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=cli_env(),
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process under it, then reap it.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    leaves the workers running (held forever, ~0.9 GB each); they are found before anything dies.
    """
    import psutil  # accelerate's dependency

    try:
        parent = psutil.Process(proc.pid)
        victims = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n_procs: int, *args: str) -> list[str]:
    """The command line of `torch.distributed.run` starting `n_procs` local processes (gloo on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n_procs),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]


def losses_by_step(stage_dir: Path) -> dict[int, float]:
    """Per-step training losses from a finished stage's log_history.json."""
    history = json.loads((stage_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="session")
def broken_stage1(tiny_world: Path, tiny_model_dir: Path) -> Path:
    """The tiny world's captions with 3 records whose image is missing (skipped, counted).

    The broken records replace ones the sampler (batch 4, seed 0) draws at steps 2, 5 and 6
    (test_resume relies on 5 and 6 falling between checkpoint-4 and the kill): at step 2 the first
    of the batch, at steps 5 and 6 the last. Split over two processes (per-device batch 2), the
    first goes to rank 0 and the last to rank 1 (whether the global batch is cut in halves or
    dealt out alternately), so test_distributed sees skips made in both processes. A record's
    sampling length does not depend on its image path, so replacing keeps the order.
    """
    from convllava_jp.data.dataset import ConversationDataset
    from convllava_jp.data.records import DataSource
    from convllava_jp.data.sampler import ModalityLengthGroupedSampler
    from convllava_jp.model.processing import ConvLlavaProcessor

    records = json.loads((tiny_world / "stage1.json").read_text(encoding="utf-8"))
    path = tiny_world / "stage1_broken.json"  # beside the images: their paths stay relative
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    processor = ConvLlavaProcessor.from_pretrained(tiny_model_dir)
    dataset = ConversationDataset([DataSource(path)], processor, "plain", TEST_DEFAULTS["max_length"])
    order = list(ModalityLengthGroupedSampler(dataset.lengths, 4, seed=0))
    for k, (step, position) in enumerate([(2, 0), (5, 3), (6, 3)]):
        i = order[4 * (step - 1) + position]
        records[i] = dict(records[i], id=f"broken_{k}", image=f"images/missing_{k}.png")
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
