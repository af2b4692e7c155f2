"""Run a recipe: each stage loads the previous stage's model, trains it with the Trainer, saves it.

`run_stage` trains one stage (resuming from its newest complete checkpoint) and writes into the
stage's directory: `checkpoints/checkpoint-N`, `model/` (the final model + processor),
`skipped.jsonl`, `log_history.json`, `loss.png` and `result.json`. `train_recipe` runs the
selected stages in order, skipping finished ones. LoRA / QLoRA on the LLM go through `train.lora`.

Under `torchrun` / `accelerate launch` every process runs the same code; only rank 0 writes the
files, and the processes meet at barriers around publishing and at the end of each stage.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..data.collate import DataCollator
from ..data.dataset import ConversationDataset
from ..data.skips import SkipTracker
from ..errors import CheckpointError, ConfigError, ConvLlavaError
from ..io import read_json, write_json_atomic
from ..model.modeling import parameter_counts
from .arguments import training_arguments
from .checkpoints import (
    BeforePublish,
    clean_run_dir,
    model_staging,
    publish_model_dir,
    resolve_resume,
    restore_moved_aside,
)
from .distributed import barrier, env_world, init_process_group
from .feature_cache import maybe_cache_features
from .freezing import apply_trainable
from .lora import apply_lora, check_lora_supported, merge_lora, quantize_llm_4bit
from .recipe import Recipe, StageConfig
from .threads import stage_cpu_threads
from .trainer import ConvLlavaTrainer, ProgressLog, SkipAccounting, SkipFlush

log = logging.getLogger(__name__)

RESULT_NAME = "result.json"


@dataclass
class StageResult:
    """What a finished stage reports (and keeps in its `result.json`)."""

    stage: str
    model_dir: str
    final_loss: float
    steps: int
    seconds: float
    samples: int
    skipped: int
    trainable_params: dict


def read_stage_result(path: Path) -> StageResult:
    """The `StageResult` saved in `path` (a stage's result.json)."""
    data = read_json(path, what="stage result")
    names = {f.name for f in fields(StageResult)}
    if not isinstance(data, dict) or set(data) != names:
        raise CheckpointError(
            f"{path}: not a stage result (expected the keys {sorted(names)}); delete it to train the stage again"
        )
    return StageResult(**data)


# --- the Trainer of a stage -----------------------------------------------------------------
def _needs_unused_parameter_search(lengths: Sequence[int], counts: dict[str, int], world_size: int) -> bool:
    # A text-only step leaves the vision tower and projector without gradients; DDP then has to
    # look for unused parameters, or it fails on the next step.
    if world_size <= 1 or not (counts["vision_trunk"] or counts["stage5"] or counts["projector"]):
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


def build_trainer(
    stage: StageConfig,
    model,
    processor,
    out_dir: str | Path,
    counts: dict[str, int] | None = None,
    world_size: int = 1,
    is_main: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    before_publish: BeforePublish | None = None,
) -> ConvLlavaTrainer:
    """The `ConvLlavaTrainer` of a stage for a `model` whose trainable modules are already set.

    Builds the stage's dataset, skip tracker (writing to `out_dir/skipped.jsonl`) and training
    arguments (checkpoints in `out_dir/checkpoints`). `callbacks` run after the built-in ones;
    `before_publish` is handed to the trainer (see `ConvLlavaTrainer`).
    """
    out_dir = Path(out_dir)
    counts = counts or parameter_counts(model, trainable_only=True)
    dataset = ConversationDataset(stage.data, processor, stage.template, stage.max_length)
    lengths = dataset.lengths
    tracker = SkipTracker(out_dir, total_records=len(dataset), max_bad_fraction=stage.max_bad_fraction)
    accounting = SkipAccounting(tracker, world_size, is_main)
    args = training_arguments(
        stage,
        out_dir / "checkpoints",
        world_size,
        _needs_unused_parameter_search(lengths, counts, world_size),
    )
    trainer = ConvLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator(processor.tokenizer.pad_token_id),
        skip_tracker=tracker,
        lengths=lengths,
        lr_multipliers=stage.lr_multipliers,
        skip_accounting=accounting,
        before_publish=before_publish,
        callbacks=[ProgressLog(), SkipFlush(accounting), *callbacks],
    )
    # After the Trainer has put the model on its device; before any DataLoader worker starts.
    cache_mode = stage.cache_image_features
    if cache_mode is not False and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        log.info("stage %s: not caching image features under FSDP / DeepSpeed (sharded weights)", stage.name)
        cache_mode = False
    with stage_cpu_threads(stage.cpu_threads, trainer.args.device):
        trainer.feature_cache = maybe_cache_features(
            cache_mode, trainer.model, processor, dataset, stage.name, stage.num_workers
        )
    return trainer


# --- one stage -------------------------------------------------------------------------------
def _load_stage_model(stage: StageConfig, init_dir: str | Path, out_dir: Path):
    """The stage's start model with its trainable modules set (LoRA adapters added): (model, processor, counts)."""
    from ..model.model_dir import load_model_dir

    model, processor = load_model_dir(init_dir, dtype=torch.float32)
    if stage.image:
        from ..model.image_processing import with_image_options

        processor.image_processor = with_image_options(processor.image_processor, stage.image)
    if stage.lora is not None:
        apply_trainable(model, [t for t in stage.trainable if t != "llm"], allow_empty=True)
        if stage.lora.bits == 4:
            quantize_llm_4bit(model, out_dir)
        apply_lora(model, stage.lora)
        counts = parameter_counts(model, trainable_only=True)
    else:
        counts = apply_trainable(model, stage.trainable)
    log.info("stage %s: trainable parameters %s", stage.name, {k: f"{v:,}" for k, v in counts.items()})
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.language_model.config.use_cache = False
    return model, processor, counts


def _restore(trainer: ConvLlavaTrainer, stage: StageConfig, resume: str | bool | None, is_main: bool):
    """The checkpoint to resume from (or None), with leftovers cleaned and skip counts restored."""
    run_dir = Path(trainer.args.output_dir)
    if is_main:  # first: it may put back a checkpoint an interrupted publish had moved aside
        clean_run_dir(run_dir, start_over=not resume, stage_name=stage.name)
    barrier()
    checkpoint = resolve_resume(run_dir, resume)
    trainer.skip_accounting.restore(checkpoint)
    if checkpoint:
        log.info("stage %s: resuming from %s", stage.name, checkpoint)
    return checkpoint


def _publish_model(trainer: Trainer, model, processor, model_dir: Path) -> None:
    """The final model + processor into `model_dir`, atomically; collective (call on every process)."""
    staging = model_staging(model_dir)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    if model is trainer.model:
        trainer.save_model(str(staging))  # gathers FSDP / ZeRO-3 shards; writes on rank 0
    elif trainer.args.should_save:
        model.save_pretrained(staging)
    if trainer.args.should_save:
        publish_model_dir(model_dir, processor.save_pretrained)
    barrier()


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


def _stage_result(
    stage: StageConfig, trainer: Trainer, steps: int, seconds: float, counts: dict, model_dir: Path
) -> StageResult:
    args = trainer.args
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return StageResult(
        stage=stage.name,
        model_dir=str(model_dir),
        final_loss=float(losses[-1]) if losses else float("nan"),
        steps=steps,
        seconds=round(seconds, 2),
        samples=steps * per_step,
        skipped=trainer.skip_tracker.count,
        trainable_params=counts,
    )


def _write_reports(trainer: Trainer, result: StageResult, out_dir: Path) -> None:
    """loss.png, log_history.json and result.json of a finished stage (main process)."""
    history = trainer.state.log_history
    plot_loss(history, out_dir / "loss.png", f"stage {result.stage}")
    write_json_atomic(out_dir / "log_history.json", history, indent=1)
    write_json_atomic(out_dir / RESULT_NAME, asdict(result))


def run_stage(
    stage: StageConfig,
    init_dir: str | Path,
    out_dir: str | Path,
    resume: str | bool | None = True,
    callbacks: Sequence[TrainerCallback] = (),
    before_publish: BeforePublish | None = None,
) -> StageResult:
    """Train one stage from the model in `init_dir`; the final model goes to `out_dir/model`.

    `resume=True` continues from the newest complete checkpoint in `out_dir/checkpoints` (if any);
    a path resumes from that checkpoint; False/None starts over (old checkpoints are removed).
    `callbacks` / `before_publish` go to `build_trainer`. Works the same under torchrun /
    accelerate launch (one call per process).
    """
    rank, world_size = env_world()
    if stage.lora is not None:
        check_lora_supported(stage.lora)
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    model, processor, counts = _load_stage_model(stage, init_dir, out_dir)
    trainer = build_trainer(
        stage, model, processor, out_dir, counts, world_size, rank == 0, callbacks, before_publish
    )
    if stage.lora is not None and _sharded_engine(trainer):
        raise ConfigError(
            f"stage {stage.name}: LoRA with FSDP / DeepSpeed ZeRO-3 is not supported (the adapters are "
            "merged into full weights at the end); use DDP or ZeRO-2 for LoRA stages"
        )
    checkpoint = _restore(trainer, stage, resume, rank == 0)

    start = time.perf_counter()
    with stage_cpu_threads(stage.cpu_threads, trainer.args.device):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start

    final_model = trainer.model
    if stage.lora is not None:
        final_model = merge_lora(final_model, stage.lora, init_dir)
    final_model.config.use_cache = True
    final_model.language_model.config.use_cache = True
    processor.record_trained_template(stage.template)  # inference then prompts as trained
    _publish_model(trainer, final_model, processor, out_dir / "model")

    result = _stage_result(stage, trainer, int(output.global_step), seconds, counts, out_dir / "model")
    if trainer.is_world_process_zero():
        _write_reports(trainer, result, out_dir)
    barrier()
    if not math.isfinite(result.final_loss):
        log.warning("stage %s: the final loss is not finite (%s)", stage.name, result.final_loss)
    return result


# --- a whole recipe --------------------------------------------------------------------------
def prepare_init(recipe: Recipe) -> Path:
    """The starting model of the first stage: the recipe's `model.init` dir, or one built by `init`.

    Under a launcher only rank 0 builds it; the others wait for it.
    """
    from ..convert.init import init_model

    if recipe.model.init:
        return Path(recipe.model.init)
    init_dir = Path(recipe.output_dir) / "init"
    rank, world_size = env_world()
    if world_size > 1:
        init_process_group()
    if rank == 0 and not (init_dir / "config.json").exists():
        init_model(
            recipe.model.preset,
            init_dir,
            llm=recipe.model.llm,
            vision=recipe.model.vision,
            tokenizer=recipe.model.tokenizer,
        )
    barrier()
    return init_dir


def _stage_init_dir(recipe: Recipe, name: str) -> Path:
    """Where stage `name` starts: the first stage from the init model, the others from the previous output."""
    names = recipe.stage_names()
    index = names.index(name)
    if index == 0:
        return prepare_init(recipe)
    previous = names[index - 1]
    init_dir = Path(recipe.output_dir) / f"stage{previous}" / "model"
    if not (init_dir / "config.json").exists():
        raise ConfigError(
            f"stage {name} starts from stage {previous}'s output {init_dir}, which does not "
            f"exist yet: run --stage {previous} first (or --stage all)"
        )
    return init_dir


def train_recipe(
    recipe: Recipe,
    stages: str = "all",
    resume: str | bool | None = True,
    callbacks: Sequence[TrainerCallback] = (),
    before_publish: BeforePublish | None = None,
) -> list[StageResult]:
    """Run the selected stages in order; each starts from the previous stage's `model` dir.

    With `resume=True` a stage whose model and result.json exist is not trained again: its saved
    result is returned. `callbacks` / `before_publish` go to every stage's trainer.
    """
    selected = recipe.select(stages)
    if isinstance(resume, (str, os.PathLike)) and len(selected) > 1:
        raise ConfigError(f"--resume PATH resumes one stage; select one with --stage (selected: {selected})")
    results = []
    for name in selected:
        init_dir = _stage_init_dir(recipe, name)
        out_dir = Path(recipe.output_dir) / f"stage{name}"
        finished = _finished_result(out_dir) if resume is True else None
        if finished is not None:
            log.info("stage %s: already finished (%s); skipping", name, out_dir / "model")
            results.append(finished)
            continue
        results.append(run_stage(recipe.stages[name], init_dir, out_dir, resume, callbacks, before_publish))
    return results


def _finished_result(out_dir: Path) -> StageResult | None:
    """The saved result of a finished stage, or None when the stage must (still) be trained.

    A result.json that cannot be read (e.g. torn by a writer of an older version) means "not
    finished": the stage trains again, resuming from its newest checkpoint, and rewrites it.
    """
    rank, world_size = env_world()
    if world_size > 1:
        init_process_group()  # every process must see the same answer: rank 0 repairs, then all read
    if rank == 0:
        restore_moved_aside(out_dir / "model")  # a kill between the model publish's two renames
    barrier()
    if not ((out_dir / "model" / "config.json").exists() and (out_dir / RESULT_NAME).exists()):
        return None
    try:
        return read_stage_result(out_dir / RESULT_NAME)
    except ConvLlavaError as err:
        log.warning("stage %s: %s; training the stage again", out_dir.name, err)
        return None
