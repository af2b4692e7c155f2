"""Training throughput, data-wait share, memory and step overhead of the stage runner (CPU or GPU).

    python benchmarks/bench_train.py                      # tiny + small presets, prints tables
    python benchmarks/bench_train.py --write docs/benchmarks-train.md
    python benchmarks/bench_train.py --presets tiny --steps-tiny 10 --quick

What it measures, each configuration in a fresh subprocess (so peak RSS is that configuration's):

1. Per stage (1: stage 5 + projector, 2: vision + projector, 3: projector + LLM) and preset:
   samples/s and tokens/s of real `ConvLlavaTrainer` steps (the first step is warm-up and not
   counted), the share of step time spent waiting for the next batch, with 0 and 1 DataLoader
   workers, peak RSS beside params + grads + AdamW states (what a stage must hold; frozen modules
   hold no grads or states), and the same with every module trainable for comparison.
2. Step time with and without gradient checkpointing (stage 3, the LLM trains).
3. Step overhead: one forward+backward of the whole model / (vision tower + projector fwd+bwd +
   LLM fwd+bwd run on their own on the same inputs), timed interleaved in one process. Target
   <= 1.10: the splice and the glue must not show up.

Ratios are measured within one run (shared machines are noisy); absolute times are only
meaningful on a quiet machine or a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _rss import current_rss_mb, peak_rss_mb  # benchmarks/ is on sys.path when a script runs

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

log = logging.getLogger("bench_train")

STAGES = {
    "1": {"trainable": ["stage5", "projector"], "template": "plain", "data": "stage1.json"},
    "2": {"trainable": ["vision", "projector"], "template": "plain", "data": "stage1.json"},
    "3": {"trainable": ["projector", "llm"], "template": "llm-jp-v1", "data": "stage3.json"},
    "all": {"trainable": ["vision", "projector", "llm"], "template": "llm-jp-v1", "data": "stage3.json"},
}
PRESET_IMAGE_SIZE = {"tiny": 128, "small": 384}


# --- set-up ------------------------------------------------------------------------------------
def prepare(work: Path, preset: str, n_images: int) -> tuple[Path, Path]:
    """A synthetic world at the preset's image size and a random-init model dir of the preset."""
    from convllava_jp.convert.init import init_model
    from convllava_jp.demo.world import generate_world

    world = work / f"world-{PRESET_IMAGE_SIZE[preset]}"
    if not (world / "world.json").exists():
        generate_world(
            world,
            n_images,
            8,
            seed=0,
            image_size=PRESET_IMAGE_SIZE[preset],
            progress=False,
            n_pretrain_text=10,
        )
    model_dir = work / f"init-{preset}"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        init_model(preset, model_dir, tokenizer=str(world / "tokenizer"))
    return world, model_dir


# --- one trainer configuration (runs in a child process) ---------------------------------------
def run_trainer_config(cfg: dict) -> dict:
    """Train `cfg["steps"]` steps of one stage config; returns throughput, data wait and memory."""
    from convllava_jp.model.model_dir import load_model_dir
    from convllava_jp.train.freezing import apply_trainable
    from convllava_jp.train.recipe import StageConfig
    from convllava_jp.train.stages import build_trainer
    from convllava_jp.train.trainer import ConvLlavaTrainer

    torch.set_num_threads(cfg["threads"])
    rss_start = current_rss_mb()  # the runtime: Python, torch, transformers imported
    spec = STAGES[cfg["stage"]]
    stage = StageConfig(
        name=cfg["stage"],
        data=[{"path": str(Path(cfg["world"]) / spec["data"])}],
        template=spec["template"],
        trainable=spec["trainable"],
        lr=1e-4,
        max_steps=cfg["steps"],
        per_device_batch=cfg["batch"],
        num_workers=cfg["workers"],
        gradient_checkpointing=cfg["checkpointing"],
        precision="fp32",
        max_length=cfg["max_length"],
        logging_steps=10_000,
        save_steps=0,
        warmup_ratio=0.0,
    )
    model, processor = load_model_dir(cfg["model_dir"], dtype=torch.float32)
    counts = apply_trainable(model, stage.trainable)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    rss_model = current_rss_mb()
    trainer: ConvLlavaTrainer = build_trainer(stage, model, processor, Path(cfg["out"]))
    trainer.args.disable_tqdm = True
    trainer.args.report_to = []

    timings: list[dict] = []
    original = trainer.get_batch_samples

    def timed_get_batch_samples(epoch_iterator, num_batches, device):
        start = time.perf_counter()
        batches, n_items = original(epoch_iterator, num_batches, device)
        wait = time.perf_counter() - start
        tokens = sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
        samples = sum(int(b["input_ids"].shape[0]) for b in batches)
        timings.append({"start": start, "wait": wait, "tokens": tokens, "samples": samples})
        return batches, n_items

    trainer.get_batch_samples = timed_get_batch_samples  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    # Step k runs from its batch fetch to the next step's fetch (the last one to the end of train()).
    steps = []
    for k, t in enumerate(timings):
        stop = timings[k + 1]["start"] if k + 1 < len(timings) else end
        steps.append({**t, "seconds": stop - t["start"]})
    counted = steps[1:] if len(steps) > 1 else steps  # step 1 is warm-up
    seconds = sum(s["seconds"] for s in counted)
    trainable = counts["total"]
    theory_mb = (n_params * 4 + trainable * 4 + trainable * 8) / 2**20  # fp32 params, grads, 2 Adam moments
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_numel = sum(
        v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
    )
    return {
        "preset": cfg["preset"],
        "stage": cfg["stage"],
        "workers": cfg["workers"],
        "checkpointing": cfg["checkpointing"],
        "batch": cfg["batch"],
        "steps": len(counted),
        "step_s": seconds / max(len(counted), 1),
        "samples_per_s": sum(s["samples"] for s in counted) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in counted) / seconds,
        "data_wait_share": sum(s["wait"] for s in counted) / seconds,
        "params": n_params,
        "trainable": trainable,
        "optimizer_state_numel": state_numel,
        "theory_mb": theory_mb,
        "rss_start_mb": rss_start,
        "rss_model_mb": rss_model,
        "peak_rss_mb": peak_rss_mb(),
        "train_wall_s": end - t0,
    }


# --- step overhead (in-process, interleaved) ----------------------------------------------------
def step_overhead(model_dir: Path, world: Path, batch: int, repeats: int, threads: int) -> dict:
    """Full model fwd+bwd vs its parts run alone on the same inputs (all modules trainable)."""
    from convllava_jp.data.collate import DataCollator
    from convllava_jp.data.dataset import ConversationDataset
    from convllava_jp.data.records import DataSource
    from convllava_jp.model.model_dir import load_model_dir

    torch.set_num_threads(threads)
    model, processor = load_model_dir(model_dir, dtype=torch.float32)
    model.train()
    model.requires_grad_(True)
    ds = ConversationDataset(
        [DataSource(world / "stage3.json", max_samples=batch)], processor, "llm-jp-v1", 256
    )
    inputs = DataCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(batch)])
    inputs.pop("skipped")
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        embeds = model.splice_image_features(inputs["input_ids"], pixel_values)

    def full() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    def vision_and_projector() -> None:
        model.zero_grad(set_to_none=True)
        feats = model.projector(model.encode_images(pixel_values))
        feats.backward(torch.ones_like(feats))

    def llm() -> None:
        model.zero_grad(set_to_none=True)
        e = embeds.detach().requires_grad_(True)  # the LLM's input gradient flows, as in the full model
        model.language_model(
            inputs_embeds=e, attention_mask=inputs["attention_mask"], labels=inputs["labels"]
        ).loss.backward()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in (full, vision_and_projector, llm):  # warm-up
        fn()
    t_full, t_vis, t_llm = [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit all three alike
        t_full.append(timed(full))
        t_vis.append(timed(vision_and_projector))
        t_llm.append(timed(llm))
    full_s, vis_s, llm_s = (statistics.median(t) for t in (t_full, t_vis, t_llm))
    return {
        "batch": batch,
        "tokens": int(inputs["attention_mask"].sum()),
        "full_ms": 1000 * full_s,
        "vision_projector_ms": 1000 * vis_s,
        "llm_ms": 1000 * llm_s,
        "ratio": full_s / (vis_s + llm_s),
    }


def checkpointing_cost(model_dir: Path, world: Path, batch: int, repeats: int, threads: int) -> dict:
    """Stage-3 fwd+bwd (projector + LLM trainable) with and without gradient checkpointing, interleaved."""
    from convllava_jp.data.collate import DataCollator
    from convllava_jp.data.dataset import ConversationDataset
    from convllava_jp.data.records import DataSource
    from convllava_jp.model.model_dir import load_model_dir
    from convllava_jp.train.freezing import apply_trainable

    torch.set_num_threads(threads)
    model, processor = load_model_dir(model_dir, dtype=torch.float32)
    apply_trainable(model, STAGES["3"]["trainable"])
    model.train()
    ds = ConversationDataset(
        [DataSource(world / "stage3.json", max_samples=batch)], processor, "llm-jp-v1", 256
    )
    inputs = DataCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(batch)])
    inputs.pop("skipped")

    def step(checkpointing: bool) -> float:
        if checkpointing:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**inputs).loss.backward()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    off, on = [], []
    for _ in range(repeats):
        off.append(step(False))
        on.append(step(True))
    return {"off_ms": 1000 * statistics.median(off), "on_ms": 1000 * statistics.median(on)}


# --- driver -------------------------------------------------------------------------------------
def _child(cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"benchmark child failed ({cfg}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps-tiny", type=int, default=12)
    parser.add_argument("--steps-small", type=int, default=4)
    parser.add_argument("--batch-tiny", type=int, default=8)
    parser.add_argument("--batch-small", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=7, help="overhead timing repeats")
    parser.add_argument("--work", help="scratch dir (default: a temp dir)")
    parser.add_argument("--write", help="write the tables as Markdown to this file")
    parser.add_argument("--quick", action="store_true", help="skip the worker / checkpointing variants")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        print("RESULT " + json.dumps(run_trainer_config(json.loads(args.child))), flush=True)
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    presets = [p for p in args.presets.split(",") if p]
    results, overheads, checkpointing = [], {}, {}
    started = time.perf_counter()
    for preset in presets:
        world, model_dir = prepare(work, preset, 48)
        steps = args.steps_tiny if preset == "tiny" else args.steps_small
        batch = args.batch_tiny if preset == "tiny" else args.batch_small
        base = {
            "preset": preset,
            "world": str(world),
            "model_dir": str(model_dir),
            "steps": steps,
            "batch": batch,
            "threads": args.threads,
            "max_length": 256,
            "checkpointing": False,
            "workers": 0,
        }
        variants = [{"stage": s} for s in ("1", "2", "3", "all")]
        if not args.quick:
            variants += [{"stage": s, "workers": 1} for s in ("1", "3")]
            variants += [{"stage": "3", "checkpointing": True}]
        for v in variants:
            cfg = {**base, **v, "out": str(work / f"out-{preset}-{len(results)}")}
            print(f"[{time.perf_counter() - started:6.0f} s] {preset} {v}", file=sys.stderr, flush=True)
            results.append(_child(cfg))
        overheads[preset] = step_overhead(model_dir, world, batch, args.repeats, args.threads)
        checkpointing[preset] = checkpointing_cost(model_dir, world, batch, args.repeats, args.threads)

    report = render(results, overheads, checkpointing, args)
    print(report)
    if args.write:
        Path(args.write).write_text(report + "\n", encoding="utf-8")
    return 0


def render(results: list[dict], overheads: dict, checkpointing: dict, args) -> str:
    def pick(preset: str, stage: str, workers: int = 0, ckpt: bool = False) -> dict | None:
        for r in results:
            if (r["preset"], r["stage"], r["workers"], r["checkpointing"]) == (preset, stage, workers, ckpt):
                return r
        return None

    out = [
        f"CPU, {args.threads} threads, fp32, AdamW; every figure from one run of "
        f"`benchmarks/bench_train.py` (steps after a warm-up step; batch: tiny {args.batch_tiny}, small "
        f"{args.batch_small}).",
        "",
        "### Throughput per stage (workers 0)",
        "",
    ]
    rows = []
    for r in results:
        if r["workers"] == 0 and not r["checkpointing"]:
            rows.append(
                [
                    r["preset"],
                    r["stage"],
                    f"{r['trainable']:,}",
                    f"{r['step_s'] * 1000:.0f}",
                    f"{r['samples_per_s']:.1f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{100 * r['data_wait_share']:.1f}%",
                ]
            )
    out.append(
        _table(["preset", "stage", "trainable", "step ms", "samples/s", "tokens/s", "data wait"], rows)
    )
    wrows = []
    for preset in overheads:
        for stage in ("1", "3"):
            a, b = pick(preset, stage, 0), pick(preset, stage, 1)
            if a and b:
                wrows.append(
                    [
                        preset,
                        stage,
                        f"{100 * a['data_wait_share']:.1f}%",
                        f"{100 * b['data_wait_share']:.1f}%",
                        f"{a['step_s'] / b['step_s']:.2f}",
                    ]
                )
    if wrows:
        out += [
            "",
            "### Data loading: share of step time waiting for the next batch",
            "",
            _table(["preset", "stage", "wait, 0 workers", "wait, 1 worker", "speed-up"], wrows),
        ]
    mrows = []
    for r in results:
        if r["workers"] == 0 and not r["checkpointing"]:
            mrows.append(
                [
                    r["preset"],
                    r["stage"],
                    f"{r['params']:,}",
                    f"{r['trainable']:,}",
                    f"{r['optimizer_state_numel']:,}",
                    f"{r['theory_mb']:.0f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['peak_rss_mb'] - r['rss_start_mb']:.0f}",
                    f"{(r['peak_rss_mb'] - r['rss_start_mb']) / r['theory_mb']:.2f}",
                ]
            )
    out += [
        "",
        "### Memory: peak RSS vs params + grads + AdamW states (fp32)",
        "",
        "Frozen modules hold no gradients and no optimizer state: the `Adam state` column counts the "
        "elements of each moment tensor (= trainable). `growth` is peak RSS minus the RSS after "
        "imports (the Python / torch runtime), so `growth / theory` near 1 means nothing else "
        "(activations, data, copies) takes much.",
        "",
        _table(
            [
                "preset",
                "stage",
                "params",
                "trainable",
                "Adam state (x2)",
                "theory MB",
                "peak RSS MB",
                "growth MB",
                "growth / theory",
            ],
            mrows,
        ),
    ]
    crows = []
    for preset in overheads:
        a, b = pick(preset, "3"), pick(preset, "3", ckpt=True)
        c = checkpointing.get(preset)
        if a and b and c:
            crows.append(
                [
                    preset,
                    f"{c['off_ms']:.0f}",
                    f"{c['on_ms']:.0f}",
                    f"{c['on_ms'] / c['off_ms']:.2f}",
                    f"{a['peak_rss_mb']:.0f}",
                    f"{b['peak_rss_mb']:.0f}",
                ]
            )
    if crows:
        out += [
            "",
            "### Gradient checkpointing (stage 3)",
            "",
            "Time: median fwd+bwd, on and off interleaved in one process. Memory: peak RSS of the "
            "stage-3 trainer run without and with checkpointing (separate processes).",
            "",
            _table(
                [
                    "preset",
                    "fwd+bwd ms off",
                    "fwd+bwd ms on",
                    "on / off",
                    "peak RSS MB off",
                    "peak RSS MB on",
                ],
                crows,
            ),
        ]
    orows = [
        [
            preset,
            str(o["batch"]),
            str(o["tokens"]),
            f"{o['full_ms']:.0f}",
            f"{o['vision_projector_ms']:.0f}",
            f"{o['llm_ms']:.0f}",
            f"**{o['ratio']:.3f}**",
        ]
        for preset, o in overheads.items()
    ]
    out += [
        "",
        "### Step overhead (target <= 1.10)",
        "",
        "Median of interleaved runs, all modules trainable: one forward+backward of the whole model "
        "vs the vision tower + projector (fwd+bwd) and the LLM (fwd+bwd on the spliced embeddings) run "
        "on their own with the same inputs.",
        "",
        _table(["preset", "batch", "tokens", "full ms", "vision+projector ms", "LLM ms", "ratio"], orows),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
