"""Eval throughput on the synthetic task: batched generation vs batch size 1.

    PYTHONPATH=src python benchmarks/bench_eval.py                       # random `tiny` model
    PYTHONPATH=src python benchmarks/bench_eval.py --preset small --samples 16 --batch-sizes 1,4,16 --append
    PYTHONPATH=src python benchmarks/bench_eval.py --model DIR --world W # a trained model + its world

Runs `convllava-jp eval`'s runner (`run_task`, cache off: every sample generated and scored) on the
synthetic world's held-out split at several batch sizes and reports samples/s. With random weights
EOS (and <image>) are suppressed so every answer runs to --max-new-tokens and all batch sizes
generate the same number of tokens. Prints a Markdown table and writes docs/benchmarks-eval.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from convllava_jp.eval.runner import EvalModel, EvalSettings, run_task  # noqa: E402
from convllava_jp.eval.tasks import get_task  # noqa: E402
from convllava_jp.infer.generation import VLMPipeline  # noqa: E402

log = logging.getLogger("bench_eval")


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, bool]:
    """(world dir, model dir, random?) — generated in `work` unless given."""
    world = Path(args.world) if args.world else work / "world"
    if not args.world:
        from convllava_jp.demo.world import generate_world

        generate_world(world, 8, args.samples, seed=0, progress=False, n_pretrain_text=200)
    if args.model:
        return world, Path(args.model), False
    from convllava_jp.convert.init import init_model

    torch.manual_seed(0)
    model_dir = work / f"{args.preset}-random"
    init_model(args.preset, model_dir, tokenizer=str(world / "tokenizer"))
    return world, model_dir, True


def measure(pipeline: VLMPipeline, model_dir: Path, world: Path, batch_size: int, args, out: Path) -> dict:
    task = get_task("synthetic")
    samples = task.load(world, args.samples)
    settings = EvalSettings(
        batch_size=batch_size, max_new_tokens=args.max_new_tokens, use_cache=False, show_progress=False
    )
    start = time.perf_counter()
    summary = run_task(
        task, samples, EvalModel("bench", model_dir), out, settings, get_pipeline=lambda: pipeline
    )
    seconds = time.perf_counter() - start
    preds = (out / "synthetic" / "bench" / "prediction.jsonl").read_text(encoding="utf-8").splitlines()
    tokens = sum(json.loads(line)["completion_tokens"] for line in preds)
    return {
        "batch": batch_size,
        "n": len(samples),
        "seconds": seconds,
        "samples_s": len(samples) / seconds,
        "tokens_s": tokens / seconds,
        "em": summary["metrics"]["exact_match"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir (default: a random model of --preset)")
    parser.add_argument("--world", help="synthetic world dir (default: a fresh one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--samples", type=int, default=64, help="held-out questions (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks-eval.md"))
    parser.add_argument(
        "--append", action="store_true", help="add a section to --output instead of replacing it"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world, model_dir, random_weights = prepare(args, work)
        pipeline = VLMPipeline.from_pretrained(model_dir, device=args.device)
        if random_weights:
            # Every answer runs to max_new_tokens at every batch size; and a random model must not
            # emit <image>, which the next decode step would take for an image placeholder.
            tok = pipeline.tokenizer
            pipeline.model.generation_config.suppress_tokens = [
                tok.eos_token_id,
                tok.convert_tokens_to_ids("<image>"),
            ]
        n_params = sum(p.numel() for p in pipeline.model.parameters())
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        measure(pipeline, model_dir, world, batch_sizes[-1], argparse.Namespace(**{**vars(args), "samples": 8}),
                work / "warmup")  # fmt: skip
        rows = [measure(pipeline, model_dir, world, b, args, work / f"r{b}") for b in batch_sizes]

    base = rows[0]["samples_s"]
    model_name = str(args.model) if args.model else f"random {args.preset}"
    lines = [
        f"## {model_name}: synthetic task, {rows[0]['n']} held-out questions, greedy, "
        f"{args.max_new_tokens} new tokens"
        + (" (EOS suppressed: every answer runs to the limit)" if random_weights else ""),
        "",
        f"{date.today().isoformat()}; {n_params / 1e6:.1f}M parameters, {pipeline.model.dtype}; device "
        f"{args.device}, {args.threads} torch threads, {os.cpu_count()} CPUs ({platform.machine()}), torch "
        f"{torch.__version__}; load average {load_before:.1f} before the run (other processes share the "
        "CPUs). Whole `run_task` with the cache off: prompt building, generation, prediction.jsonl "
        "writes, scoring.",
        "",
        "| batch size | seconds | samples/s | tokens/s | vs batch 1 | exact match |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['seconds']:.1f} | {r['samples_s']:.2f} | {r['tokens_s']:.1f} | "
            f"{r['samples_s'] / base:.2f}x | {100 * r['em']:.1f}% |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        out.write_text(out.read_text(encoding="utf-8") + "\n" + section, encoding="utf-8")
    else:
        out.write_text(
            f"# Eval benchmarks\n\nWritten by `benchmarks/bench_eval.py`.\n\n{section}", encoding="utf-8"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
