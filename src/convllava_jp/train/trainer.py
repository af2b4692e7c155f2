"""Run recipe stages with the HF Trainer: freezing, data, sampler, skipped records, checkpoints.

The loop itself is transformers' `Trainer` (DDP / FSDP / DeepSpeed via accelerate, gradient
accumulation, resume, TensorBoard). This module only adds what a VLM stage needs on top:

- `apply_trainable`: the recipe's `trainable` list -> `requires_grad` per module.
- `ConvLlavaTrainer`: LLaVA's modality-length grouped sampler, skipped-record accounting (gathered
  to rank 0 under DDP), per-module learning rates, and checkpoints that appear only complete
  (written into a staging directory, then renamed) and carry the skip counts.
- `run_stage` / `train_recipe`: one stage / a whole recipe, resuming from the newest complete
  checkpoint; LoRA / QLoRA on the LLM via `train.lora`.

Under `torchrun` / `accelerate launch` every process runs the same code; only rank 0 writes
`skipped.jsonl`, `result.json`, `log_history.json` and the final model, and the processes meet at
barriers around checkpoint publishing and at the end of each stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data.dataset import (
    ConversationDataset,
    DataCollator,
    DataSource,
    ModalityLengthGroupedSampler,
    SkippedRecord,
    SkipTracker,
)
from ..errors import CheckpointError, ConfigError, DataError
from .lora import apply_lora, check_lora_supported, merge_lora, quantize_llm_4bit
from .recipe import Recipe, StageConfig

log = logging.getLogger(__name__)

SKIP_STATE_NAME = "skip_tracker.json"
TRAINER_STATE_NAME = "trainer_state.json"
# Test hooks (used by tests/train to kill a run at a known point; no effect unless set):
#   CONVLLAVA_JP_TEST_HOLD_AT_STEP=N          rank 0 stops after optimizer step N (writes HELD-N in
#                                             the checkpoints dir) and waits to be killed
#   CONVLLAVA_JP_TEST_HOLD_BEFORE_PUBLISH=N   checkpoint-N is fully written in its staging dir,
#                                             then rank 0 waits (writes HELD there) before the rename
HOLD_AT_STEP_ENV = "CONVLLAVA_JP_TEST_HOLD_AT_STEP"
HOLD_BEFORE_PUBLISH_ENV = "CONVLLAVA_JP_TEST_HOLD_BEFORE_PUBLISH"
_HOLD_SECONDS = 600.0

# Module names as `lr_multipliers` and trainable counts call them -> parameter-name prefix.
PART_PREFIXES = {"vision": "vision_tower.", "projector": "projector.", "llm": "language_model."}


def _env_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / accelerate launch set both)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _hold(marker: Path, what: str) -> None:
    """Test hook: write `marker` and wait (to be killed) for at most _HOLD_SECONDS."""
    marker.write_text(str(os.getpid()))
    log.warning("test hook: holding %s (%s); waiting to be killed", what, marker)
    deadline = time.monotonic() + _HOLD_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.2)


# --- which modules train ----------------------------------------------------------------------
def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters per part (vision, projector, llm) and their total."""
    counts = {
        "vision": sum(p.numel() for p in model.vision_tower.parameters() if p.requires_grad),
        "projector": sum(p.numel() for p in model.projector.parameters() if p.requires_grad),
        "llm": sum(p.numel() for p in model.language_model.parameters() if p.requires_grad),
    }
    counts["total"] = sum(counts.values())
    return counts


def apply_trainable(model, trainable: list, allow_empty: bool = False) -> dict[str, int]:
    """Freeze everything, then unfreeze the recipe's modules; returns trainable params per part.

    Names: `stage5` (the added stages), `vision` (whole tower), `{vision_from_stage: N}`
    (stages N.. of the tower, 1-based), `projector`, `llm`. `allow_empty` lets a caller that
    adds trainable parameters afterwards (LoRA adapters) pass a list that selects nothing.
    """
    model.requires_grad_(False)
    stages = model.vision_tower.encoder.stages
    trunk = model.config.trunk_stages
    for item in trainable:
        if isinstance(item, dict):
            ((key, value),) = item.items()
        else:
            key, value = item, None
        if key == "stage5":
            if len(stages) <= trunk:
                raise ConfigError("`stage5` is trainable in the recipe but the model has no stage 5")
            for stage in stages[trunk:]:
                stage.requires_grad_(True)
        elif key == "vision":
            model.vision_tower.requires_grad_(True)
        elif key == "vision_from_stage":
            first = int(value)
            if not 1 <= first <= len(stages):
                raise ConfigError(f"vision_from_stage must be in 1..{len(stages)}, got {value}")
            for stage in stages[first - 1 :]:
                stage.requires_grad_(True)
        elif key == "projector":
            model.projector.requires_grad_(True)
        elif key == "llm":
            model.language_model.requires_grad_(True)
        else:
            raise ConfigError(f"unknown trainable module {item!r}")
    counts = trainable_counts(model)
    if not counts["total"] and not allow_empty:
        raise ConfigError("the recipe stage trains nothing: `trainable` selects no parameters")
    return counts


# --- skipped records ---------------------------------------------------------------------------
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
        if self.world_size == 1 or not _distributed():
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
            self.tracker.load_state_dict(json.loads(state_file.read_text(encoding="utf-8")))
        if not self.is_main or not self.tracker.path.exists():
            return
        keep = self.tracker.count
        with open(self.tracker.path, encoding="utf-8") as f:
            lines = f.readlines()
        if len(lines) != keep:
            self.tracker.path.write_text("".join(lines[:keep]), encoding="utf-8")
            log.info("skipped.jsonl: kept the %d records counted up to the checkpoint", keep)


class _StepHooks(TrainerCallback):
    """Per-step work: gather skipped records; the test hook that holds a run at a given step."""

    def __init__(self, accounting: SkipAccounting, run_dir: Path) -> None:
        self.accounting = accounting
        self.run_dir = run_dir
        hold = os.environ.get(HOLD_AT_STEP_ENV)
        self.hold_at = int(hold) if hold else None

    def on_step_end(self, args, state, control, **kwargs):
        self.accounting.flush()
        if self.hold_at is not None and state.global_step == self.hold_at and state.is_world_process_zero:
            _hold(self.run_dir / f"HELD-{state.global_step}", f"training after step {state.global_step}")


class _ProgressLog(TrainerCallback):
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


# --- Trainer ---------------------------------------------------------------------------------
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
    """

    def __init__(
        self,
        *args: Any,
        skip_tracker: SkipTracker,
        lengths: Sequence[int],
        lr_multipliers: dict[str, float] | None = None,
        skip_accounting: SkipAccounting | None = None,
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

    def _get_train_sampler(self, train_dataset=None):
        # The global batch (all processes) is one modality, so each step is all-image or all-text.
        batch = self.args.per_device_train_batch_size * max(self.args.world_size, 1)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(self.lengths, batch, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped:
            self.skip_accounting.add(skipped)
        if inputs["input_ids"].numel() == 0:  # every sample of this batch was a broken record
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (zero, None) if return_outputs else zero
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
        # Atomic: the Trainer writes checkpoint-N into a staging dir, which is renamed into place
        # only when complete, so a kill at any moment leaves the last good checkpoint loadable.
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging = run_dir / f".staging-{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()  # nobody writes into staging before it is clean
        original = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
        self.skip_accounting.flush()
        name = f"checkpoint-{step}"
        if self.args.should_save:
            (staging / name / SKIP_STATE_NAME).write_text(json.dumps(self.skip_tracker.state_dict()))
        _barrier()  # every process's files (rng_state_<rank>.pth, shards) are in staging
        if self.args.should_save:
            _fsync_tree(staging / name)
            hold = os.environ.get(HOLD_BEFORE_PUBLISH_ENV)
            if hold and int(hold) == step:
                _hold(staging / "HELD", f"checkpoint-{step} before publishing it")
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync(run_dir)
            _rotate_checkpoints(run_dir, self.args.save_total_limit)
            log.info("checkpoint %s saved", final)
        _barrier()


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries); best effort where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(root: Path) -> None:
    """Flush a finished checkpoint's files to disk before the rename publishes it (power loss)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            _fsync(path)
    _fsync(root)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-N` dirs (only renamed-into-place, i.e. complete, ones), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _rotate_checkpoints(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = complete_checkpoints(run_dir)
    for old in ckpts[: max(len(ckpts) - limit, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: newest complete one (`True`), a given path, or none."""
    if resume is True:
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    if not resume:
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"--resume {path}: not a complete checkpoint (no {TRAINER_STATE_NAME}); complete ones in "
            f"{run_dir}: {', '.join(p.name for p in complete_checkpoints(run_dir)) or 'none'}"
        )
    return path


# --- one stage -------------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: str
    model_dir: str
    final_loss: float
    steps: int
    seconds: float
    samples: int
    skipped: int
    trainable_params: dict


def _precision_flags(precision: str) -> dict:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _optimizer_name(stage: StageConfig) -> str:
    """HF `optim` name: bitsandbytes' 8-bit AdamW where it can run (CUDA), else torch AdamW."""
    if stage.optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401

            if torch.cuda.is_available():
                return "adamw_bnb_8bit"
        except ImportError:
            pass
        log.warning("stage %s: 8-bit AdamW needs bitsandbytes and a CUDA GPU; using torch AdamW", stage.name)
    return "adamw_torch"


def training_arguments(
    stage: StageConfig, run_dir: Path, world_size: int = 1, find_unused_parameters: bool = False
) -> TrainingArguments:
    """TrainingArguments of a stage on `world_size` processes (the global batch is kept)."""
    per_device, accum = stage.batch_plan(world_size)
    if per_device != stage.per_device_batch and stage.global_batch:
        log.info(
            "stage %s: per-device batch %d (not %d) x %d processes x %d accumulation = global batch %d",
            stage.name,
            per_device,
            stage.per_device_batch,
            world_size,
            accum,
            stage.global_batch,
        )
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        learning_rate=stage.lr,
        lr_scheduler_type=stage.schedule,
        warmup_steps=stage.warmup_ratio,  # < 1: a ratio of the total steps
        weight_decay=stage.weight_decay,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        max_grad_norm=stage.max_grad_norm,
        optim=_optimizer_name(stage),
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if stage.save_steps else "no",
        save_steps=stage.save_steps or 500,
        save_total_limit=stage.save_total_limit,
        dataloader_num_workers=stage.num_workers,
        dataloader_persistent_workers=stage.num_workers > 0,
        remove_unused_columns=False,
        report_to=["tensorboard"],
        seed=stage.seed,
        data_seed=stage.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=find_unused_parameters,
        disable_tqdm=False,
        **_precision_flags(stage.precision),
    )


def plot_loss(log_history: list[dict], path: Path, title: str) -> None:
    """Loss-curve PNG of one stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _needs_unused_parameter_search(lengths: Sequence[int], counts: dict[str, int], world_size: int) -> bool:
    # A text-only step leaves the vision tower and projector without gradients; DDP then has to
    # look for unused parameters, or it fails on the next step.
    if world_size <= 1 or not (counts["vision"] or counts["projector"]):
        return False
    return any(n < 0 for n in lengths) and any(n > 0 for n in lengths)


def _sharded_engine(trainer: Trainer) -> bool:
    """FSDP or DeepSpeed ZeRO-3: parameters are sharded across processes."""
    if trainer.is_fsdp_enabled:
        return True
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        return int(getattr(plugin, "zero_stage", 0) or 0) == 3
    return False


def _publish_model(trainer: Trainer, model, processor, model_dir: Path) -> None:
    """The final model + processor into `model_dir`, atomically; collective (call on every process)."""
    staging = model_dir.parent / f".{model_dir.name}.staging"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    if model is trainer.model:
        trainer.save_model(str(staging))  # gathers FSDP / ZeRO-3 shards; writes on rank 0
    elif trainer.args.should_save:
        model.save_pretrained(staging)
    if trainer.args.should_save:
        processor.save_pretrained(staging)
        (staging / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle; not model data
        _fsync_tree(staging)
        old = model_dir.parent / f".{model_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if model_dir.exists():
            os.replace(model_dir, old)
        os.replace(staging, model_dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("saved model and processor to %s", model_dir)
    _barrier()


def build_trainer(
    stage: StageConfig,
    model,
    processor,
    out_dir: str | Path,
    counts: dict[str, int] | None = None,
    world_size: int = 1,
    is_main: bool = True,
) -> ConvLlavaTrainer:
    """The `ConvLlavaTrainer` of a stage for a `model` whose trainable modules are already set.

    Builds the stage's dataset, skip tracker (writing to `out_dir/skipped.jsonl`) and training
    arguments (checkpoints in `out_dir/checkpoints`).
    """
    out_dir = Path(out_dir)
    counts = counts or trainable_counts(model)
    sources = [DataSource(**asdict(d)) for d in stage.data]
    dataset = ConversationDataset(sources, processor, stage.template, stage.max_length)
    lengths = dataset.lengths
    tracker = SkipTracker(out_dir, total_records=len(dataset), max_bad_fraction=stage.max_bad_fraction)
    accounting = SkipAccounting(tracker, world_size, is_main)
    args = training_arguments(
        stage,
        out_dir / "checkpoints",
        world_size,
        _needs_unused_parameter_search(lengths, counts, world_size),
    )
    return ConvLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator(processor.tokenizer.pad_token_id),
        skip_tracker=tracker,
        lengths=lengths,
        lr_multipliers=stage.lr_multipliers,
        skip_accounting=accounting,
        callbacks=[_ProgressLog(), _StepHooks(accounting, out_dir / "checkpoints")],
    )


def run_stage(
    stage: StageConfig,
    init_dir: str | Path,
    out_dir: str | Path,
    resume: str | bool | None = True,
) -> StageResult:
    """Train one stage from the model in `init_dir`; the final model goes to `out_dir/model`.

    `resume=True` continues from the newest complete checkpoint in `out_dir/checkpoints` (if any);
    a path resumes from that checkpoint; False/None starts over (old checkpoints are removed).
    Works the same under torchrun / accelerate launch (one call per process).
    """
    from ..model.weights import load_model_dir

    rank, world_size = _env_world()
    is_main = rank == 0
    if stage.lora is not None:
        check_lora_supported(stage.lora)
    out_dir = Path(out_dir)
    run_dir = out_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)

    model, processor = load_model_dir(init_dir, dtype=torch.float32)
    if stage.lora is not None:
        counts = apply_trainable(model, [t for t in stage.trainable if t != "llm"], allow_empty=True)
        if stage.lora.bits == 4:
            quantize_llm_4bit(model, out_dir)
        apply_lora(model, stage.lora)
        counts = trainable_counts(model)
    else:
        counts = apply_trainable(model, stage.trainable)
    log.info("stage %s: trainable parameters %s", stage.name, {k: f"{v:,}" for k, v in counts.items()})
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.language_model.config.use_cache = False

    trainer = build_trainer(stage, model, processor, out_dir, counts, world_size=world_size, is_main=is_main)
    tracker, accounting = trainer.skip_tracker, trainer.skip_accounting
    args = trainer.args
    if stage.lora is not None and _sharded_engine(trainer):
        raise ConfigError(
            f"stage {stage.name}: LoRA with FSDP / DeepSpeed ZeRO-3 is not supported (the adapters are "
            "merged into full weights at the end); use DDP or ZeRO-2 for LoRA stages"
        )

    checkpoint = resolve_resume(run_dir, resume)
    if is_main:
        for stale in run_dir.glob(".staging-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        if not resume:
            old = complete_checkpoints(run_dir)
            if old:
                log.warning("stage %s: starting over; removing %d old checkpoints", stage.name, len(old))
                for path in old:
                    shutil.rmtree(path, ignore_errors=True)
    accounting.restore(checkpoint)
    _barrier()
    if checkpoint:
        log.info("stage %s: resuming from %s", stage.name, checkpoint)

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else float("nan")

    final_model = trainer.model
    if stage.lora is not None:
        final_model = merge_lora(final_model, stage.lora, init_dir)
    final_model.config.use_cache = True
    final_model.language_model.config.use_cache = True
    model_dir = out_dir / "model"
    _publish_model(trainer, final_model, processor, model_dir)

    samples = int(output.global_step) * args.per_device_train_batch_size * args.gradient_accumulation_steps
    samples *= max(args.world_size, 1)
    result = StageResult(
        stage=stage.name,
        model_dir=str(model_dir),
        final_loss=final_loss,
        steps=int(output.global_step),
        seconds=round(seconds, 2),
        samples=samples,
        skipped=tracker.count,
        trainable_params=counts,
    )
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, out_dir / "loss.png", f"stage {stage.name}")
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    _barrier()
    if not math.isfinite(final_loss):
        log.warning("stage %s: the final loss is not finite (%s)", stage.name, final_loss)
    return result


# --- a whole recipe --------------------------------------------------------------------------
def prepare_init(recipe: Recipe) -> Path:
    """The starting model of the first stage: the recipe's `model.init` dir, or one built by `init`.

    Under a launcher only rank 0 builds it; the others wait for it.
    """
    from ..model.weights import init_model

    if recipe.model.init:
        return Path(recipe.model.init)
    init_dir = Path(recipe.output_dir) / "init"
    rank, world_size = _env_world()
    if world_size > 1:
        _init_process_group()
    if rank == 0 and not (init_dir / "config.json").exists():
        init_model(
            recipe.model.preset,
            init_dir,
            llm=recipe.model.llm,
            vision=recipe.model.vision,
            tokenizer=recipe.model.tokenizer,
        )
    _barrier()
    return init_dir


def _init_process_group() -> None:
    """Start the launcher's process group early (accelerate's, which the Trainer then reuses)."""
    if _distributed():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def train_recipe(recipe: Recipe, stages: str = "all", resume: str | bool | None = True) -> list[StageResult]:
    """Run the selected stages in order; each starts from the previous stage's `model` dir."""
    names = recipe.stage_names()
    selected = recipe.select(stages)
    if isinstance(resume, (str, os.PathLike)) and len(selected) > 1:
        raise ConfigError(f"--resume PATH resumes one stage; select one with --stage (selected: {selected})")
    results = []
    for name in selected:
        index = names.index(name)
        if index == 0:
            init_dir = prepare_init(recipe)
        else:
            init_dir = Path(recipe.output_dir) / f"stage{names[index - 1]}" / "model"
            if not (init_dir / "config.json").exists():
                raise ConfigError(
                    f"stage {name} starts from stage {names[index - 1]}'s output {init_dir}, which does not "
                    f"exist yet: run --stage {names[index - 1]} first (or --stage all)"
                )
        out_dir = Path(recipe.output_dir) / f"stage{name}"
        if (
            (out_dir / "model" / "config.json").exists()
            and (out_dir / "result.json").exists()
            and resume is True
        ):
            log.info("stage %s: already finished (%s); skipping", name, out_dir / "model")
            data = json.loads((out_dir / "result.json").read_text())
            results.append(StageResult(**data))
            continue
        results.append(run_stage(recipe.stages[name], init_dir, out_dir, resume=resume))
    return results
