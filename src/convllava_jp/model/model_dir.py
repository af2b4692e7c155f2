"""Model directories: the model (safetensors + config) and its processor, saved and loaded as one.

Every package reads and writes models through these functions. A directory is written beside its
final path and renamed into place (`convllava_jp.io.publish_dir`), so it appears complete or not
at all.
"""

from __future__ import annotations

import json
import logging
import os
import struct
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
# safetensors' dtype names -> torch (the ones a model directory holds)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes in bfloat16 natively (CPU: AVX512-BF16 / AMX; CUDA: Ampere+)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # "auto" and the like: the caller resolves those first
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: torch's own capability report (AVX512 implies nothing about bf16)
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """`torch.float32` from "float32" / "fp32" / a torch dtype; None stays None.

    "auto" is bfloat16 where `device` computes in it natively (`native_bf16`), else None (as saved).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    value = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
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


def load_model(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> ConvLlavaForConditionalGeneration:
    """The model of a model directory (no processor), in eval mode; `dtype` as in `load_model_dir`."""
    path = Path(model_dir)
    if not _is_model_dir(path):
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    resolved = resolve_dtype(dtype, device)
    # Weights load lazily (memory-mapped); a cast reads each tensor from the file on its own, so
    # no full-precision copy of the model is ever resident (peak RSS: the cast model + one tensor).
    model = ConvLlavaForConditionalGeneration.from_pretrained(path)
    if resolved is not None:
        _cast_from_files(model, path, resolved)
    model.to(device)
    model.eval()
    return model


def load_model_dir(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[ConvLlavaForConditionalGeneration, ConvLlavaProcessor]:
    """(model, processor) of a model directory written by `save_model_dir`.

    `dtype` None keeps the dtype the weights were saved in; "auto" is bfloat16 where the device
    computes in it natively, else as saved. The model is returned in eval mode.
    """
    model = load_model(model_dir, device, dtype)
    return model, load_processor(model_dir)


def _safetensors_index(path: Path) -> dict[str, tuple[Path, torch.dtype, list[int], int, int]]:
    """name -> (file, dtype, shape, byte offset, byte length) over the dir's *.safetensors files."""
    index = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] not in _SAFETENSORS_DTYPES:
                continue
            start, end = info["data_offsets"]
            index[name] = (
                file,
                _SAFETENSORS_DTYPES[info["dtype"]],
                info["shape"],
                8 + n + start,
                end - start,
            )
    return index


_READ_CHUNK_BYTES = 16 << 20


def _read_tensor(entry: tuple[Path, torch.dtype, list[int], int, int], dtype: torch.dtype) -> torch.Tensor:
    """One tensor read with plain file reads (page cache, not this process's memory) and cast to
    `dtype` chunk by chunk, so not even one tensor is held in its saved precision."""
    file, saved, shape, offset, length = entry
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    per_chunk = max(_READ_CHUNK_BYTES // saved.itemsize, 1)
    buffer = torch.empty(min(per_chunk, flat.numel()), dtype=saved)
    with open(file, "rb") as f:
        f.seek(offset)
        for start in range(0, flat.numel(), per_chunk):
            part = buffer[: min(per_chunk, flat.numel() - start)]
            want = part.numel() * saved.itemsize
            if f.readinto(memoryview(part.view(torch.uint8).numpy())) != want:
                raise CheckpointError(f"{file}: truncated tensor data; re-save the model directory")
            flat[start : start + part.numel()] = part
    if flat.numel() * saved.itemsize != length:
        raise CheckpointError(f"{file}: tensor size does not match its header; re-save the model directory")
    return out


def _cast_from_files(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and buffers to `dtype` as `from_pretrained(dtype=)` would
    (modules in `_keep_in_fp32_modules[_strict]` stay float32), reading tensors found in the dir's
    safetensors files one at a time instead of touching the memory-mapped originals."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    index = _safetensors_index(path)
    tensors = [(n, t, True) for n, t in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, t, False) for n, t in model.named_buffers(remove_duplicate=False)]
    done: dict[int, torch.Tensor] = {}
    for name, tensor, is_param in tensors:
        if not tensor.is_floating_point():
            continue
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if tensor.dtype == target:  # already as asked (e.g. float32 from a float32 dir): no re-read
            continue
        new = done.get(id(tensor))
        if new is None:
            entry = index.get(name)
            fresh = entry is not None and list(entry[2]) == list(tensor.shape)
            new = _read_tensor(entry, target) if fresh else tensor.data.to(target)
            done[id(tensor)] = new
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if is_param:
            module._parameters[attr].data = new
        else:
            module._buffers[attr] = new
