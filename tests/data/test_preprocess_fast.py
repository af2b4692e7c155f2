"""The batched preprocessing path equals, bit for bit, torchvision's PIL -> to_tensor -> normalize."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from convllava_jp.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    load_image,
    preprocess,
    preprocess_batch,
    preprocessed_size,
    to_rgb,
)
from convllava_jp.errors import ImageError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor

BICUBIC = TF.InterpolationMode.BICUBIC


def reference(
    image: Image.Image,
    size: int | tuple[int, int],
    mode: str,
    stride: int = 64,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """The straightforward computation: torchvision on the PIL image, then to_tensor + normalize."""
    image = image if image.mode == "RGB" else to_rgb(image)
    target_h, target_w = preprocessed_size(image.height, image.width, size, mode, stride, max_tokens)
    width, height = image.size
    if mode == "crop":  # open_clip: Resize(int) for a square target, ResizeKeepRatio otherwise
        if target_h == target_w:
            resized = TF.resize(image, target_h, interpolation=BICUBIC)
        else:
            ratio = min(height / target_h, width / target_w)
            resized = TF.resize(image, [round(height / ratio), round(width / ratio)], interpolation=BICUBIC)
        image = TF.center_crop(resized, [target_h, target_w])
    elif mode == "pad":  # LLaVA's expand2square, to the target's aspect
        if width * target_h >= height * target_w:
            canvas_w, canvas_h = width, max(height, round(width * target_h / target_w))
        else:
            canvas_w, canvas_h = max(width, round(height * target_w / target_h)), height
        canvas = Image.new("RGB", (canvas_w, canvas_h), tuple(int(c * 255) for c in mean))
        canvas.paste(image, ((canvas_w - width) // 2, (canvas_h - height) // 2))
        image = TF.resize(canvas, [target_h, target_w], interpolation=BICUBIC)
    else:
        image = TF.resize(image, [target_h, target_w], interpolation=BICUBIC)
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    if rng.random() < 0.5:  # noise
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:  # a gradient: resampling errors show up here, unlike in noise
        y, x = np.mgrid[0:height, 0:width]
        array = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y) % 256], -1)
    image = Image.fromarray(array.astype(np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def random_case(rng: np.random.Generator) -> tuple[str, dict]:
    mode = str(rng.choice(["crop", "pad", "keep-aspect"]))
    stride = int(rng.choice([32, 64]))
    if mode == "keep-aspect":
        size: int | tuple[int, int] = stride * int(rng.integers(1, 5))
        max_tokens = None if rng.random() < 0.5 else int(rng.integers(1, 10))
        return mode, {"size": size, "stride": stride, "max_tokens": max_tokens}
    size = int(rng.integers(8, 200)) if rng.random() < 0.6 else tuple(int(s) for s in rng.integers(8, 200, 2))
    return mode, {"size": size, "stride": stride}


def test_preprocess_equals_the_reference_over_random_sizes_and_modes() -> None:
    rng = np.random.default_rng(18)
    for _ in range(60):
        mode, options = random_case(rng)
        width, height = (int(side) for side in rng.integers(1, 300, 2))
        image = random_image(rng, width, height, str(rng.choice(["RGB", "RGB", "L", "RGBA", "P"])))
        expected = reference(image, mode=mode, **options)
        ours = preprocess(image, mode=mode, **options)
        assert ours.dtype == torch.float32 and ours.is_contiguous()
        assert torch.equal(ours, expected), (mode, options, image.size, image.mode)


def test_preprocess_batch_equals_the_reference_image_by_image() -> None:
    rng = np.random.default_rng(1)
    for _ in range(12):
        mode, options = random_case(rng)
        images = [random_image(rng, *(int(s) for s in rng.integers(1, 260, 2))) for _ in range(5)]
        expected = [reference(image, mode=mode, **options) for image in images]
        ours = preprocess_batch(iter(images), mode=mode, **options)
        if all(e.shape == expected[0].shape for e in expected):
            assert isinstance(ours, torch.Tensor) and torch.equal(ours, torch.stack(expected))
        else:
            assert isinstance(ours, list) and len(ours) == len(expected)
            for tensor, want in zip(ours, expected, strict=True):
                assert torch.equal(tensor, want) and tensor.is_contiguous()
                # Each its own tensor, not a view into a batch (saving one saves only it).
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert preprocess_batch([], 64) == []


@pytest.mark.parametrize(
    "mean,std",
    [(CLIP_MEAN, CLIP_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.1, 0.7, 0.33), (0.0107, 1.9, 3.3e-5))],
)
def test_every_pixel_value_of_every_channel_normalises_exactly(mean: tuple, std: tuple) -> None:
    # 24x32 is the crop target: no resampling, so each output value is one input value normalised.
    # Every value 0-255 sits in every channel, at offsets that vary across vector lanes and images.
    values = [(np.arange(24 * 32 * 3) * (k + 1) + 85 * k) % 256 for k in range(3)]
    images = [Image.fromarray(v.reshape(24, 32, 3).astype(np.uint8)) for v in values]
    expected = torch.stack([TF.normalize(TF.to_tensor(image), list(mean), list(std)) for image in images])
    assert torch.equal(preprocess_batch(images, (24, 32), mean=mean, std=std), expected)
    assert torch.equal(preprocess(images[1], (24, 32), mean=mean, std=std), expected[1])


def test_the_default_float_dtype_is_followed_as_to_tensor_does() -> None:
    image = random_image(np.random.default_rng(3), 90, 70)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected = reference(image, 64, "pad")
        ours = preprocess(image, 64, "pad")
    finally:
        torch.set_default_dtype(previous)
    assert ours.dtype == expected.dtype == torch.float64
    assert torch.equal(ours, expected)


def test_a_std_of_zero_in_float32_fails_as_torchvision_does() -> None:
    image = random_image(np.random.default_rng(4), 40, 30)
    std = (1e-50, 1.0, 1.0)  # > 0 as a Python float, 0 in float32
    with pytest.raises(ValueError) as expected:
        reference(image, 32, "crop", std=std)
    with pytest.raises(ValueError) as ours:
        preprocess(image, 32, "crop", std=std)
    assert str(ours.value) == str(expected.value)
    # In the processor the first image's normalisation fails before the next image is loaded, as
    # when each image was loaded and preprocessed in turn.
    processor = ConvLlavaImageProcessor(image_size=64, image_std=list(std))
    with pytest.raises(ValueError, match="std evaluated to zero"):
        processor([image, b"not an image"])
    with pytest.raises(ImageError, match="<bytes: image 0>: not an image"):
        processor([b"not an image", image])


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,size", [("crop", 128), ("pad", [64, 128]), ("keep-aspect", 128)])
def test_processor_equals_the_reference_for_every_input_type(mode: str, size: object, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pictures = [
        random_image(rng, w, h) for w, h in [(128, 128), (160, 160), (192, 128), (128, 192), (97, 33)]
    ]
    path = tmp_path / "a.png"
    path.write_bytes(encoded(pictures[1], "PNG"))
    sources = [
        pictures[0],
        path,
        str(path),
        encoded(pictures[2], "PNG"),
        encoded(pictures[3], "JPEG"),
        io.BytesIO(encoded(pictures[4], "WEBP")),
        pictures[4].convert("RGBA"),
    ]
    processor = ConvLlavaImageProcessor(image_size=size, mode=mode)
    size_arg = tuple(size) if isinstance(size, list) else size
    expected = []
    for source in sources:
        if isinstance(source, io.BytesIO):
            source = io.BytesIO(source.getvalue())
        expected.append(reference(load_image(source), size_arg, mode))
    batch = processor(sources)
    pixel_values = batch["pixel_values"]
    if mode == "keep-aspect":
        assert isinstance(pixel_values, list)
        assert all(torch.equal(ours, want) for ours, want in zip(pixel_values, expected, strict=True))
    else:
        assert torch.equal(pixel_values, torch.stack(expected))
    assert batch["image_sizes"].tolist() == [list(want.shape[-2:]) for want in expected]
