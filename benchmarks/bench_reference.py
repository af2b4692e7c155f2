"""Our figures on the two configs of the side-by-side with the reference LLaVA-JP (issue 18).

    python benchmarks/bench_reference.py                        # tiny and small, fp32, 2 threads
    python benchmarks/bench_reference.py --configs tiny --dtype bfloat16 --channels-last

Configs (random weights, as in the issue's table):
- tiny: GPT-2 256 x 4 layers, ConvNeXt widths 48-384 (depths 2-2-6-2) + stage 5 768 x 2, 256 px,
  16 image tokens.
- small: GPT-2 768 x 12, ConvNeXt-T (3-3-9-3, 96-768) + stage 5 1536 x 3, 384 px, 36 image tokens.
Figures: a training step (batch 4, 64 text tokens, AdamW) with everything trainable and with the
projector + stage 5 only; time to first token and decode tokens/s (batch 1, 32 new tokens); the
vision tower's images/s (batch 4); peak RSS. Each config runs in its own process (peak RSS is that
config's). The reference code is run outside this repository; only our numbers are printed here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def build(name: str):
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
    config = build_config(preset, image_token_id=50000)
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


def measure(name: str, dtype: str, channels_last: bool, repeats: int) -> dict:
    """All figures of one config, in this process."""
    from convllava_jp.train.freezing import apply_trainable

    model, size = build(name)
    n_image = model.config.image_tokens(size, size)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((4, n_image), 50000), torch.randint(10, 40000, (4, 64), generator=g)], 1)
    labels = ids.masked_fill(ids == 50000, -100)
    pixels = torch.randn(4, 3, size, size, generator=g)
    out: dict = {
        "config": name,
        "dtype": dtype,
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
    }

    model.train()
    for label, trainable in (
        ("train_all_s", ["vision", "projector", "llm"]),
        ("train_proj_stage5_s", ["stage5", "projector"]),
    ):
        apply_trainable(model, trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step(opt=opt):
            model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[label] = _median_time(step, repeats)
        del opt
    model.requires_grad_(False)
    model.eval()
    torch_dtype = getattr(torch, dtype)
    model.to(torch_dtype)
    if channels_last:
        model.vision_tower.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        px4 = pixels.to(torch_dtype)
        if channels_last:
            px4 = px4.contiguous(memory_format=torch.channels_last)
        out["tower_img_s"] = 4 / _median_time(lambda: model.encode_images(px4), repeats)
        prompt = {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1]), "pixel_values": px4[:1]}

        def gen(n: int):
            return lambda: model.generate(**prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)

        t1 = _median_time(gen(1), repeats)
        t32 = _median_time(gen(32), repeats)
    out["ttft_ms"] = 1000 * t1
    out["decode_tok_s"] = 31 / max(t32 - t1, 1e-9)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def render(rows: list[dict]) -> str:
    head = (
        "| figure | "
        + " | ".join(f"{r['config']} ({r['dtype']}{', CL' if r['channels_last'] else ''})" for r in rows)
        + " |"
    )
    lines = [head, "|---|" + "---|" * len(rows)]
    for key, label, fmt in [
        ("train_all_s", "train step, all trainable (s)", ".3f"),
        ("train_proj_stage5_s", "train step, projector + stage 5 (s)", ".3f"),
        ("ttft_ms", "time to first token (ms)", ".1f"),
        ("decode_tok_s", "decode (tok/s)", ".1f"),
        ("tower_img_s", "vision tower (img/s)", ".2f"),
        ("peak_rss_mb", "peak RSS (MB)", ".0f"),
    ]:
        lines.append(f"| {label} | " + " | ".join(format(r[key], fmt) for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument(
        "--dtype", default="float32", help="inference dtype: float32 or bfloat16 (training stays fp32)"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="the vision tower in channels_last at inference"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.dtype, args.channels_last, args.repeats)))
        return 0
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--dtype", args.dtype, "--threads", str(args.threads)]
        cmd += ["--repeats", str(args.repeats)] + (["--channels-last"] if args.channels_last else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
