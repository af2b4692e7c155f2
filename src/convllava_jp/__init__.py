"""ConvLLaVA-JP: build, train, serve and evaluate Japanese ConvLLaVA vision-language models.

The public API::

    import convllava_jp
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("demo-output/model")   # or:
    model = convllava_jp.ConvLlavaForConditionalGeneration.from_pretrained("demo-output/model")
    pipe = convllava_jp.VLMPipeline.from_pretrained("demo-output/model")

`import convllava_jp` registers the config, model and processors with transformers' Auto classes.
The one exception is the `convllava-jp` command itself: it defers that (and torch) until a
subcommand needs the model, so `convllava-jp --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, ConvLlavaError, DataError, ImageError, TemplateError

__version__ = "0.1.0"

# name -> module that defines it; imported on first use (PEP 562).
_LAZY = {
    "ConvLlavaConfig": "convllava_jp.model",
    "ConvLlavaForConditionalGeneration": "convllava_jp.model",
    "ConvLlavaProcessor": "convllava_jp.model",
    "ConvLlavaImageProcessor": "convllava_jp.model",
    "build_config": "convllava_jp.model",
    "get_preset": "convllava_jp.model",
    "load_model_dir": "convllava_jp.model.model_dir",
    "save_model_dir": "convllava_jp.model.model_dir",
    "VLMPipeline": "convllava_jp.infer.generation",
}
COMMAND_NAME = "convllava-jp"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convllava_jp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _started_as_command() -> bool:
    """Is this process the `convllava-jp` command (the console script or `python -m convllava_jp.cli`)?"""
    argv = getattr(sys, "argv", None) or [""]
    if Path(argv[0]).stem == COMMAND_NAME:
        return True
    orig = list(getattr(sys, "orig_argv", []))  # while `-m` imports the package, argv[0] is only "-m"
    return any(a == "-m" and b in ("convllava_jp.cli", "convllava_jp") for a, b in zip(orig, orig[1:]))


if not _started_as_command():
    importlib.import_module("convllava_jp.model")  # registers the Auto classes

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvLlavaError",
    "DataError",
    "ImageError",
    "TemplateError",
    "__version__",
    *_LAZY,
]
