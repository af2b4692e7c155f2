"""Model directories: the model (safetensors + config) and its processor, saved and loaded as one.

Every package reads and writes models through these functions. A directory is written beside its
final path and renamed into place (`convllava_jp.io.publish_dir`), so it appears complete or not
at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..errors import CheckpointError, ConfigError
from ..io import publish_dir
from .image_processing import ConvLlavaImageProcessor
from .modeling import ConvLlavaForConditionalGeneration
from .processing import ConvLlavaProcessor

logger = logging.getLogger(__name__)

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`torch.float32` from "float32" / "fp32" / a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def save_model_dir(
    model: ConvLlavaForConditionalGeneration, processor: ConvLlavaProcessor, output_dir: str | os.PathLike
) -> Path:
    """Write model (safetensors) + processor into `output_dir` atomically; returns the path.

    An existing `output_dir` is replaced as a whole, but only if it is empty or a model directory
    (has config.json), so a mistyped path never deletes unrelated files.
    """
    dst = Path(output_dir)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not _is_model_dir(dst):
        raise CheckpointError(
            f"{dst} is not empty and not a model directory (no config.json); refusing to replace it"
        )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    publish_dir(dst, write, replace_if=_is_model_dir)
    logger.info("saved model and processor to %s", dst)
    return dst


def load_processor(model_dir: str | os.PathLike) -> ConvLlavaProcessor:
    """`ConvLlavaProcessor` of a model directory (tokenizer + image processor)."""
    # Built from its parts rather than ConvLlavaProcessor.from_pretrained, which would need the
    # image processor registered with transformers' AutoImageProcessor.
    image_processor = ConvLlavaImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ConvLlavaProcessor(image_processor, tokenizer)


def load_model_dir(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[ConvLlavaForConditionalGeneration, ConvLlavaProcessor]:
    """(model, processor) of a model directory written by `save_model_dir`.

    `dtype` None keeps the dtype the weights were saved in. The model is returned in eval mode.
    """
    path = Path(model_dir)
    if not _is_model_dir(path):
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    resolved = resolve_dtype(dtype)
    kwargs = {} if resolved is None else {"dtype": resolved}
    model = ConvLlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return model, load_processor(path)
