"""GPU check: the article's model (2.10B, 768 px) on one GPU, random weights, in a few minutes.

    python benchmarks/gpu_check.py                      # on a CUDA machine (< 8 min on one GPU)
    python benchmarks/gpu_check.py --json gpu.json      # where the JSON goes (default shown below)
    python benchmarks/gpu_check.py --small              # tiny model on CPU in seconds (CI runs this)

Per training stage of the recipe `convllava-jp-1.3b-768` (its `trainable` modules, its per-device
batch, gradient checkpointing and its optimizer: bitsandbytes' 8-bit AdamW where the stage asks for
it and it imports, else torch AdamW, as the stages do; fp32 weights with bf16 autocast, as the
Trainer's `bf16=True`): peak memory (`torch.cuda.max_memory_allocated`), step time, tokens/s and
MFU (model FLOPs per step / step time / the card's peak dense bf16 FLOP/s). Model FLOPs are the
measured forward FLOPs of each part (trunk, stage 5, projector, LLM; `FlopCounterMode`) times 3
for a part that trains, 2 for a frozen part behind a trained one (its input gradients) and 1 for a
frozen part in front of all trained ones; gradient checkpointing's recomputation is not counted.
Then generation in bf16 at 768 px (time to first token and decode tokens/s at batch 1 and 16) and
the built-in server's engine (`ContinuousBatcher`, in process) with 16 clients.

Goals checked: every stage fits in 24 GiB (the article's RTX 4090); stage 3 MFU >= 40%.
Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

log = logging.getLogger("gpu_check")

# Peak dense bf16 tensor FLOP/s (TFLOPS) by card name; first match wins (more specific first).
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]
FIT_GIB = 24.0
MFU_GOAL = 0.40
RECIPE = "convllava-jp-1.3b-768"


def peak_tflops(device_name: str) -> float | None:
    """The card's peak dense bf16 TFLOPS from its name; None for an unknown card (MFU left blank)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- model ------------------------------------------------------------------------------------
def build_model(preset: str, device: torch.device):
    """Random-weight model of `preset` on `device` (fp32) and a processor with a small tokenizer.

    The tokenizer covers only a few hundred of the model's ids (enough for prompts); the output
    row of EOS is zeroed so every answer runs to its token limit.
    """
    from convllava_jp.demo.tokenizer import train_tokenizer
    from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, get_preset
    from convllava_jp.model.image_processing import ConvLlavaImageProcessor
    from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token
    from convllava_jp.model.templates import LLM_JP_SYSTEM_PROMPT

    tokenizer = train_tokenizer(
        [LLM_JP_SYSTEM_PROMPT, "画像を説明してください。左上に赤い円があります。"] * 8, 512
    )
    image_token_id = add_image_token(tokenizer)
    p = get_preset(preset)
    config = build_config(p, image_token_id=image_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = ConvLlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
    image_processor = ConvLlavaImageProcessor(
        image_size=p.image_size, mode=p.image_mode, stride=config.image_stride
    )
    return model, ConvLlavaProcessor(image_processor, tokenizer), p.image_size


def make_batch(model, batch: int, image_size: int, text_tokens: int, device: torch.device) -> dict:
    """Random pixels, the image's placeholders then `text_tokens` random ids, labels on the text."""
    n_image = model.config.image_tokens(image_size, image_size)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 400, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.full((batch, n_image), model.config.image_token_id), text], dim=1)
    labels = ids.clone()
    labels[:, :n_image] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
    }


# --- FLOPs ------------------------------------------------------------------------------------
def _flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


@torch.no_grad()
def forward_flops(model, batch: dict) -> dict[str, float]:
    """Forward FLOPs of the trunk, stage 5, projector and LLM on `batch` (measured, per step)."""
    vt = model.vision_tower
    trunk_n = model.config.trunk_stages
    state = {"hidden": None}

    def trunk():
        h = vt.embeddings(batch["pixel_values"])
        for stage in vt.encoder.stages[:trunk_n]:
            h = stage(h)
        state["hidden"] = h

    def stage5():
        h = state["hidden"]
        for stage in vt.encoder.stages[trunk_n:]:
            h = stage(h)
        state["feats"] = h.flatten(2).transpose(1, 2)

    def projector():
        state["tokens"] = model.projector(state["feats"])

    def llm():
        embeds = model.get_input_embeddings()(
            batch["input_ids"].clamp_max(model.config.text_config.vocab_size - 1)
        )
        model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        )

    return {
        name: _flops(fn)
        for name, fn in [("trunk", trunk), ("stage5", stage5), ("projector", projector), ("llm", llm)]
    }


def _part_trains(model) -> dict[str, bool]:
    trunk_n = model.config.trunk_stages
    stages = model.vision_tower.encoder.stages

    def trains(modules) -> bool:
        return any(p.requires_grad for m in modules for p in m.parameters())

    return {
        "trunk": trains([model.vision_tower.embeddings, *stages[:trunk_n]]),
        "stage5": trains(stages[trunk_n:]),
        "projector": trains([model.projector]),
        "llm": trains([model.language_model]),
    }


def model_flops(fwd: dict[str, float], trains: dict[str, bool]) -> float:
    """Training FLOPs of a step: 3x forward where a part trains, 2x behind a trained part, else 1x."""
    total, behind_trained = 0.0, False
    for part in ("trunk", "stage5", "projector", "llm"):
        total += fwd[part] * (3 if trains[part] else 2 if behind_trained else 1)
        behind_trained = behind_trained or trains[part]
    return total


# --- training stages --------------------------------------------------------------------------
def make_optimizer(params: list, name: str, lr: float, device: torch.device):
    """The stage's optimizer as the stages build it: 8-bit AdamW where asked and importable."""
    if name == "adamw_8bit" and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0), "bnb AdamW 8-bit"
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "torch AdamW"


def _checkpointing(model, on: bool) -> None:
    """Activation checkpointing on/off (transformers >= 5 names it `activation_checkpointing_*`)."""
    name = (
        "activation_checkpointing"
        if hasattr(model, "activation_checkpointing_enable")
        else "gradient_checkpointing"
    )
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


def bench_stage(model, stage, args, image_size: int, device: torch.device, peak: float | None) -> dict:
    """Timed training steps of one recipe stage; returns its row."""
    from convllava_jp.train.freezing import apply_trainable

    batch_size = min(stage.per_device_batch, args.max_batch) if args.max_batch else stage.per_device_batch
    text_tokens = args.text_tokens[stage.name]
    batch = make_batch(model, batch_size, image_size, text_tokens, device)
    counts = apply_trainable(model, stage.trainable)
    trains = _part_trains(model)
    model.eval()
    flops = model_flops(forward_flops(model, make_batch(model, 1, image_size, text_tokens, device)), trains)
    flops *= batch_size
    model.train()
    _checkpointing(model, stage.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(params, stage.optimizer, stage.lr, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    model.zero_grad(set_to_none=True)
    _checkpointing(model, False)
    tokens = batch["input_ids"].numel()
    mfu = flops / step_s / (peak * 1e12) if peak else None
    return {
        "stage": stage.name,
        "trainable_params": counts["total"],
        "batch": batch_size,
        "seq_len": batch["input_ids"].shape[1],
        "grad_checkpointing": stage.gradient_checkpointing,
        "optimizer": opt_name,
        "peak_mem_gib": peak_gib,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_step": flops / 1e12,
        "mfu": mfu,
    }


# --- generation and server --------------------------------------------------------------------
def _requests(pipeline, n: int, image_size: int) -> list:
    from PIL import Image

    from convllava_jp.infer.generation import GenerationRequest

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(image_size // 8, image_size // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.NEAREST)
        request = GenerationRequest(pipeline.question_messages("画像を説明してください。", 1), [image])
        out.append(pipeline.encode(request))
    return out


def bench_generation(pipeline, image_size: int, batch: int, new_tokens: int, repeats: int) -> dict:
    """TTFT (generate with 1 token) and decode tok/s = B (N - 1) / (t_N - t_1), medians."""
    from convllava_jp.infer.generation import GenerationConfig

    encoded = _requests(pipeline, batch, image_size)
    device = pipeline.device

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        pipeline.generate([], GenerationConfig(max_new_tokens=n), batch_size=batch, encoded=encoded)
        _sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    t1 = statistics.median(timed(1) for _ in range(repeats))
    tn = statistics.median(timed(new_tokens) for _ in range(repeats))
    return {
        "batch": batch,
        "prompt_tokens": len(encoded[0].input_ids),
        "new_tokens": new_tokens,
        "ttft_s": t1,
        "decode_tok_s": batch * (new_tokens - 1) / max(tn - t1, 1e-9),
    }


def bench_server(pipeline, image_size: int, clients: int, new_tokens: int) -> dict:
    """The server's engine with `clients` concurrent requests vs one request alone."""
    from convllava_jp.infer.batching import ContinuousBatcher
    from convllava_jp.infer.generation import GenerationConfig

    encoded = _requests(pipeline, clients, image_size)
    config = GenerationConfig(max_new_tokens=new_tokens)
    with ContinuousBatcher(pipeline, max_batch_size=clients, max_queue=clients, batch_wait_s=0.01) as batcher:
        batcher.generate(encoded[0], GenerationConfig(max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        single = batcher.generate(encoded[0], config).completion_tokens / (time.perf_counter() - t0)
        latencies: list[float] = []
        tokens: list[int] = []

        def client(e) -> None:
            start = time.perf_counter()
            result = batcher.generate(e, config, timeout=600)
            latencies.append(time.perf_counter() - start)
            tokens.append(result.completion_tokens)

        threads = [threading.Thread(target=client, args=(e,)) for e in encoded]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    total = sum(tokens) / wall
    return {
        "clients": clients,
        "new_tokens": new_tokens,
        "tok_s": total,
        "single_client_tok_s": single,
        "speedup": total / single,
        "p50_latency_s": statistics.median(latencies),
        "max_latency_s": max(latencies),
    }


# --- report -----------------------------------------------------------------------------------
def _fmt(v, spec: str = ".2f", scale: float = 1.0) -> str:
    return "" if v is None else format(v * scale, spec)


def render(result: dict) -> str:
    """One Markdown table: stages, generation, server, then the goals."""
    lines = [
        f"GPU check on {result['device_name']} ({result['model']}, torch {result['torch']}, {result['mode']})",
        "",
        "| what | batch | seq / tokens | optimizer | peak mem (GiB) | step / TTFT (s) | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| stage {r['stage']} train ({r['trainable_params'] / 1e6:,.0f}M trainable) | {r['batch']} | "
            f"{r['seq_len']} | {r['optimizer']} | {_fmt(r['peak_mem_gib'])} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {_fmt(r['mfu'], '.1f', 100)}{'%' if r['mfu'] is not None else ''} |"
        )
    for g in result["generation"]:
        lines.append(
            f"| generate {result['image_size']} px | {g['batch']} | {g['prompt_tokens']} + {g['new_tokens']} | "
            f"| | {g['ttft_s']:.3f} | {g['decode_tok_s']:,.1f} decode | |"
        )
    s = result.get("server")
    if s:
        lines.append(
            f"| server engine, {s['clients']} clients | {s['clients']} | {s['new_tokens']} new | | | "
            f"p50 {s['p50_latency_s']:.2f} | {s['tok_s']:,.1f} ({s['speedup']:.2f}x one client) | |"
        )
    lines += ["", "| goal | value | result |", "|---|---|---|"]
    for goal in result["goals"]:
        lines.append(f"| {goal['goal']} | {goal['value']} | {goal['result']} |")
    return "\n".join(lines)


def check_goals(result: dict) -> list[dict]:
    """Every stage <= 24 GiB peak; stage 3 MFU >= 40% (n/a without a GPU / a known card)."""
    goals = []
    for r in result["stages"]:
        mem = r["peak_mem_gib"]
        goals.append(
            {
                "goal": f"stage {r['stage']} fits {FIT_GIB:.0f} GiB",
                "value": "" if mem is None else f"{mem:.2f} GiB",
                "result": "n/a" if mem is None else ("pass" if mem <= FIT_GIB else "FAIL"),
            }
        )
    last = next((r for r in result["stages"] if r["stage"] == "3"), None)
    mfu = last["mfu"] if last else None
    goals.append(
        {
            "goal": f"stage 3 MFU >= {MFU_GOAL:.0%}",
            "value": "" if mfu is None else f"{mfu:.1%}",
            "result": "n/a" if mfu is None else ("pass" if mfu >= MFU_GOAL else "FAIL"),
        }
    )
    return goals


def _text_tokens(spec: str, small: bool, max_length: int, image_tokens: int) -> dict[str, int]:
    """Text tokens per stage: captions for 1-2, the recipe's max length (worst case) for 3."""
    tokens = (
        {"1": 112, "2": 112, "3": max_length - image_tokens} if not small else {"1": 16, "2": 16, "3": 32}
    )
    for item in filter(None, (spec or "").split(",")):
        key, _, value = item.partition("=")
        tokens[key.strip()] = int(value)
    return tokens


def run(args: argparse.Namespace) -> dict:
    from convllava_jp.infer.generation import VLMPipeline
    from convllava_jp.train.recipe import load_recipe

    device = torch.device("cpu" if args.small else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --small for the CPU smoke run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name) if device.type == "cuda" else None
    recipe = load_recipe(RECIPE)
    model, processor, image_size = build_model("tiny" if args.small else recipe.model.preset, device)
    n_image = model.config.image_tokens(image_size, image_size)
    args.text_tokens = _text_tokens(args.text_tokens_spec, args.small, recipe.stages["3"].max_length, n_image)
    result = {
        "device_name": name,
        "peak_bf16_tflops": peak,
        "model": f"{'tiny' if args.small else recipe.model.preset}, {sum(p.numel() for p in model.parameters()):,} params",
        "image_size": image_size,
        "torch": torch.__version__,
        "mode": "fp32 weights + bf16 autocast" if device.type == "cuda" else "fp32 (CPU smoke run)",
        "stages": [],
    }
    t_start = time.perf_counter()
    for stage_name in args.stages.split(","):
        row = bench_stage(model, recipe.stages[stage_name], args, image_size, device, peak)
        log.info("stage %s: %s", stage_name, row)
        result["stages"].append(row)
    model.requires_grad_(False)
    if device.type == "cuda":
        model.to(torch.bfloat16)
        torch.cuda.empty_cache()
    pipeline = VLMPipeline(model, processor)
    result["generation"] = [
        bench_generation(pipeline, image_size, b, args.new_tokens, args.repeats) for b in (1, args.gen_batch)
    ]
    result["server"] = bench_server(pipeline, image_size, args.clients, args.new_tokens)
    result["seconds"] = time.perf_counter() - t_start
    result["goals"] = check_goals(result)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model on CPU, a few seconds (CI)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage (default 5; --small 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --small 1)")
    p.add_argument(
        "--max-batch", type=int, default=None, help="cap the recipe's per-device batch (--small: 2)"
    )
    p.add_argument("--text-tokens", dest="text_tokens_spec", default="", help="e.g. '1=112,2=112,3=1388'")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 64; --small 4)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="generation timings per figure (default 3)")
    p.add_argument("--json", default="gpu_check.json", help="where the results go (default: %(default)s)")
    args = p.parse_args(argv)
    small = {"steps": 1, "warmup": 1, "max_batch": 2, "new_tokens": 4, "repeats": 1}
    full = {"steps": 5, "warmup": 2, "max_batch": None, "new_tokens": 64, "repeats": 3}
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(render(result))
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
