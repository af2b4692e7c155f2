"""The `convllava-jp` command: one parser; each subcommand is a thin call into the packages.

The argument definitions live in one small module per group of commands (`model`, `train`,
`infer`, `eval`). torch and transformers are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ConvLlavaError
from . import eval as eval_commands
from . import export as export_commands
from . import infer as infer_commands
from . import model as model_commands
from . import train as train_commands

log = logging.getLogger("convllava_jp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convllava-jp",
        description="Build, train, serve and evaluate Japanese ConvLLaVA vision-language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_commands.add_commands(sub)
    train_commands.add_commands(sub)
    infer_commands.add_commands(sub)
    eval_commands.add_commands(sub)
    export_commands.add_commands(sub)
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
