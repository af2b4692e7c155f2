"""Our figures on the two configs of the side-by-side with the reference LLaVA-JP (issue 18).

    python benchmarks/bench_reference.py                 # tiny and small: training, fp32 and fast path
    python benchmarks/bench_reference.py --configs small --threads 2 --repeats 5

Configs (random weights, as in the issue's table):
- tiny: GPT-2 256 x 4 layers, ConvNeXt widths 48-384 (depths 2-2-6-2) + stage 5 768 x 2, 256 px,
  16 image tokens.
- small: GPT-2 768 x 12, ConvNeXt-T (3-3-9-3, 96-768) + stage 5 1536 x 3, 384 px, 36 image tokens.
Figures (the issue's): a training step (batch 4, 64 text tokens, fp32) with everything trainable
and with the projector + stage 5 only, as our trainer runs it (fused AdamW, the loss on the
supervised positions only); time to first token and decode tokens/s (batch 1, 32 new tokens);
the vision tower's images/s (batch 4); peak RSS of training and of inference. Inference is
measured twice: fp32 (the model built in the process, as saved) and the fast path (the model
loaded from a saved fp32 directory with `--dtype bfloat16`: bf16 weights read straight from the
file, channels_last tower, `RowLinear` decode; `model.fast_inference`). Every part runs in its
own process, so each peak RSS is that part's. The reference code is run outside this repository
(docs/benchmarks.md says how); only our numbers are printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _rss import peak_rss_mb  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

CONFIGS = {
    "tiny": {
        "trunk_depths": [2, 2, 6, 2],
        "trunk_widths": [48, 96, 192, 384],
        "stage5": (2, 768),
        "llm": (256, 4, 4),
        "image_size": 256,
    },
    "small": {
        "trunk_depths": [3, 3, 9, 3],
        "trunk_widths": [96, 192, 384, 768],
        "stage5": (3, 1536),
        "llm": (768, 12, 12),
        "image_size": 384,
    },
}
IMAGE_TOKEN = 50000
PARTS = ("train", "infer-fp32", "infer-fast")
ROWS = [
    ("train_all_s", "train step, all trainable (s)", ".3f"),
    ("train_proj_stage5_s", "train step, projector + stage 5 (s)", ".3f"),
    ("ttft_ms", "time to first token (ms)", ".1f"),
    ("decode_tok_s", "decode (tok/s)", ".1f"),
    ("tower_img_s", "vision tower (img/s)", ".2f"),
    ("peak_rss_train_mb", "peak RSS, training (MB)", ".0f"),
    ("peak_rss_infer_mb", "peak RSS, inference (MB)", ".0f"),
]


def build(name: str):
    """(model, image size) of a config, random weights (seed 0), fp32."""
    from dataclasses import replace

    from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, get_preset

    c = CONFIGS[name]
    width, layers, heads = c["llm"]
    base = get_preset("small")
    preset = replace(
        base,
        name=f"reference-{name}",
        trunk_depths=c["trunk_depths"],
        trunk_widths=c["trunk_widths"],
        stage5_depth=c["stage5"][0],
        stage5_width=c["stage5"][1],
        text={**base.text, "n_embd": width, "n_layer": layers, "n_head": heads},
        image_size=c["image_size"],
        stage5_drop_path_rates=[0.0, 0.0],
    )
    config = build_config(preset, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    return ConvLlavaForConditionalGeneration(config), c["image_size"]


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(n_image: int, size: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.full((4, n_image), IMAGE_TOKEN), torch.randint(10, 40000, (4, 64), generator=g)], 1
    )
    return ids, ids.masked_fill(ids == IMAGE_TOKEN, -100), torch.randn(4, 3, size, size, generator=g)


def measure_train(name: str, repeats: int) -> dict:
    """Training steps as `ConvLlavaTrainer` runs them: fused AdamW, `loss_only`."""
    from convllava_jp.train.freezing import apply_trainable

    model, size = build(name)
    ids, labels, pixels = _inputs(model.config.image_tokens(size, size), size)
    out: dict = {}
    model.train()
    for label, trainable in (
        ("train_all_s", ["vision", "projector", "llm"]),
        ("train_proj_stage5_s", ["stage5", "projector"]),
    ):
        apply_trainable(model, trainable)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

        def step(opt=opt):
            model(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=True).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[label] = _median_time(step, repeats)
        del opt
    out["peak_rss_train_mb"] = peak_rss_mb()
    return out


def measure_infer(name: str, repeats: int, model_dir: str | None, dtype: str) -> dict:
    """Tower, TTFT, decode; `model_dir` given: the fast path loaded from it in `dtype`."""
    if model_dir:
        from convllava_jp.model.fast_inference import prepare_cpu_inference
        from convllava_jp.model.model_dir import load_model

        model = load_model(model_dir, dtype=dtype)
        if not prepare_cpu_inference(model):
            raise SystemExit(f"the CPU fast path does not apply to {dtype}")
        size = CONFIGS[name]["image_size"]
    else:
        model, size = build(name)
        model.eval()
    model.requires_grad_(False)
    ids, _, pixels = _inputs(model.config.image_tokens(size, size), size)
    pixels = pixels.to(model.dtype)
    out: dict = {}
    with torch.inference_mode():
        out["tower_img_s"] = 4 / _median_time(lambda: model.encode_images(pixels), repeats)
        prompt = {
            "input_ids": ids[:1],
            "attention_mask": torch.ones_like(ids[:1]),
            "pixel_values": pixels[:1],
        }

        def gen(n: int):
            kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
            return lambda: model.generate(**prompt, **kwargs)

        t1 = _median_time(gen(1), repeats)
        t32 = _median_time(gen(32), repeats)
    out["ttft_ms"] = 1000 * t1
    out["decode_tok_s"] = 31 / max(t32 - t1, 1e-9)
    out["peak_rss_infer_mb"] = peak_rss_mb()
    return out


def save_fp32_dir(name: str, root: Path) -> Path:
    """The config's random model saved as fp32 safetensors (what the fast path loads)."""
    model, _ = build(name)
    model.save_pretrained(root / name)
    return root / name


def run_part(name: str, part: str, args, model_dir: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--part", part, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--fast-dtype", args.fast_dtype]
    if part == "infer-fast":
        cmd += ["--model-dir", str(model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(results: dict[str, dict[str, dict]]) -> str:
    """results[config][part] -> one markdown table, ours fp32 and ours fast path per config."""
    cols = [(c, v) for c in results for v in ("fp32", "fast")]
    lines = [
        "| figure | " + " | ".join(f"ours {c} ({v})" for c, v in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, label, fmt in ROWS:
        cells = []
        for c, v in cols:
            part = "train" if key.startswith(("train", "peak_rss_train")) else f"infer-{v}"
            value = results[c].get(part, {}).get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)}")
    p.add_argument("--fast-dtype", default="bfloat16", help="the fast path's dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one config and part, print JSON
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        if args.part == "train":
            result = measure_train(args.one, args.repeats)
        else:
            result = measure_infer(args.one, args.repeats, args.model_dir, args.fast_dtype)
        print(json.dumps(result))
        return 0
    parts = args.parts.split(",")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        for name in args.configs.split(","):
            model_dir = save_fp32_dir(name, Path(tmp)) if "infer-fast" in parts else None
            results[name] = {part: run_part(name, part, args, model_dir) for part in parts}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {args.threads} threads, load average {load:.2f}, fast path {args.fast_dtype}"
    )
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
