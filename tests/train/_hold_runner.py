"""Test support for test_resume: train a recipe and hold it at a known point until it is killed.

    python tests/train/_hold_runner.py RECIPE --stage 1 (--at-step N | --before-publish N)

`--at-step N`: rank 0 stops after optimizer step N, writes `HELD-N` in the checkpoints dir and
waits. `--before-publish N`: checkpoint-N is fully written in its staging dir, then rank 0 writes
`HELD` there and waits, before the rename. Either way the test then kills the process (SIGKILL);
a run left alone exits with an error after HOLD_SECONDS.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from convllava_jp.train.recipe import load_recipe
from convllava_jp.train.stages import train_recipe

HOLD_SECONDS = 600.0


def hold(marker: Path) -> None:
    """Write `marker` (the test waits for it) and wait to be killed."""
    marker.write_text(str(os.getpid()))
    time.sleep(HOLD_SECONDS)
    sys.exit(f"held at {marker} for {HOLD_SECONDS:.0f} s and nobody killed this process")


class HoldAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            hold(Path(args.output_dir) / f"HELD-{self.step}")


def hold_before_publish(step: int):
    def before_publish(staged: Path) -> None:
        if staged.name == f"checkpoint-{step}":
            hold(staged.parent / "HELD")

    return before_publish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--stage", default="all")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--at-step", type=int)
    which.add_argument("--before-publish", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    callbacks = [HoldAtStep(args.at_step)] if args.at_step is not None else []
    before_publish = hold_before_publish(args.before_publish) if args.before_publish is not None else None
    train_recipe(load_recipe(args.recipe), args.stage, callbacks=callbacks, before_publish=before_publish)


if __name__ == "__main__":
    main()
