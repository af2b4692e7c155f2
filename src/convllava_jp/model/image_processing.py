"""`ConvLlavaImageProcessor`: images -> pixel values for the vision tower, as a transformers image processor.

It loads and preprocesses with `data.images` and saves / loads as ``preprocessor_config.json``
(``"image_processor_type": "ConvLlavaImageProcessor"``), so `AutoImageProcessor` finds it by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, TypedDict

import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from ..data.image_sizes import (
    DEFAULT_STRIDE,
    ImageSize,
    check_mean_std,
    check_positive_int,
    check_preprocess_options,
    image_token_count,
    preprocessed_size,
)
from ..data.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    load_image,
    preprocess_batch,
)
from ..errors import ConfigError, ImageError

logger = logging.getLogger(__name__)


class ConvLlavaImageProcessorKwargs(TypedDict, total=False):
    """Options `ConvLlavaImageProcessor.from_pretrained(path, **kwargs)` may override."""

    image_size: int | list[int]
    mode: str
    stride: int
    image_mean: list[float]
    image_std: list[float]
    max_pixels: int
    max_image_tokens: int | None


class ConvLlavaImageProcessor(BaseImageProcessor):
    """Loads and preprocesses images for ConvLLaVA; saved as ``preprocessor_config.json``.

    Args:
        image_size: int (square) or ``[H, W]``; the long side for ``keep-aspect``. Must be a
            multiple of ``stride`` so every pixel maps to an image token.
        mode: ``"crop"`` (open_clip's eval transform), ``"pad"`` (LLaVA's expand-to-square) or
            ``"keep-aspect"``.
        stride: pixels per image token side (64 with stage 5, 32 without).
        image_mean, image_std: normalisation, CLIP's by default.
        max_pixels: images with more pixels are refused (see `load_image`).
        max_image_tokens: ``keep-aspect`` only: the per-image token budget; a larger image is
            scaled down, keeping its aspect, to at most this many tokens (None: no budget).
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = ConvLlavaImageProcessorKwargs  # read by ImageProcessingMixin.from_dict

    def __init__(
        self,
        image_size: int | Sequence[int] = 768,
        mode: str = "crop",
        stride: int = DEFAULT_STRIDE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - {"image_processor_type", "auto_map", "processor_class"}
        if unknown:
            logger.warning("ConvLlavaImageProcessor: ignoring unknown options %s", sorted(unknown))
        kwargs.pop("image_processor_type", None)  # to_dict writes it back
        super().__init__(**{key: value for key, value in kwargs.items() if key not in unknown})

        size: ImageSize = list(image_size) if isinstance(image_size, (tuple, list)) else image_size
        target_h, target_w = check_preprocess_options(size, mode, stride)
        if target_h % stride or target_w % stride:
            raise ConfigError(
                f"image_size {size!r} must be a multiple of the stride {stride} so that every "
                f"pixel maps to an image token (e.g. {stride * 12})"
            )
        mean, std = check_mean_std(image_mean, image_std)
        check_positive_int("max_pixels", max_pixels)
        if max_image_tokens is not None:
            check_positive_int("max_image_tokens", max_image_tokens)
            if mode != "keep-aspect":
                raise ConfigError(
                    f"max_image_tokens applies to mode 'keep-aspect' only (mode is {mode!r}); "
                    "crop and pad always make (image_size / stride)^2 tokens"
                )
        # Plain lists and ints only: to_dict() deep-copies __dict__ straight into the JSON file.
        self.image_size: int | list[int] = size
        self.mode = mode
        self.stride = stride
        self.image_mean = list(mean)
        self.image_std = list(std)
        self.max_pixels = max_pixels
        self.max_image_tokens = max_image_tokens

    def __call__(
        self, images: ImageSource | Sequence[ImageSource], return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Load and preprocess one image or a list of them.

        Args:
            images: one image or a list; each anything `load_image` accepts.
            return_tensors: only ``"pt"`` (PyTorch) is supported.

        Returns:
            BatchFeature with ``pixel_values``: a ``(B, 3, H, W)`` float32 tensor when all images
            come out the same size (always in ``crop`` / ``pad``), else a list of ``(3, H_i, W_i)``
            tensors; and ``image_sizes``: ``(B, 2)`` int64, each image's preprocessed ``(H, W)``
            (what `image_token_count` takes).

        Raises:
            ImageError: an image cannot be used (names the file).
            ConfigError: an unsupported ``return_tensors``.
        """
        if return_tensors not in ("pt", None):
            raise ConfigError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ImageError("no images given to ConvLlavaImageProcessor")

        pixel_values = preprocess_batch(
            self._loaded(batch),
            self.image_size,
            self.mode,
            self.stride,
            self.image_mean,
            self.image_std,
            self.max_image_tokens,
        )
        image_sizes = torch.tensor([list(values.shape[-2:]) for values in pixel_values], dtype=torch.long)
        return BatchFeature({"pixel_values": pixel_values, "image_sizes": image_sizes})

    def _loaded(self, batch: Sequence[ImageSource]) -> Iterator[Image.Image]:
        """Load each image when `preprocess_batch` asks for it, so errors come in image order."""
        for index, source in enumerate(batch):
            name = f"<bytes: image {index}>" if isinstance(source, (bytes, bytearray)) else None
            yield load_image(source, max_pixels=self.max_pixels, name=name)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of the pixel values this processor makes from a ``height x width`` image."""
        return preprocessed_size(
            height, width, self.image_size, self.mode, self.stride, self.max_image_tokens
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the model makes for a ``height x width`` input image (before preprocessing)."""
        return image_token_count(*self.output_size(height, width), stride=self.stride)


IMAGE_OPTION_KEYS = ("mode", "size", "max_tokens")


def with_image_options(image_processor: ConvLlavaImageProcessor, options: dict) -> ConvLlavaImageProcessor:
    """A copy of `image_processor` with a recipe stage's `image:` options ({mode, size, max_tokens}).

    The stride, normalisation and pixel cap stay the model's. Raises ConfigError on an unknown key
    or a bad value.
    """
    unknown = set(options) - set(IMAGE_OPTION_KEYS)
    if unknown:
        raise ConfigError(f"image: unknown keys {sorted(unknown)}; known: {', '.join(IMAGE_OPTION_KEYS)}")
    mode = options.get("mode", image_processor.mode)
    return ConvLlavaImageProcessor(
        image_size=options.get("size", image_processor.image_size),
        mode=mode,
        stride=image_processor.stride,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        max_pixels=image_processor.max_pixels,
        max_image_tokens=options.get(
            "max_tokens", image_processor.max_image_tokens if mode == "keep-aspect" else None
        ),
    )
