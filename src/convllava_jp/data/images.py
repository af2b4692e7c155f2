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

`preprocess_batch` does the same for several images at once (the same values, normalised in one
pass). Output sizes, `image_token_count` (the one formula for how many image tokens a preprocessed
image becomes) and the option checks are in `image_sizes`. The model's `ConvLlavaImageProcessor`
(`model/image_processing.py`) wraps loading and preprocessing.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .image_formats import OPENERS, SAFE_IMAGE_FORMATS, refused_format_message, unidentified_message
from .image_sizes import (
    DEFAULT_STRIDE,
    ImageSize,
    check_mean_std,
    check_positive_int,
    preprocessed_size,
)

# Moved to `image_sizes`, still importable from here (redundant aliases mark re-exports).
from .image_sizes import PREPROCESS_MODES as PREPROCESS_MODES
from .image_sizes import check_preprocess_options as check_preprocess_options
from .image_sizes import image_token_count as image_token_count

logger = logging.getLogger(__name__)

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, used by CLIP-convnext_large_d_320.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 50_000_000

# `pad` builds LLaVA's square canvas (max(W, H)^2 pixels) only up to this size (~190 MB RGB); a very
# long, thin image would otherwise need gigabytes, so beyond it the image is shrunk first.
_PAD_CANVAS_LIMIT = 64_000_000

# `crop` resizes the whole image before cropping (as open_clip) up to this many pixels; beyond it
# (very long, thin images) only the kept region is resampled.
_RESIZE_LIMIT = 64_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image


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
    return preprocess_batch([image], size, mode, stride, mean, std, max_tokens)[0]


def preprocess_batch(
    images: Iterable[Image.Image],
    size: ImageSize,
    mode: str = "crop",
    stride: int = DEFAULT_STRIDE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_tokens: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """`preprocess` of several images: the same values, normalised in one pass over the batch.

    Args:
        images: PIL images, taken one at a time (from a generator that loads each one when asked,
            errors come in the order that calling `preprocess` image by image gives).
        size, mode, stride, mean, std, max_tokens: as for `preprocess`.

    Returns:
        What `collate.stack_images` makes of the `preprocess` results: one ``(N, 3, H, W)`` tensor
        when all images come out the same size (always in ``crop`` / ``pad``), else a list of N
        ``(3, H_i, W_i)`` tensors ([] for no images).

    Raises:
        ConfigError: bad options. ValueError: a ``std`` that is 0 in float32 (torchvision's).
    """
    resampled: list[Image.Image] = []
    normalisation = None
    for image in images:
        target = preprocessed_size(image.height, image.width, size, mode, stride, max_tokens)
        mean_t, std_t = check_mean_std(mean, std)
        resampled.append(_resample(image, target, mode, mean_t))
        if normalisation is None:  # where torchvision's normalize of the first image would fail
            normalisation = _normalisation(mean_t, std_t)
    if normalisation is None:
        return []
    if all(image.size == resampled[0].size for image in resampled):
        return _normalised(resampled, *normalisation)
    return [_normalised([image], *normalisation)[0] for image in resampled]


def _resample(image: Image.Image, target: tuple[int, int], mode: str, mean: tuple[float, ...]) -> Image.Image:
    """The RGB image of size ``target`` (H, W) that `preprocess` normalises."""
    if image.mode != "RGB":
        image = to_rgb(image)
    if mode == "crop":
        return _resize_cover_and_center_crop(image, target)
    if mode == "pad":
        fill = tuple(int(channel * 255) for channel in mean)  # as LLaVA's expand2square
        return _pad_to_aspect_and_resize(image, target, fill)
    return _resize_exact(image, target)


def _normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, 1, 1)`` mean and std tensors as torchvision's ``normalize`` makes them (and its check)."""
    dtype = torch.get_default_dtype()  # to_tensor's dtype
    mean_t = torch.as_tensor(mean, dtype=dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype).view(-1, 1, 1)
    if (std_t == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to division by zero.")
    return mean_t, std_t


def _normalised(images: Sequence[Image.Image], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """N RGB images of one size -> ``(N, 3, H, W)`` ``(pixel / 255 - mean) / std``.

    Bit for bit torchvision's ``to_tensor`` + ``normalize`` of each image (the same elementwise
    operations in the same order and dtype), but one uint8 copy per image and one pass per
    operation over the batch, where those make five copies of every image.
    """
    width, height = images[0].size
    planar = np.empty((len(images), 3, height, width), dtype=np.uint8)
    for planes, image in zip(planar, images, strict=True):
        for plane, band in zip(planes, "RGB", strict=True):
            plane.reshape(-1)[:] = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8)
    return torch.from_numpy(planar).to(mean.dtype).div_(255).sub_(mean).div_(std)


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
        # torchvision's center_crop of a PIL image (the resized image always covers the target).
        top = int(round((resized_h - target_h) / 2.0))
        left = int(round((resized_w - target_w) / 2.0))
        return resized.crop((left, top, left + target_w, top + target_h))
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
    """Bicubic (antialiased) resize to ``(H, W)``: what torchvision's ``resize`` does with a PIL image.

    An image already of that size is returned as it is (torchvision returns it too).
    """
    target_h, target_w = target
    if image.size == (target_w, target_h):
        return image
    return image.resize((target_w, target_h), Image.Resampling.BICUBIC)
