"""`ConvLlavaImageProcessor`: saves and loads like a transformers image processor, batches in one form."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convllava_jp.data.images import image_token_count, load_image, preprocess
from convllava_jp.errors import ConfigError, ImageError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_processor_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    processor = ConvLlavaImageProcessor(image_size=[256, 384], mode="pad", stride=32, max_pixels=1_000_000)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert saved["image_processor_type"] == "ConvLlavaImageProcessor"
    assert saved["image_size"] == [256, 384] and saved["mode"] == "pad"

    loaded = ConvLlavaImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_rgb(300, 200)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])

    overridden = ConvLlavaImageProcessor.from_pretrained(tmp_path, mode="crop")
    assert overridden.mode == "crop" and overridden.image_size == [256, 384]


def test_processor_batches_same_sizes_into_one_tensor(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encode(random_rgb(200, 100, seed=1), "PNG"))
    processor = ConvLlavaImageProcessor(image_size=128)
    batch = processor([path, encode(random_rgb(90, 120), "JPEG"), random_rgb(64, 64)])
    assert batch["pixel_values"].shape == (3, 3, 128, 128)
    assert batch["image_sizes"].tolist() == [[128, 128]] * 3
    assert torch.equal(batch["pixel_values"][0], preprocess(load_image(path), 128))

    single = processor(path)
    assert single["pixel_values"].shape == (1, 3, 128, 128)


def test_processor_keeps_different_sizes_as_a_list() -> None:
    processor = ConvLlavaImageProcessor(image_size=256, mode="keep-aspect")
    batch = processor([random_rgb(400, 300), random_rgb(300, 400), random_rgb(100, 100)])
    pixel_values = batch["pixel_values"]
    assert isinstance(pixel_values, list) and len(pixel_values) == 3
    assert [tuple(p.shape) for p in pixel_values] == [(3, 192, 256), (3, 256, 192), (3, 256, 256)]
    assert batch["image_sizes"].tolist() == [[192, 256], [256, 192], [256, 256]]
    assert processor.num_image_tokens(300, 400) == image_token_count(192, 256) == 12


def test_processor_errors_name_the_image(tmp_path: Path) -> None:
    processor = ConvLlavaImageProcessor(image_size=64, max_pixels=10_000)
    with pytest.raises(ImageError, match="big.png: 200x100"):
        path = tmp_path / "big.png"
        path.write_bytes(encode(random_rgb(200, 100), "PNG"))
        processor([random_rgb(10, 10), path])
    with pytest.raises(ImageError, match="<bytes: image 1>: not an image"):
        processor([random_rgb(10, 10), b"not an image"])
    with pytest.raises(ConfigError, match="return_tensors"):
        processor(random_rgb(10, 10), return_tensors="np")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "squash"}, "valid modes: crop, pad, keep-aspect"),
        ({"image_size": 100}, "multiple of the stride 64"),
        ({"image_size": [256, 100]}, "multiple of the stride 64"),
        ({"image_size": [256, 512], "mode": "keep-aspect"}, "one int size"),
        ({"stride": 0}, "stride must be a positive int"),
        ({"image_std": [1.0, 0.0, 1.0]}, "std > 0"),
        ({"max_pixels": -1}, "max_pixels must be a positive int"),
    ],
)
def test_processor_validates_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConvLlavaImageProcessor(**kwargs)
