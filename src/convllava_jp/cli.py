"""The `convllava-jp` command. Each subcommand is a thin call into the packages.

Imports of torch/transformers happen inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
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
