"""A recipe stage -> the HF `TrainingArguments` of a run on `world_size` processes.

The global batch of the recipe is kept however many processes share it (`StageConfig.batch_plan`);
precision `auto` means bf16 where the GPU has it, else fp32; 8-bit AdamW falls back to torch AdamW
where bitsandbytes cannot run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from .recipe import StageConfig

log = logging.getLogger(__name__)


def _precision_flags(precision: str) -> dict:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _optimizer_name(stage: StageConfig) -> str:
    """HF `optim` name: bitsandbytes' 8-bit AdamW where it can run (CUDA), else torch's fused AdamW
    (one kernel per step over all parameters; docs/benchmarks.md has the step times)."""
    if stage.optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401

            if torch.cuda.is_available():
                return "adamw_bnb_8bit"
        except ImportError:
            pass
        log.warning("stage %s: 8-bit AdamW needs bitsandbytes and a CUDA GPU; using torch AdamW", stage.name)
    return "adamw_torch_fused"


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
