"""Image sizes: the output size of each preprocessing mode, the image-token count, option checks.

Pure arithmetic, no pixels: what `images.preprocess` produces (`preprocessed_size`), how many
image tokens that becomes (`image_token_count`, the one formula) and the checks of the
size / mode / stride / normalisation options, shared by `images` and the model's image processor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

PREPROCESS_MODES: tuple[str, ...] = ("crop", "pad", "keep-aspect")
DEFAULT_STRIDE = 64  # ConvNeXt with stage 5: one image token per 64x64 pixels

ImageSize = int | tuple[int, int] | list[int]


def preprocessed_size(
    height: int,
    width: int,
    size: ImageSize,
    mode: str = "crop",
    stride: int = DEFAULT_STRIDE,
    max_tokens: int | None = None,
) -> tuple[int, int]:
    """The ``(H, W)`` that `preprocess` gives an image of ``height x width``, without doing it.

    ``keep-aspect`` with ``max_tokens``: an image whose size at the long-side target would take more
    image tokens is scaled down further, keeping its aspect, to the largest grid within the budget
    (a long receipt or an A4 page keeps its shape at a bounded cost).

    Raises:
        ConfigError: unknown mode, bad size or stride, or a ``keep-aspect`` target that is not a
            single multiple of ``stride``.
    """
    target = check_preprocess_options(size, mode, stride)
    if mode != "keep-aspect":
        return target
    long_side = target[0]
    scale = long_side / max(height, width)

    def round_to_stride(length: int) -> int:
        return max(stride, math.floor(length * scale / stride + 0.5) * stride)

    out = round_to_stride(height), round_to_stride(width)
    if max_tokens is None or (out[0] // stride) * (out[1] // stride) <= max_tokens:
        return out
    return _token_budget_size(height, width, stride, max_tokens)


def _token_budget_size(height: int, width: int, stride: int, max_tokens: int) -> tuple[int, int]:
    """The largest (rows, cols) grid of the image's aspect with rows * cols <= max_tokens, in pixels."""
    check_positive_int("max_tokens", max_tokens)
    scale = math.sqrt(max_tokens / (height * width))
    # Each side at least one token and at most the budget (a very long image would otherwise ask
    # for more columns than the budget once its single row is rounded up to 1).
    rows = min(max(1, math.floor(height * scale)), max_tokens)
    cols = min(max(1, math.floor(width * scale)), max_tokens)
    rows, cols = min(rows, max_tokens // cols), min(cols, max_tokens // rows)
    # Rounding down may leave room for one more row or column.
    if (rows + 1) * cols <= max_tokens and (rows + 1) / cols <= height / width:
        rows += 1
    elif rows * (cols + 1) <= max_tokens and rows / (cols + 1) >= height / width:
        cols += 1
    return rows * stride, cols * stride


def image_token_count(height: int, width: int, stride: int = DEFAULT_STRIDE) -> int:
    """Image tokens the vision tower makes from a ``(3, height, width)`` input: ``(H/s) * (W/s)``.

    Raises:
        ConfigError: ``height`` or ``width`` is not a positive multiple of ``stride``.
    """
    check_positive_int("stride", stride)
    for side_name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % stride:
            raise ConfigError(
                f"image {side_name} {side!r} is not a positive multiple of the stride {stride}; "
                f"preprocess images to sizes like {stride * 12} first"
            )
    return (height // stride) * (width // stride)


def check_preprocess_options(size: ImageSize, mode: str, stride: int) -> tuple[int, int]:
    """Validate a (size, mode, stride) triple; return the target ``(H, W)`` (long side twice for
    ``keep-aspect``).

    Raises:
        ConfigError: what is wrong and what the valid values are.
    """
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"unknown image mode {mode!r}; valid modes: {', '.join(PREPROCESS_MODES)}")
    check_positive_int("stride", stride)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or not all(_is_positive_int(side) for side in size):
            raise ConfigError(f"image size {size!r} must be a positive int or (height, width)")
        if mode == "keep-aspect":
            raise ConfigError(f"mode 'keep-aspect' takes one int size (the long side), not {size!r}")
        return int(size[0]), int(size[1])
    if not _is_positive_int(size):
        raise ConfigError(f"image size {size!r} must be a positive int or (height, width)")
    if mode == "keep-aspect" and size % stride:
        raise ConfigError(
            f"mode 'keep-aspect' needs a size that is a multiple of the stride {stride}, got {size}; "
            f"try {max(stride, round(size / stride) * stride)}"
        )
    return size, size


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(option: str, value: object) -> None:
    if not _is_positive_int(value):
        raise ConfigError(f"{option} must be a positive int, got {value!r}")


def check_mean_std(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean_t = tuple(float(value) for value in mean)
        std_t = tuple(float(value) for value in std)
    except (TypeError, ValueError):
        raise ConfigError(f"image mean/std must be 3 numbers each, got {mean!r} / {std!r}") from None
    if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
        raise ConfigError(
            f"image mean/std must be 3 numbers each (std > 0), got {list(mean)!r} / {list(std)!r}"
        )
    return mean_t, std_t
