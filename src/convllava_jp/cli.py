"""The `convllava-jp` command. Each subcommand is a thin call into the packages.

Imports of torch/transformers happen inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import ConvLlavaError

log = logging.getLogger("convllava_jp")


def _parse_size(text: str) -> tuple[int, int]:
    """'768' -> (768, 768); '1280x960' -> (1280, 960) as (H, W)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None


# --- info -----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .model import ConvLlavaForConditionalGeneration, build_config, get_preset
    from .model.modeling import parameter_counts

    preset = get_preset(args.preset)
    config = build_config(preset, stage5_depth=args.stage5_depth, stage5_width=args.stage5_width)
    h, w = args.image_size or (preset.image_size, preset.image_size)
    stride = config.image_stride
    if h % stride or w % stride:
        raise ConvLlavaError(f"image size {h}x{w} is not a multiple of the vision stride {stride}")
    with torch.device("meta"):  # no weights are allocated: instant even for 2B parameters
        model = ConvLlavaForConditionalGeneration(config)
    counts = parameter_counts(model)
    info = {
        "preset": preset.name,
        "image_size": [h, w],
        "image_tokens": config.image_tokens(h, w),
        "params": counts,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{preset.name}: {preset.description}")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in counts.items():
        table.add_row(part, f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,}")
    console = Console()
    console.print(table)
    console.print(
        f"image {h}x{w} -> {info['image_tokens']} image tokens (stride {stride}); "
        f"vision stages {config.vision_config.depths} widths {config.vision_config.hidden_sizes}; "
        f"projector {config.projector_type}"
    )
    return 0


# --- init / convert -------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from .model.weights import init_model

    init_model(
        args.preset,
        args.output,
        llm=args.llm,
        vision=args.vision,
        tokenizer=args.tokenizer,
        allow_pickle=args.allow_pickle,
    )
    print(f"wrote the stage-1 starting model to {args.output}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .model.weights import convert_llava_jp

    convert_llava_jp(args.src, args.dst, allow_pickle=args.allow_pickle)
    print(f"converted {args.src} -> {args.dst}")
    return 0


# --- data / training -----------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import generate_world

    info = generate_world(args.out, args.train, args.test, seed=args.seed, image_size=args.image_size)
    print(f"synthetic world in {args.out}: {args.train} train / {args.test} test images")
    print(json.dumps({"chance": info.chance}, ensure_ascii=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.recipe import load_recipe
    from .train.trainer import train_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    resume: str | bool = args.resume if args.resume else not args.no_resume
    results = train_recipe(recipe, args.stage, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    for r in results:
        print(
            f"stage {r.stage}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.seconds:.0f} s -> {r.model_dir}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_demo_table, run_demo

    result = run_demo(
        args.output,
        n_train=args.train,
        n_test=args.test,
        seed=args.seed,
        step_scale=args.step_scale,
        overrides=args.set,
        threads=args.threads,
        vision_steps=args.vision_steps,
    )
    print_demo_table(result)
    return 0


# --- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convllava-jp",
        description="Build, train, serve and evaluate Japanese ConvLLaVA vision-language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts and image tokens of a preset (meta device, no weights)")
    p.add_argument("--preset", default="convllava-jp-1.3b-768", help="preset name (default: %(default)s)")
    p.add_argument("--image-size", type=_parse_size, help="N or HxW (default: the preset's size)")
    p.add_argument("--stage5-depth", type=int, help="override stage-5 depth (0 = no stage 5)")
    p.add_argument("--stage5-width", type=int, help="override stage-5 width")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write the starting model of stage 1 from pretrained parts")
    p.add_argument("--preset", default="convllava-jp-1.3b-768", help="preset name (default: %(default)s)")
    p.add_argument(
        "--llm", help="HF hub id or local dir of the causal LM (default: the preset's config, random)"
    )
    p.add_argument(
        "--vision",
        help="open_clip 'hf-hub:org/name', a local open_clip dir, a timm checkpoint file or a timm model name "
        "(stages 1-4; stage 5 and the projector start fresh)",
    )
    p.add_argument("--tokenizer", help="tokenizer dir/id (default: the --llm's)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow .bin/.pth pickle weights (weights_only)"
    )
    p.add_argument("--output", required=True, help="model directory to write")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("convert-llava-jp", help="import a checkpoint of the reference LLaVA-JP code")
    p.add_argument("src", help="reference checkpoint dir (config.json + model.safetensors)")
    p.add_argument("dst", help="output model dir")
    p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (weights_only)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "synth", help="generate the synthetic Japanese world (images, captions, QA, tokenizer)"
    )
    p.add_argument("--out", default="demo-output/world", help="output dir (default: %(default)s)")
    p.add_argument("--train", type=int, default=2000, help="training images (default: %(default)s)")
    p.add_argument("--test", type=int, default=400, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train",
        help="train a recipe's stages (each from the previous stage's output)",
        description="Train stages of a YAML recipe with the HF Trainer. Works unchanged under torchrun / "
        "accelerate launch. Resumes from the newest complete checkpoint of a stage unless --no-resume.",
    )
    p.add_argument(
        "--recipe", default="tiny-synthetic", help="recipe YAML path or built-in name (default: %(default)s)"
    )
    p.add_argument("--stage", default="all", help="1, 2, 3, a list '1,3', a range '2-3' or 'all' (default)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set lr=1e-4 --set stages.1.max_steps=10 (repeatable)",
    )
    p.add_argument("--resume", help="resume the (single) selected stage from this checkpoint dir")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and start over")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo",
        help="the built-in demo: synthetic world -> 3 training stages on a tiny model -> held-out scores",
    )
    p.add_argument("--output", default="demo-output", help="output dir (default: %(default)s)")
    p.add_argument("--train", type=int, default=8000, help="training images (default: %(default)s)")
    p.add_argument("--test", type=int, default=400, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    p.add_argument(
        "--vision-steps",
        type=int,
        default=3000,
        help="steps of the vision tower's pretraining on the world, the demo's stand-in for CLIP (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.set_defaults(func=cmd_demo)

    # Serving and evaluation define their own subcommands (their modules import torch lazily).
    from .eval.commands import register as register_eval
    from .infer.commands import register as register_infer

    register_infer(sub)
    register_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except ConvLlavaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
