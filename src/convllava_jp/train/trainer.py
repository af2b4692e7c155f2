"""`ConvLlavaTrainer`: transformers' `Trainer` plus what a VLM stage needs on top.

The loop itself is the HF Trainer (DDP / FSDP / DeepSpeed via accelerate, gradient accumulation,
resume, TensorBoard). Added here: LLaVA's modality-length grouped sampler, skipped-record
accounting (gathered to rank 0 under DDP), per-module learning rates, and checkpoints that appear
only complete (written into a staging directory, then published by `train.checkpoints`) and
carry the skip counts.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..data.sampler import ModalityLengthGroupedSampler
from ..data.skips import SkippedRecord, SkipTracker
from ..errors import ConfigError, DataError
from ..io import read_json, write_atomic
from .checkpoints import SKIP_STATE_NAME, BeforePublish, checkpoint_staging, publish_checkpoint
from .distributed import barrier, is_distributed
from .feature_cache import FeatureCache

log = logging.getLogger(__name__)

# Module names as `lr_multipliers` call them -> parameter-name prefix.
PART_PREFIXES = {"vision": "vision_tower.", "projector": "projector.", "llm": "language_model."}


class SkipAccounting:
    """Feeds skipped records to the `SkipTracker`, from every process of a distributed run.

    One process: each batch's skips go to the tracker at once. Several: each process buffers its
    own, and at every optimizer step (`flush`, called on all processes) they are gathered so that
    rank 0 alone writes `skipped.jsonl` while every process keeps the same counts and all of them
    stop together once the allowance is exceeded.
    """

    def __init__(self, tracker: SkipTracker, world_size: int, is_main: bool) -> None:
        self.tracker = tracker
        self.world_size = world_size
        self.is_main = is_main
        self.pending: list[SkippedRecord] = []

    def add(self, skipped: Sequence[SkippedRecord]) -> None:
        if not skipped:
            return
        if self.world_size == 1:
            self.tracker.update(skipped)
        else:
            self.pending.extend(skipped)

    def flush(self) -> None:
        if self.world_size == 1 or not is_distributed():
            if self.pending:
                self.tracker.update(self.pending)
                self.pending = []
            return
        gathered: list[list[SkippedRecord]] = [[] for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, self.pending)
        self.pending = []
        merged = [r for part in gathered for r in part]
        if not merged:
            return
        if self.is_main:
            self.tracker.update(merged)  # writes the file; raises above the allowance
            return
        self.tracker.counts.update(r.reason for r in merged)
        if self.tracker.count > self.tracker.allowance:
            raise DataError(
                f"{self.tracker.count} of {self.tracker.total_records} records skipped, above "
                f"--max-bad-fraction {self.tracker.max_bad_fraction}; see {self.tracker.path}"
            )

    def restore(self, checkpoint: Path | None) -> None:
        """Counts from `checkpoint` (none: start at 0); rank 0 cuts `skipped.jsonl` to match.

        Records skipped after the checkpoint are met again when the run replays those steps, so
        the lines written for them before the interruption are dropped rather than doubled.
        """
        state_file = checkpoint / SKIP_STATE_NAME if checkpoint else None
        if state_file is not None and state_file.is_file():
            self.tracker.load_state_dict(read_json(state_file, what="skipped-record counts"))
        if not self.is_main or not self.tracker.path.exists():
            return
        keep = self.tracker.count
        with open(self.tracker.path, encoding="utf-8") as f:
            lines = f.readlines()
        if len(lines) != keep:
            write_atomic(self.tracker.path, "".join(lines[:keep]))
            log.info("skipped.jsonl: kept the %d records counted up to the checkpoint", keep)


class SkipFlush(TrainerCallback):
    """Gathers the skipped records of every process at each optimizer step."""

    def __init__(self, accounting: SkipAccounting) -> None:
        self.accounting = accounting

    def on_step_end(self, args, state, control, **kwargs):
        self.accounting.flush()


class ProgressLog(TrainerCallback):
    """Logs loss / lr as the run goes (numbers that tell you it works)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero and "loss" in logs:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
            )


def _part_of(name: str) -> str | None:
    """Which part (vision / projector / llm) a parameter name belongs to; wrapper prefixes ignored."""
    dotted = "." + name
    for part, prefix in PART_PREFIXES.items():
        if "." + prefix in dotted:
            return part
    return None


class ConvLlavaTrainer(Trainer):
    """HF Trainer + modality-length grouping, skipped-record accounting, per-module lr, atomic saves.

    Args (besides the Trainer's):
        skip_tracker: counts and writes skipped records (`SkipTracker`).
        lengths: signed modality lengths of the train set (`ConversationDataset.lengths`).
        lr_multipliers: `{part: factor}` for vision / projector / llm; a part's parameters get
            `learning_rate * factor`.
        skip_accounting: how skips reach the tracker; default one process, straight through.
        before_publish: called (main process) with each checkpoint's complete staged directory
            right before it is published.
    """

    def __init__(
        self,
        *args: Any,
        skip_tracker: SkipTracker,
        lengths: Sequence[int],
        lr_multipliers: dict[str, float] | None = None,
        skip_accounting: SkipAccounting | None = None,
        before_publish: BeforePublish | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.skip_tracker = skip_tracker
        self.lengths = lengths
        self.lr_multipliers = dict(lr_multipliers or {})
        for part in self.lr_multipliers:
            if part not in PART_PREFIXES:
                raise ConfigError(f"lr_multipliers: unknown part {part!r} ({', '.join(PART_PREFIXES)})")
        self.skip_accounting = skip_accounting or SkipAccounting(skip_tracker, 1, True)
        self.before_publish = before_publish
        self.feature_cache: FeatureCache | None = None  # set by `stages.build_trainer`

    def _get_train_sampler(self, train_dataset=None):
        # The global batch (all processes, all accumulated micro-batches) is one modality, so each
        # optimizer step is all-image or all-text, and the same samples make up each step however
        # the global batch is split into processes and accumulation steps.
        batch = (
            self.args.per_device_train_batch_size
            * max(self.args.world_size, 1)
            * max(self.args.gradient_accumulation_steps, 1)
        )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(self.lengths, batch, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped:
            self.skip_accounting.add(skipped)
        if inputs["input_ids"].numel() == 0:  # every sample of this batch was a broken record
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (zero, None) if return_outputs else zero
        if self.feature_cache is not None:
            inputs = self.feature_cache.swap_in(inputs, model)
        if not return_outputs and "labels" in inputs and self.compute_loss_func is None:
            # The loss alone: the LM head runs on the supervised positions only (no logits).
            inputs = {**inputs, "loss_only": True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if not self.lr_multipliers or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            mult = float(self.lr_multipliers.get(_part_of(name) or "", 1.0))
            groups.setdefault((mult, name in decay), []).append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        param_groups = [
            {"params": ps, "lr": lr * mult, "weight_decay": self.args.weight_decay if decayed else 0.0}
            for (mult, decayed), ps in groups.items()
        ]
        self.optimizer = optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)
        log.info(
            "optimizer param groups: %s",
            [(f"lr={g['lr']:.2e}", sum(p.numel() for p in g["params"])) for g in param_groups],
        )
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        # The Trainer writes checkpoint-N into a staging dir, published only when complete, so a
        # kill at any moment leaves the last good checkpoint loadable.
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging = checkpoint_staging(run_dir, step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        barrier()  # nobody writes into staging before it is clean
        original = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
        self.skip_accounting.flush()
        barrier()  # every process's files (rng_state_<rank>.pth, shards) are in staging
        if self.args.should_save:
            publish_checkpoint(
                run_dir,
                step,
                self.skip_tracker.state_dict(),
                self.args.save_total_limit,
                self.before_publish,
            )
        barrier()
