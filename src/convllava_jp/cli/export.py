"""`convllava-jp export`: a model dir as a plain transformers model dir (no custom code)."""

from __future__ import annotations

import argparse

EXPORT_DESCRIPTION = (
    "Write a model dir as transformers' FastVlmForConditionalGeneration, so plain transformers\n"
    "(AutoModelForImageTextToText), TRL, the Hub and vLLM's Transformers backend load it\n"
    "without this package:\n\n"
    "  convllava-jp export --format transformers MODEL_DIR OUT\n"
    "  vllm serve OUT --model-impl transformers\n\n"
    "Every export is checked before it is written: the exported model, reloaded from OUT, must\n"
    "give this model's logits. Models it cannot carry exactly (a projector other than linear /\n"
    "mlp2x_gelu, keep-aspect or non-square images) are refused with the reason."
)


def cmd_export(args: argparse.Namespace) -> int:
    from ..convert.export import export_model_dir

    out = export_model_dir(args.src, args.dst, fmt=args.format, template=args.template)
    print(f"exported {args.src} -> {out} ({args.format})")
    return 0


def add_commands(sub) -> None:
    """Add `export` to the `convllava-jp` subparsers."""
    p = sub.add_parser(
        "export",
        help="write a model dir as a plain transformers model (FastVLM class, no custom code)",
        description=EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="DIR", help="model directory of ours")
    p.add_argument("dst", metavar="OUT", help="directory to write (replaced if it is a model dir)")
    p.add_argument(
        "--format", default="transformers", choices=["transformers"], help="target (default: %(default)s)"
    )
    p.add_argument(
        "--template",
        help="chat template the export carries, its only one (default: the one the model was trained "
        "with, else llm-jp-v1)",
    )
    p.set_defaults(func=cmd_export)
