"""Model benchmark: full-model train step vs its parts run alone; vision tower throughput.

Prints Markdown tables. Ratios are measured in one run (shared machines are noisy); absolute
times only mean something on an idle machine or a GPU.

    python benchmarks/bench_model.py [--presets tiny,small] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, get_preset


def _time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def step_overhead(preset: str, batch: int, text_tokens: int, repeats: int) -> dict:
    """Full fwd+bwd (splice included) / (vision fwd+bwd + projector + LLM fwd+bwd on the same inputs)."""
    torch.manual_seed(0)
    config = build_config(preset)
    model = ConvLlavaForConditionalGeneration(config).train()
    size = get_preset(preset).image_size
    n_img = config.image_tokens(size, size)
    pixels = torch.randn(batch, 3, size, size)
    ids = torch.randint(0, config.text_config.vocab_size, (batch, n_img + text_tokens))
    ids[:, 1 : 1 + n_img] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)

    def full():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    embeds = torch.randn(batch, ids.shape[1], config.text_config.hidden_size, requires_grad=True)

    def parts():
        model.zero_grad(set_to_none=True)
        feats = model.projector(model.encode_images(pixels))
        feats.sum().backward()
        out = model.language_model(inputs_embeds=embeds, labels=labels)
        out.loss.backward()

    t_full = _time(full, repeats)
    t_parts = _time(parts, repeats)
    return {
        "preset": preset,
        "batch": batch,
        "tokens": ids.shape[1],
        "full_s": t_full,
        "parts_s": t_parts,
        "ratio": t_full / t_parts,
    }


def vision_throughput(preset: str, batch: int, repeats: int) -> list[dict]:
    config = build_config(preset)
    model = ConvLlavaForConditionalGeneration(config).eval()
    size = get_preset(preset).image_size
    rows = []
    for name, fmt, autocast in [
        ("fp32", torch.contiguous_format, nullcontext()),
        ("bf16 autocast", torch.contiguous_format, torch.autocast("cpu", dtype=torch.bfloat16)),
        ("fp32 channels_last", torch.channels_last, nullcontext()),
    ]:
        tower = model.vision_tower.to(memory_format=fmt)
        pixels = torch.randn(batch, 3, size, size).to(memory_format=fmt)

        def run(tower=tower, pixels=pixels, autocast=autocast):
            with torch.inference_mode(), autocast:
                model.encode_images(pixels)

        seconds = _time(run, repeats)
        rows.append({"preset": preset, "mode": name, "images_per_s": batch / seconds})
    model.vision_tower.to(memory_format=torch.contiguous_format)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    presets = args.presets.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu\n")
    print("| preset | batch | tokens | full step (s) | parts alone (s) | ratio (target <= 1.05) |")
    print("|---|---|---|---|---|---|")
    for p in presets:
        r = step_overhead(p, args.batch, args.text_tokens, args.repeats)
        print(
            f"| {p} | {r['batch']} | {r['tokens']} | {r['full_s']:.3f} | {r['parts_s']:.3f} | {r['ratio']:.3f} |"
        )
    print("\n| preset | mode | images/s |")
    print("|---|---|---|")
    for p in presets:
        for r in vision_throughput(p, args.batch, args.repeats):
            print(f"| {p} | {r['mode']} | {r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
