"""`convllava-jp info | init | convert-llava-jp`: model presets, the stage-1 start model, imports."""

from __future__ import annotations

import argparse
import json

from ..errors import ConvLlavaError


def _parse_size(text: str) -> tuple[int, int]:
    """'768' -> (768, 768); '1280x960' -> (1280, 960) as (H, W)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from ..model import ConvLlavaForConditionalGeneration, build_config, get_preset
    from ..model.modeling import parameter_counts

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
        "llm": preset.llm,
        "template": preset.template,
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
        f"projector {config.projector_type}; LLM {preset.llm or '(random)'}, chat template {preset.template}"
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from ..convert.init import init_model

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
    from ..convert.llava_jp import convert_llava_jp

    convert_llava_jp(args.src, args.dst, allow_pickle=args.allow_pickle)
    print(f"converted {args.src} -> {args.dst}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and image tokens of a preset (meta device, no weights)")
    p.add_argument("--preset", default="convllava-jp-1.3b-768", help="preset name (default: %(default)s)")
    p.add_argument("--image-size", type=_parse_size, help="N or HxW (default: the preset's size)")
    p.add_argument("--stage5-depth", type=int, help="override stage-5 depth (0 = no stage 5)")
    p.add_argument("--stage5-width", type=int, help="override stage-5 width")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def _add_init(sub) -> None:
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


def _add_convert(sub) -> None:
    p = sub.add_parser("convert-llava-jp", help="import a checkpoint of the reference LLaVA-JP code")
    p.add_argument("src", help="reference checkpoint dir (config.json + model.safetensors)")
    p.add_argument("dst", help="output model dir")
    p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (weights_only)")
    p.set_defaults(func=cmd_convert)


def add_commands(sub) -> None:
    """Add `info`, `init` and `convert-llava-jp` to the `convllava-jp` subparsers."""
    _add_info(sub)
    _add_init(sub)
    _add_convert(sub)
