"""ConvLLaVA-JP: build, train, serve and evaluate Japanese ConvLLaVA vision-language models.

Importing `convllava_jp.model` (done lazily on first use of the names below) registers the model,
config and processor with the transformers Auto classes, so `AutoConfig`,
`AutoModelForImageTextToText` and `AutoProcessor` load our model dirs. The package root itself
imports no torch, so `convllava-jp --help` is instant.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, ConfigError, ConvLlavaError, DataError, ImageError, TemplateError

__version__ = "0.1.0"

_LAZY = {
    "ConvLlavaConfig": "convllava_jp.model",
    "ConvLlavaForConditionalGeneration": "convllava_jp.model",
    "build_config": "convllava_jp.model",
    "get_preset": "convllava_jp.model",
    "ConvLlavaProcessor": "convllava_jp.data.processor",
    "ConvLlavaImageProcessor": "convllava_jp.data.images",
    "VLMPipeline": "convllava_jp.infer.generation",
    "load_model_dir": "convllava_jp.model.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convllava_jp' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvLlavaError",
    "DataError",
    "ImageError",
    "TemplateError",
    *_LAZY,
]
