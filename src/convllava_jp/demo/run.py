"""`convllava-jp demo`: synthetic world -> stages 0-3 on the tiny preset -> held-out score table.

Orchestration only: `world` makes the world, `vision_pretrain` gives the tiny tower a CLIP
stand-in, train/ runs the recipe `tiny-synthetic`, `evaluate` scores the final model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..io import jsonl_text
from . import DEMO_TEST_IMAGES, DEMO_TRAIN_IMAGES, DEMO_VISION_STEPS

log = logging.getLogger(__name__)


def seeded_init(recipe, seed: int) -> Path:
    """The recipe's init model dir, its random weights drawn from `seed`.

    This torch seeds its global generator differently in every process, so without this the
    demo's LLM, stage 5 and projector started from different weights on every run.
    """
    from ..train.stages import prepare_init

    torch.manual_seed(seed)
    return prepare_init(recipe)


def _train(out: Path, world_dir: Path, seed: int, step_scale: float, overrides: list[str], vision_steps: int):
    """Stages 0-3 of `tiny-synthetic` (after the vision pretraining); returns the stage results."""
    from ..train.recipe import load_recipe
    from ..train.stages import train_recipe
    from .vision_pretrain import pretrain_vision_on_world

    recipe = load_recipe(
        "tiny-synthetic",
        overrides=[
            f"vars.data_dir={world_dir}",
            f"output_dir={out / 'runs'}",
            f"seed={seed}",
            *overrides,
        ],
    )
    if step_scale != 1.0:
        for stage in recipe.stages.values():
            if stage.max_steps > 0:
                stage.max_steps = max(1, round(stage.max_steps * step_scale))
    init_dir = seeded_init(recipe, seed)
    marker = init_dir / "vision_pretrained.json"
    if vision_steps and not marker.exists():
        stats = pretrain_vision_on_world(init_dir, world_dir, steps=vision_steps, seed=seed, min_shapes=3)
        marker.write_text(json.dumps(stats))
    return train_recipe(recipe, "all")


def _stage_row(r) -> dict:
    """One stage's line of demo_results.json."""
    return {
        "stage": int(r.stage) if r.stage.isdigit() else r.stage,
        "final_loss": r.final_loss,
        "steps": r.steps,
        "seconds": r.seconds,
        "trainable_params": r.trainable_params["total"],
    }


def run_demo(
    output_dir: str | Path = "demo-output",
    n_train: int = DEMO_TRAIN_IMAGES,
    n_test: int = DEMO_TEST_IMAGES,
    seed: int = 0,
    step_scale: float = 1.0,
    overrides: list[str] | None = None,
    threads: int | None = None,
    vision_steps: int = DEMO_VISION_STEPS,
) -> dict:
    """Run the whole demo; returns (and writes to DIR/demo_results.json) the results dict.

    `step_scale` multiplies every stage's max_steps (e.g. 0.1 for a quick smoke run).
    """
    from ..infer.generation import VLMPipeline
    from .evaluate import evaluate_synthetic, question_only_baseline
    from .world import generate_world

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Path(output_dir)
    world_dir = out / "world"
    if not (world_dir / "world.json").exists():
        log.info(
            "generating the synthetic world in %s (%d train / %d test images)", world_dir, n_train, n_test
        )
        generate_world(world_dir, n_train, n_test, seed=seed)
    results = _train(out, world_dir, seed, step_scale, overrides or [], vision_steps)
    final_dir = out / "model"
    last = Path(results[-1].model_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    shutil.copytree(last, final_dir)
    train_seconds = time.perf_counter() - start

    pipeline = VLMPipeline.from_pretrained(final_dir)
    scores, samples = evaluate_synthetic(pipeline, world_dir, batch_size=64)
    blind = question_only_baseline(world_dir)
    (out / "predictions.jsonl").write_text(jsonl_text(samples), encoding="utf-8")
    result = {
        "heldout_exact_match": scores["exact_match"],
        "chance": scores["chance"],
        "n_test": scores["n"],
        "per_type": scores["per_type"],
        "question_only": {
            "exact_match": blind["exact_match"],
            "per_type": {q: v["exact_match"] for q, v in blind["per_type"].items()},
        },
        "stages": [_stage_row(r) for r in results],
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "model_dir": str(final_dir),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    log.debug("stage results: %s", [asdict(r) for r in results])
    return result


def print_demo_table(result: dict) -> None:
    """The stage table, the held-out score table and the run's total time, on the console."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stages = Table(title="training stages")
    for col in ("stage", "steps", "final loss", "seconds", "trainable params"):
        stages.add_column(col, justify="right")
    for s in result["stages"]:
        stages.add_row(
            str(s["stage"]),
            str(s["steps"]),
            f"{s['final_loss']:.4f}",
            f"{s['seconds']:.1f}",
            f"{s['trainable_params']:,}",
        )
    console.print(stages)
    table = Table(title=f"held-out exact match (n={result['n_test']})")
    for col in ("question type", "n", "exact match", "chance", "question only"):
        table.add_column(col, justify="right")
    blind = result.get("question_only") or {"exact_match": None, "per_type": {}}

    def pct(value) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    for qtype, v in result["per_type"].items():
        table.add_row(
            qtype, str(v["n"]), pct(v["exact_match"]), pct(v["chance"]), pct(blind["per_type"].get(qtype))
        )
    table.add_row(
        "all",
        str(result["n_test"]),
        pct(result["heldout_exact_match"]),
        pct(result["chance"]),
        pct(blind["exact_match"]),
        style="bold",
    )
    console.print(table)
    console.print(
        f"total {result['seconds']:.0f} s (training {result['train_seconds']:.0f} s); model in {result['model_dir']}"
    )
