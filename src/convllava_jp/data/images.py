"""Images: safe loading, CLIP-style preprocessing and the image-token count.

`load_image` turns a path / bytes / file object / PIL image into a fully decoded RGB image, or
raises `ImageError` naming the file (missing, not an image, not an accepted format, truncated, too
many pixels). Only the raster formats in `image_formats.SAFE_IMAGE_FORMATS` are ever decoded: every
place that reads an image (server, web UI, predict, chat, evaluation, training data, demo) comes here.

`preprocess` turns an RGB image into a normalised `(3, H, W)` float32 tensor in one of three modes:

- ``crop``: what open_clip does for ``CLIP-convnext_large_d_320`` at inference
  (`open_clip.transform.image_transform(size, is_train=False)`): shortest side to the target with
  bicubic resampling, center crop, CLIP mean/std.
- ``pad``: LLaVA's ``expand2square``: paste the image centered on a square canvas of the mean
  colour, then resize that canvas to the target.
- ``keep-aspect``: long side to the target, both sides rounded to multiples of ``stride``, no crop
  (ConvLLaVA's finding for documents).

`image_token_count` is the one formula for how many image tokens a preprocessed image becomes.
The model's `ConvLlavaImageProcessor` (`model/image_processing.py`) wraps loading and preprocessing.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import IO

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from ..errors import ConfigError, ImageError
from .image_formats import OPENERS, SAFE_IMAGE_FORMATS, refused_format_message, unidentified_message

logger = logging.getLogger(__name__)

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, used by CLIP-convnext_large_d_320.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PREPROCESS_MODES: tuple[str, ...] = ("crop", "pad", "keep-aspect")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_STRIDE = 64  # ConvNeXt with stage 5: one image token per 64x64 pixels

# `pad` builds LLaVA's square canvas (max(W, H)^2 pixels) only up to this size (~190 MB RGB); a very
# long, thin image would otherwise need gigabytes, so beyond it the image is shrunk first.
_PAD_CANVAS_LIMIT = 64_000_000

# `crop` resizes the whole image before cropping (as open_clip) up to this many pixels; beyond it
# (very long, thin images) only the kept region is resampled.
_RESIZE_LIMIT = 64_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image
ImageSize = int | tuple[int, int] | list[int]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open, check and fully decode one image; return it as an RGB PIL image (EXIF-rotated).

    Args:
        source: a path (str / PathLike), raw encoded bytes, a binary file object, or a PIL image.
        max_pixels: refuse images with ``width * height`` above this. The size is read from the
            header, before any pixel is decoded, so a decompression bomb costs nothing. PIL's own
            limit (`PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting left untouched here) also
            applies: an image over it is refused even if ``max_pixels`` is larger.
        name: how error messages call the image; defaults to the path, the file object's name,
            or ``"<bytes>"``.

    Returns:
        A new ``RGB`` image, decoded in full, with the EXIF orientation applied.

    Raises:
        ImageError: missing file, not an image, truncated or corrupt data, too many pixels.
        ConfigError: ``max_pixels`` is not a positive int.
    """
    check_positive_int("max_pixels", max_pixels)
    label = name if name is not None else _source_label(source)
    if isinstance(source, Image.Image):
        # An image another loader opened (e.g. a custom dataset) is still undecoded until `load()`:
        # only an image built in memory (not an ImageFile) or one of the safe formats is decoded.
        if isinstance(source, ImageFile.ImageFile) and source.format not in SAFE_IMAGE_FORMATS:
            raise ImageError(refused_format_message(label, source.format or "unknown"))
        return _decode_checked(source, label, max_pixels)

    if isinstance(source, (str, os.PathLike)):
        fp: str | os.PathLike | IO[bytes] = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        fp = source
    else:
        raise ImageError(
            f"{label}: cannot read an image from a {type(source).__name__}; "
            "pass a path, bytes, a binary file object or a PIL image"
        )

    try:
        with warnings.catch_warnings():
            # PIL warns (then errors at twice the size) about decompression bombs while reading the
            # header; make the warning an exception too, so it becomes a clean ImageError below.
            # (catch_warnings is process-wide before Python 3.14: a race between threads can at
            # worst leave this one "error" filter installed, i.e. PIL stays strict.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=OPENERS)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image file") from None
    except PermissionError as exc:
        raise ImageError(f"{label}: cannot read the file ({exc.strerror})") from None
    except UnidentifiedImageError:
        raise ImageError(unidentified_message(label, fp)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: refused as a possible decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow's format plugins raise many types on a corrupt header
        raise ImageError(f"{label}: cannot read the image header ({type(exc).__name__}: {exc})") from exc

    # `with` closes a file Pillow opened itself; a caller's file object stays open.
    with image:
        return _decode_checked(image, label, max_pixels)


def _source_label(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)  # type: ignore[return-value]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    file_name = getattr(source, "name", None)
    return file_name if isinstance(file_name, str) else f"<{type(source).__name__}>"


def _decode_checked(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Check the size, decode every pixel, apply EXIF orientation, convert to RGB (a new image)."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels is more than max_pixels="
            f"{max_pixels:,} (a decompression bomb?); pass a larger max_pixels if you trust the file"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{label}: the image is empty ({width}x{height})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A full decode now, so truncated data fails here and not later inside a DataLoader
            # worker. Needs PIL's ImageFile.LOAD_TRUNCATED_IMAGES to stay False (its default).
            image.load()
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error...
        raise ImageError(f"{label}: truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc

    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not make a readable image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
        oriented = image
    try:
        return to_rgb(oriented)
    except ValueError as exc:
        raise ImageError(f"{label}: cannot convert mode {image.mode!r} to RGB ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new RGB copy of ``image``.

    Like LLaVA and open_clip this is a plain ``.convert("RGB")``: alpha is dropped, not composited
    on white, so RGBA/LA/PA images look exactly as they do in those code bases. One exception:
    16-bit grayscale is scaled to 8 bits first, because PIL's convert clips it (mostly white).
    """
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and (image.getextrema()[1] or 0) > 255):
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    elif image.mode == "P" and "transparency" in image.info:
        # Same RGB values; going through RGBA avoids PIL's "palette with transparency" warning.
        image = image.convert("RGBA")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def preprocess(
    image: Image.Image,
    size: ImageSize,
    mode: str = "crop",
    stride: int = DEFAULT_STRIDE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Resize / crop / pad one image for the vision tower and normalise it.

    Args:
        image: a PIL image (converted to RGB with `to_rgb` if it is not RGB already).
        size: the target: an int (square) or ``(H, W)`` for ``crop`` / ``pad``; the long side
            (an int, a multiple of ``stride``) for ``keep-aspect``.
        mode: ``"crop"``, ``"pad"`` or ``"keep-aspect"`` (see the module docstring).
        stride: pixels per image token side; ``keep-aspect`` rounds both sides to multiples of it.
        mean, std: per-channel normalisation (CLIP's by default).
        max_tokens: ``keep-aspect`` only: at most this many image tokens (`preprocessed_size`).

    Returns:
        ``(3, H, W)`` float32 tensor, ``(pixel / 255 - mean) / std``. ``(H, W)`` is the target for
        ``crop`` / ``pad`` and `preprocessed_size` of the image for ``keep-aspect``.
    """
    target = preprocessed_size(image.height, image.width, size, mode, stride, max_tokens)
    mean, std = check_mean_std(mean, std)
    if image.mode != "RGB":
        image = to_rgb(image)

    if mode == "crop":
        image = _resize_cover_and_center_crop(image, target)
    elif mode == "pad":
        fill = tuple(int(channel * 255) for channel in mean)  # as LLaVA's expand2square
        image = _pad_to_aspect_and_resize(image, target, fill)
    else:
        image = _resize_exact(image, target)
    tensor = TF.to_tensor(image)  # (3, H, W) float32 in [0, 1]
    return TF.normalize(tensor, list(mean), list(std))


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


def _resize_cover_and_center_crop(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """open_clip's eval transform: resize to cover ``target`` (bicubic), center crop to it.

    Same ops as open_clip: a square target uses torchvision's ``Resize(int)`` (short side = target,
    long side ``int()``-truncated), a non-square one open_clip's ``ResizeKeepRatio`` (both sides
    ``round()``-ed); then torchvision's ``CenterCrop`` (offsets ``int(round(excess / 2))``).
    """
    target_h, target_w = target
    width, height = image.size
    if target_h == target_w:
        short, long = min(width, height), max(width, height)
        new_long = int(target_h * long / short)
        resized_w, resized_h = (target_w, new_long) if width <= height else (new_long, target_h)
    else:
        ratio = min(height / target_h, width / target_w)
        resized_h, resized_w = round(height / ratio), round(width / ratio)
    if resized_w * resized_h <= _RESIZE_LIMIT:
        resized = _resize_exact(image, (resized_h, resized_w))
        return TF.center_crop(resized, [target_h, target_w])
    # A long, thin image (say 400x20000 to 1536) would need a huge resized copy: resample only the
    # region the crop keeps. Same filter and sample positions; may differ by one grey level.
    top = int(round((resized_h - target_h) / 2.0))
    left = int(round((resized_w - target_w) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    box = (left * scale_x, top * scale_y, (left + target_w) * scale_x, (top + target_h) * scale_y)
    return _resample_region(image, box, (target_w, target_h))


def _resample_region(
    image: Image.Image, box: tuple[float, float, float, float], out_size: tuple[int, int]
) -> Image.Image:
    """``image.resize(out_size, BICUBIC, box=box)``, reading only the source pixels it needs.

    Done as two one-axis passes (horizontal first, as Pillow does) on a crop around ``box``: Pillow
    13's own two-axis ``box`` path gives RGB results up to ~20 grey levels away from a full resize.
    """
    x0, y0, x1, y1 = box
    out_w, out_h = out_size
    # Bicubic reads 2 pixels either side, times the scale when downsampling; +1 for rounding.
    margin_x = 2 * max((x1 - x0) / out_w, 1.0) + 1
    margin_y = 2 * max((y1 - y0) / out_h, 1.0) + 1
    left, top = max(0, math.floor(x0 - margin_x)), max(0, math.floor(y0 - margin_y))
    right = min(image.width, math.ceil(x1 + margin_x))
    bottom = min(image.height, math.ceil(y1 + margin_y))
    region = image.crop((left, top, right, bottom))
    region = region.resize(
        (out_w, region.height), Image.Resampling.BICUBIC, box=(x0 - left, 0, x1 - left, region.height)
    )
    return region.resize((out_w, out_h), Image.Resampling.BICUBIC, box=(0, y0 - top, out_w, y1 - top))


def _pad_to_aspect_and_resize(
    image: Image.Image, target: tuple[int, int], fill: tuple[int, ...]
) -> Image.Image:
    """LLaVA's ``expand2square`` (generalised to the target's aspect ratio), then a bicubic resize."""
    target_h, target_w = target
    width, height = image.size
    if width * target_h >= height * target_w:  # wider than the target: pad top and bottom
        canvas_w, canvas_h = width, max(height, round(width * target_h / target_w))
    else:
        canvas_w, canvas_h = max(width, round(height * target_w / target_h)), height
    if canvas_w * canvas_h > _PAD_CANVAS_LIMIT:
        # Shrink first so the canvas stays small; differs from LLaVA only along the image border.
        scale = target_h / canvas_h
        shrunk = _resize_exact(image, (max(1, round(height * scale)), max(1, round(width * scale))))
        canvas = Image.new("RGB", (target_w, target_h), fill)
        canvas.paste(shrunk, ((target_w - shrunk.width) // 2, (target_h - shrunk.height) // 2))
        return canvas
    if (canvas_w, canvas_h) != (width, height):
        canvas = Image.new("RGB", (canvas_w, canvas_h), fill)
        canvas.paste(image, ((canvas_w - width) // 2, (canvas_h - height) // 2))
        image = canvas
    return _resize_exact(image, target)


def _resize_exact(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Bicubic resize to ``(H, W)`` with torchvision (PIL antialiased bicubic underneath)."""
    return TF.resize(image, list(target), interpolation=TF.InterpolationMode.BICUBIC)


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
