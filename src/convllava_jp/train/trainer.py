"""Run recipe stages with the HF Trainer: freezing, data, sampler, skipped records, checkpoints.

The loop itself is transformers' `Trainer` (DDP / FSDP / DeepSpeed via accelerate, gradient
accumulation, resume, TensorBoard). This module only adds what a VLM stage needs on top.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data.dataset import (
    ConversationDataset,
    DataCollator,
    DataSource,
    ModalityLengthGroupedSampler,
    SkipTracker,
)
from ..errors import ConfigError
from .recipe import Recipe, StageConfig

log = logging.getLogger(__name__)


# --- which modules train ----------------------------------------------------------------------
def apply_trainable(model, trainable: list) -> dict[str, int]:
    """Freeze everything, then unfreeze the recipe's modules; returns trainable params per part.

    Names: `stage5` (the added stages), `vision` (whole tower), `{vision_from_stage: N}`
    (stages N.. of the tower, 1-based), `projector`, `llm`.
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
    counts = {
        "vision": sum(p.numel() for p in model.vision_tower.parameters() if p.requires_grad),
        "projector": sum(p.numel() for p in model.projector.parameters() if p.requires_grad),
        "llm": sum(p.numel() for p in model.language_model.parameters() if p.requires_grad),
    }
    counts["total"] = sum(counts.values())
    if not counts["total"]:
        raise ConfigError("the recipe stage trains nothing: `trainable` selects no parameters")
    return counts


# --- Trainer ---------------------------------------------------------------------------------
class ConvLlavaTrainer(Trainer):
    """HF Trainer + modality-length grouping, skipped-record accounting, per-module lr, atomic saves."""

    def __init__(self, *args, skip_tracker: SkipTracker, lengths, lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_tracker = skip_tracker
        self.lengths = lengths
        self.lr_multipliers = lr_multipliers or {}

    def _get_train_sampler(self, train_dataset=None):
        batch = self.args.per_device_train_batch_size * max(self.args.world_size, 1)
        return ModalityLengthGroupedSampler(self.lengths, batch, seed=self.args.data_seed or self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped:
            self.skip_tracker.update(skipped)
        if inputs["input_ids"].numel() == 0:  # every sample of this batch was a broken record
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (zero, None) if return_outputs else zero
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if not self.lr_multipliers or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model if model is not None else self.model
        groups: dict[float, list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            mult = 1.0
            for part, m in self.lr_multipliers.items():
                prefix = {"vision": "vision_tower.", "projector": "projector.", "llm": "language_model."}.get(
                    part
                )
                if prefix is None:
                    raise ConfigError(f"lr_multipliers: unknown part {part!r} (vision, projector, llm)")
                if name.startswith(prefix):
                    mult = float(m)
            groups.setdefault(mult, []).append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        param_groups = [
            {"params": ps, "lr": lr * m, "weight_decay": self.args.weight_decay} for m, ps in groups.items()
        ]
        self.optimizer = optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        # Atomic: the Trainer writes checkpoint-N into a staging dir, which is renamed into place
        # only when complete, so a kill at any moment leaves the last good checkpoint loadable.
        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / f".staging-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        original = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            _rotate_checkpoints(run_dir, self.args.save_total_limit)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-N` dirs (only renamed-into-place, i.e. complete, ones), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _rotate_checkpoints(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = complete_checkpoints(run_dir)
    for old in ckpts[: max(len(ckpts) - limit, 0)]:
        shutil.rmtree(old, ignore_errors=True)


class _ProgressLog(TrainerCallback):
    """Logs loss / lr / samples per second as the run goes (numbers that tell you it works)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero and "loss" in logs:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
            )


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
    if stage.optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401

            if torch.cuda.is_available():
                return "adamw_bnb_8bit"
        except ImportError:
            pass
        log.warning("stage %s: 8-bit AdamW needs bitsandbytes and a CUDA GPU; using torch AdamW", stage.name)
    return "adamw_torch"


def training_arguments(stage: StageConfig, run_dir: Path, world_size: int = 1) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=stage.per_device_batch,
        gradient_accumulation_steps=stage.grad_accum_for(world_size),
        learning_rate=stage.lr,
        lr_scheduler_type=stage.schedule,
        warmup_steps=stage.warmup_ratio,
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
        ddp_find_unused_parameters=False,
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


def run_stage(
    stage: StageConfig,
    init_dir: str | Path,
    out_dir: str | Path,
    resume: str | bool | None = True,
) -> StageResult:
    """Train one stage from the model in `init_dir`; the final model goes to `out_dir/model`.

    `resume=True` continues from the newest complete checkpoint in `out_dir/checkpoints` (if any);
    a path resumes from that checkpoint; False/None starts over.
    """
    from ..model.weights import load_model_dir, save_model_dir

    out_dir = Path(out_dir)
    run_dir = out_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model_dir(init_dir, dtype=torch.float32)
    counts = apply_trainable(model, stage.trainable)
    log.info("stage %s: trainable parameters %s", stage.name, {k: f"{v:,}" for k, v in counts.items()})
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.language_model.config.use_cache = False

    sources = [DataSource(**asdict(d)) for d in stage.data]
    dataset = ConversationDataset(sources, processor, stage.template, stage.max_length)
    tracker = SkipTracker(out_dir, total_records=len(dataset), max_bad_fraction=stage.max_bad_fraction)
    args = training_arguments(stage, run_dir, int(os.environ.get("WORLD_SIZE", "1")))
    trainer = ConvLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator(processor.tokenizer.pad_token_id),
        skip_tracker=tracker,
        lengths=dataset.lengths,
        lr_multipliers=stage.lr_multipliers,
        callbacks=[_ProgressLog()],
    )
    checkpoint = None
    if resume is True:
        done = complete_checkpoints(run_dir)
        checkpoint = str(done[-1]) if done else None
        if checkpoint:
            log.info("stage %s: resuming from %s", stage.name, checkpoint)
    elif resume:
        checkpoint = str(resume)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else float("nan")
    model_dir = out_dir / "model"
    if trainer.is_world_process_zero():
        model.config.use_cache = True
        model.language_model.config.use_cache = True
        save_model_dir(trainer.model, processor, model_dir)
        plot_loss(trainer.state.log_history, out_dir / "loss.png", f"stage {stage.name}")
        result = StageResult(
            stage=stage.name,
            model_dir=str(model_dir),
            final_loss=final_loss,
            steps=int(output.global_step),
            seconds=round(seconds, 2),
            samples=int(output.global_step)
            * args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * max(args.world_size, 1),
            skipped=sum(tracker.summary().values()) if tracker.summary() else 0,
            trainable_params=counts,
        )
        (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    else:
        result = StageResult(
            stage.name, str(model_dir), final_loss, int(output.global_step), seconds, 0, 0, counts
        )
    if trainer.args.world_size > 1:
        torch.distributed.barrier()
    if not math.isfinite(final_loss):
        log.warning("stage %s: the final loss is not finite (%s)", stage.name, final_loss)
    return result


# --- a whole recipe --------------------------------------------------------------------------
def prepare_init(recipe: Recipe) -> Path:
    """The starting model of the first stage: the recipe's `model.init` dir, or one built by `init`."""
    from ..model.weights import init_model

    if recipe.model.init:
        return Path(recipe.model.init)
    init_dir = Path(recipe.output_dir) / "init"
    if not (init_dir / "config.json").exists():
        init_model(
            recipe.model.preset,
            init_dir,
            llm=recipe.model.llm,
            vision=recipe.model.vision,
            tokenizer=recipe.model.tokenizer,
        )
    return init_dir


def train_recipe(recipe: Recipe, stages: str = "all", resume: str | bool | None = True) -> list[StageResult]:
    """Run the selected stages in order; each starts from the previous stage's `model` dir."""
    names = recipe.stage_names()
    selected = recipe.select(stages)
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
