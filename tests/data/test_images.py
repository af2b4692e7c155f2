"""Image loading, preprocessing and the image processor (generated images only; no network)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

import convllava_jp.data.images as images_module
from convllava_jp.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    SAFE_IMAGE_FORMATS,
    image_token_count,
    load_image,
    preprocess,
    preprocessed_size,
)
from convllava_jp.errors import ConfigError, ImageError

ONE_GREY_LEVEL = 1 / 255 / min(CLIP_STD)  # one 8-bit step after normalisation


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_rgb(width: int, height: int) -> Image.Image:
    """A gradient with structure, so resampling mistakes show up (unlike uniform noise)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is 10 bytes: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------------
# crop = open_clip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width,height", [(640, 480), (480, 640), (333, 517), (321, 320), (1000, 37), (50, 51)]
)
def test_crop_equals_open_clip_eval_transform(width: int, height: int) -> None:
    image = random_rgb(width, height, seed=width)
    reference = image_transform(320, is_train=False)(image)  # CLIP-convnext_large_d_320's eval transform
    ours = preprocess(image, 320)
    assert ours.shape == (3, 320, 320) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("size", [(256, 384), (384, 256)])
def test_crop_non_square_target_equals_open_clip(size: tuple[int, int]) -> None:
    for width, height in [(640, 480), (333, 517), (320, 320)]:
        image = random_rgb(width, height, seed=height)
        reference = image_transform(size, is_train=False)(image)
        ours = preprocess(image, size)
        assert ours.shape == (3, *size)
        assert torch.equal(ours, reference)


def test_crop_region_path_matches_open_clip_within_one_grey_level(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the path used for very long images (resample only the kept region) on normal ones.
    monkeypatch.setattr(images_module, "_RESIZE_LIMIT", 0)
    # 641x480 -> 427x320 (and 480x641): odd excesses, so the crop offsets' rounding matters.
    for (width, height), size in [((641, 480), 320), ((480, 641), 320), ((1000, 37), (256, 384))]:
        image = random_rgb(width, height, seed=width)
        reference = image_transform(size, is_train=False)(image)
        diff = (preprocess(image, size) - reference).abs().max().item()
        assert diff <= 1.01 * ONE_GREY_LEVEL, (width, height, size, diff)


def test_crop_of_a_very_long_thin_image_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.new("RGB", (2, 100_000), (200, 10, 30))  # a full resize would be 1536 x 76.8M pixels
    made: list[tuple[int, int]] = []  # the size of every image a resize produces (counts, not time)
    real_resize = Image.Image.resize

    def counting_resize(
        self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object
    ) -> Image.Image:
        made.append(tuple(size))
        assert size[0] * size[1] <= 1536 * 1536, f"a {size} resize: the whole image was resampled"
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting_resize)
    pixels = preprocess(image, 1536)
    assert made
    assert pixels.shape == (3, 1536, 1536)
    expected = (torch.tensor([200, 10, 30]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 768, 768], expected, atol=ONE_GREY_LEVEL)


# --------------------------------------------------------------------------------------------------
# pad = LLaVA expand2square
# --------------------------------------------------------------------------------------------------


# `pad` of `smooth_rgb(w, h)` to 8x8 as uint8 RGB (row-major H, W, C) in hex. Computed once with
# LLaVA's `expand2square` (llava/mm_utils.py, fill = int(255 * CLIP_MEAN) = (122, 116, 104)) followed
# by open_clip's `image_transform(8, is_train=False)`, un-normalised back to 8 bits.
PAD_GOLDEN = {
    (48, 24): "7c76697b76697b76697a76697a76697976697976697876697269607469607769617969617c69627e696281696383"
    "696317240d33241251241870241d8d2423ac2428ca242fe724330d5c0a2c5c0f4d5c156f5c1b8f5c21b15c28d25c2ff25c"
    "340da2112ca2164da21c6fa2228fa228b1a22ed2a235f2a23a17d81e33d82251d82870d82d8dd833acd838cad83fe7d843"
    "7280627480627780637980637c80647e80648180658380657c72697b72697b72697a72697a7269797269797269787269",
    (19, 40): "7c75696f6c6025160c610d08ae0b0cd124257b75697a74687c75696f6f60253211612b0dae2b11d13c297b74697a"
    "74687c75696f7161255115614e12ae4d16d1562d7b74697a74687c74696f7461256f1a616f17ae6f1bd170317b74697a74"
    "687c74696f7662258d1e618f1cae9020d189357b74697a74687c73696f796225ab2361b121aeb225d1a3397b74687a7468"
    "7c73696f7b6225ca2861d226aed42bd1bd3d7b73687a74687c72696f7e6325e72c61f22baef330d1d6407b73687a7468",
}


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor back to (H, W, 3) uint8 (exact: the resize works in 8 bits)."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((pixels * std + mean) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


@pytest.mark.parametrize("size", sorted(PAD_GOLDEN))
def test_pad_equals_llava_expand2square_then_resize(size: tuple[int, int]) -> None:
    ours = as_uint8(preprocess(smooth_rgb(*size), 8, mode="pad"))
    assert ours.tobytes().hex() == PAD_GOLDEN[size]


@pytest.mark.parametrize(
    "size,rows,cols",
    [((5, 2), (1, 3), (0, 5)), ((4, 2), (1, 3), (0, 4)), ((2, 5), (0, 5), (1, 3)), ((3, 3), (0, 3), (0, 3))],
)
def test_pad_canvas_places_the_image_like_expand2square(
    size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    # With the target the canvas size, the resize is the identity and the canvas shows: the image at
    # offset (long - short) // 2 (LLaVA: the odd extra row / column goes below / right), the rest
    # LLaVA's fill (122, 116, 104).
    width, height = size
    side = max(size)
    image = random_rgb(width, height, seed=7)
    canvas = as_uint8(preprocess(image, side, mode="pad"))
    expected = np.empty((side, side, 3), dtype=np.uint8)
    expected[...] = (122, 116, 104)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = np.asarray(image)
    assert np.array_equal(canvas, expected)


def test_pad_centers_content_and_fills_with_the_mean_colour() -> None:
    image = Image.new("RGB", (400, 200), (255, 0, 0))  # wide: bands above and below
    pixels = preprocess(image, 320, mode="pad")
    assert pixels.shape == (3, 320, 320)
    # Band rows 0..79 and 240..319 hold the mean colour, which normalises to ~0 in every channel.
    for row in (0, 40, 75, 245, 319):
        assert pixels[:, row, :].abs().max().item() < 0.02, row
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 160, 160], red, atol=ONE_GREY_LEVEL)
    assert torch.allclose(pixels[:, 85, 5], red, atol=ONE_GREY_LEVEL)  # left edge: no side padding

    tall = preprocess(Image.new("RGB", (100, 300), (0, 0, 255)), 300, mode="pad")
    assert tall[:, 150, :90].abs().max().item() < 0.02 and tall[:, 150, 210:].abs().max().item() < 0.02
    assert tall[2, 150, 150].item() > 1.5  # blue in the middle


def test_pad_non_square_target_pads_to_its_aspect_ratio() -> None:
    pixels = preprocess(Image.new("RGB", (300, 300), (255, 255, 255)), (256, 512), mode="pad")
    assert pixels.shape == (3, 256, 512)
    assert pixels[:, 128, :120].abs().max().item() < 0.02  # mean-colour side bands
    assert pixels[:, 128, 256].min().item() > 1.5  # white centre


def test_pad_of_a_very_long_image_stays_centered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "_PAD_CANVAS_LIMIT", 0)  # the small-canvas path
    pixels = preprocess(Image.new("RGB", (2000, 500), (255, 0, 0)), 256, mode="pad")
    assert pixels.shape == (3, 256, 256)
    assert pixels[:, :90, :].abs().max().item() < 0.02 and pixels[:, 170:, :].abs().max().item() < 0.02
    assert pixels[0, 128, 128].item() > 1.5


# --------------------------------------------------------------------------------------------------
# keep-aspect, sizes and token counts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width,height,expected_hw",
    [
        ((1280, 960, (576, 768))),
        ((960, 1280, (768, 576))),
        ((500, 300, (448, 768))),  # 300 * 768/500 = 460.8 -> 448
        ((300, 500, (768, 448))),
        ((768, 768, (768, 768))),
        ((4000, 10, (64, 768))),  # at least one stride
        ((100, 90, (704, 768))),  # small images are scaled up
    ],
)
def test_keep_aspect_sizes(width: int, height: int, expected_hw: tuple[int, int]) -> None:
    assert preprocessed_size(height, width, 768, "keep-aspect") == expected_hw
    pixels = preprocess(smooth_rgb(width, height), 768, mode="keep-aspect")
    assert tuple(pixels.shape) == (3, *expected_hw)
    assert pixels.shape[1] % 64 == 0 and pixels.shape[2] % 64 == 0
    assert max(pixels.shape[1:]) == 768


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 12, 40, 144])
@pytest.mark.parametrize(
    "height,width", [(300, 4000), (4000, 300), (10, 4000), (4000, 10), (768, 768), (500, 300)]
)
def test_keep_aspect_token_budget_holds_for_any_aspect(height: int, width: int, max_tokens: int) -> None:
    # Very long images once asked for 0 rows (or divided by 0 columns) under a small budget.
    h, w = preprocessed_size(height, width, 768, "keep-aspect", max_tokens=max_tokens)
    assert h >= 64 and w >= 64 and h % 64 == 0 and w % 64 == 0
    assert (h // 64) * (w // 64) <= max_tokens
    if max_tokens >= 12 and max(height, width) / min(height, width) < 2:
        assert (h // 64) * (w // 64) >= max_tokens // 2  # the budget is used, not wasted


def test_keep_aspect_needs_a_multiple_of_the_stride() -> None:
    image = random_rgb(64, 64)
    with pytest.raises(ConfigError, match="multiple of the stride 64"):
        preprocess(image, 100, mode="keep-aspect")
    with pytest.raises(ConfigError, match="one int size"):
        preprocess(image, (256, 512), mode="keep-aspect")
    assert preprocess(image, 96, mode="keep-aspect", stride=32).shape == (3, 96, 96)


def test_unknown_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="crop, pad, keep-aspect"):
        preprocess(random_rgb(8, 8), 64, mode="squash")


@pytest.mark.parametrize("size", [0, -3, (256,), (256, 0), "768", True])
def test_bad_sizes_are_config_errors(size: object) -> None:
    with pytest.raises(ConfigError, match="image size"):
        preprocess(random_rgb(8, 8), size)  # type: ignore[arg-type]


def test_image_token_count() -> None:
    assert [image_token_count(s, s) for s in (768, 1024, 1280, 1536)] == [144, 256, 400, 576]
    assert image_token_count(768, 768, stride=32) == 576
    assert image_token_count(576, 768) == 108
    with pytest.raises(ConfigError, match="not a positive multiple of the stride 64"):
        image_token_count(770, 768)
    with pytest.raises(ConfigError, match="width"):
        image_token_count(768, 0)


def test_preprocess_normalises_with_clip_mean_and_std() -> None:
    pixels = preprocess(Image.new("RGB", (64, 64), (0, 128, 255)), 64)
    expected = (torch.tensor([0, 128, 255]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 10, 10], expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------


def test_load_from_path_bytes_file_object_and_pil(tmp_path: Path) -> None:
    image = random_rgb(40, 30)
    path = tmp_path / "cat.png"
    path.write_bytes(encode(image, "PNG"))
    for source in (path, str(path), path.read_bytes(), image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (40, 30)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))
    with path.open("rb") as handle:
        assert load_image(handle).size == (40, 30)
        assert not handle.closed  # the caller's file stays the caller's


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "I", "F"])
def test_other_modes_convert_to_rgb(mode: str) -> None:
    image = random_rgb(20, 10).convert(mode) if mode not in ("I;16", "I", "F") else None
    if image is None:
        image = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.uint16)).convert(mode)
    # CMYK as JPEG; 32-bit integer / float images have no accepted format: in memory (as a loader gives them)
    source = image if mode in ("I", "F") else encode(image, "JPEG" if mode == "CMYK" else "PNG")
    loaded = load_image(source)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_rgba_is_converted_like_llava_dropping_alpha() -> None:
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert load_image(encode(image, "PNG")).getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.array([[0, 32896, 65535]], dtype=np.uint16)  # black, mid grey, white
    loaded = load_image(encode(Image.fromarray(ramp), "PNG"))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_converts_without_warnings() -> None:
    image = random_rgb(16, 16).convert("P")
    image.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(encode(image, "PNG", transparency=0)).mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = load_image(encode(image, "JPEG", exif=exif, quality=95))
    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 2))[2] > 200  # the blue strip is now at the top


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing_photo.jpg: no such image file"):
        load_image(tmp_path / "missing_photo.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_text_renamed_to_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are my holiday notes, not a photo\n", encoding="utf-8")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        load_image(path)
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        load_image(b"plain text")
    with pytest.raises(ImageError, match="upload-7: not an image"):
        load_image(b"plain text", name="upload-7")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_detected(tmp_path: Path, fmt: str) -> None:
    data = encode(random_rgb(300, 200), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}: truncated or corrupt"):
        load_image(path)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(Image.open(path))  # a lazily opened PIL image is decoded in full too


def test_header_bigger_than_max_pixels_is_refused_before_decoding() -> None:
    # The pixel data is 10 bytes: had it been decoded, the error would say "truncated".
    with pytest.raises(ImageError, match=r"bomb.png: 300x200 = 60,000 pixels is more than max_pixels=50,000"):
        load_image(png_header_only(300, 200), max_pixels=50_000, name="bomb.png")
    with pytest.raises(ImageError, match="truncated"):
        load_image(png_header_only(300, 200), name="bomb.png")


def test_real_image_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(encode(random_rgb(100, 100), "PNG"))
    with pytest.raises(ImageError, match="small.png: 100x100 = 10,000 pixels is more than max_pixels=5,000"):
        load_image(small, max_pixels=5_000)

    big = tmp_path / "blank_scan.png"  # 64 MP in mode "1": 8 MB in memory, a few KB on disk
    big.write_bytes(encode(Image.new("1", (8000, 8000)), "PNG"))
    with pytest.raises(ImageError, match="blank_scan.png: 8000x8000 = 64,000,000 pixels"):
        load_image(big)  # default max_pixels = 50 MP


@pytest.mark.parametrize("side", [10_000, 100_000])  # over PIL's warning (89 MP) and error (179 MP) limits
def test_decompression_bombs_become_image_errors(side: int) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError, match="huge.png: refused as a possible decompression bomb"):
        load_image(png_header_only(side, side), name="huge.png", max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's global setting is left alone
    assert warnings.filters == filters_before


def test_bad_source_type_and_bad_max_pixels() -> None:
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_pixels"):
        load_image(b"", max_pixels=0)


# --------------------------------------------------------------------------------------------------
# Only the accepted formats are ever decoded
# --------------------------------------------------------------------------------------------------

# A real EPS with a small BoundingBox: 8x8 pixels passes any pixel limit, and Pillow's `load()` of it
# would run Ghostscript on the PostScript program (here one line; could be an endless loop).
EPS_BYTES = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
    b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
)
# A real 3x2 RGB Photoshop file (header, empty sections, raw planes): Pillow's PSD plugin reads it.
PSD_BYTES = (
    b"8BPS\x00\x01"
    + b"\0" * 6
    + b"\x00\x03"
    + (2).to_bytes(4, "big")
    + (3).to_bytes(4, "big")
    + b"\x00\x08\x00\x03"
    + b"\0" * 12
    + b"\x00\x00"
    + bytes(range(18))
)


def refused_samples() -> dict[str, bytes]:
    small = random_rgb(6, 4)
    return {
        "EPS": EPS_BYTES,
        "PSD": PSD_BYTES,
        "TIFF": encode(small, "TIFF"),
        "ICO": encode(small, "ICO"),
        "PPM": encode(small, "PPM"),
        "JPEG2000": encode(small, "JPEG2000"),
        "PDF": encode(small, "PDF"),
        "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
    }


@pytest.fixture
def only_safe_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every plugin outside SAFE_IMAGE_FORMATS fail the test if it is asked to open anything."""
    Image.init()
    tried: list[str] = []
    for image_format, (_factory, accept) in list(Image.OPEN.items()):
        if image_format in SAFE_IMAGE_FORMATS:
            continue

        def refusing_factory(*args: object, _format: str = image_format, **kwargs: object) -> None:
            tried.append(_format)
            raise AssertionError(f"the {_format} plugin was asked to open an image")

        monkeypatch.setitem(Image.OPEN, image_format, (refusing_factory, accept))
    return tried


def test_the_accepted_formats_decode() -> None:
    image = random_rgb(6, 4)
    for fmt, kwargs in [("PNG", {}), ("BMP", {}), ("GIF", {}), ("WEBP", {"lossless": True})]:
        assert np.array_equal(np.asarray(load_image(encode(image, fmt, **kwargs))), np.asarray(image)), fmt
    for fmt in ("JPEG", "MPO"):  # MPO: a phone camera's JPEG with extra frames
        assert load_image(encode(image, fmt)).size == (6, 4)


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(buffer.getvalue()).getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize("image_format", list(refused_samples()))
def test_other_formats_are_refused_by_name_without_their_plugin(
    image_format: str, only_safe_plugins: list[str], tmp_path: Path
) -> None:
    data = refused_samples()[image_format]
    path = tmp_path / "upload.png"  # the name says PNG; the bytes decide
    path.write_bytes(data)
    for source, label in [(data, "<bytes>"), (path, str(path)), (io.BytesIO(data), "<BytesIO>")]:
        with pytest.raises(ImageError) as caught:
            load_image(source)
        message = str(caught.value)
        assert message.startswith(f"{label}: {image_format} is not an accepted image format"), message
        assert "PNG, JPEG" in message
    assert only_safe_plugins == []


def test_an_opened_pil_image_of_another_format_is_refused_before_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import EpsImagePlugin

    decoded: list[str] = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", lambda self, *a, **k: decoded.append("EPS"))
    opened = Image.open(io.BytesIO(EPS_BYTES))  # as a custom dataset or datasets' decoder would
    with pytest.raises(ImageError, match="<PIL image>: EPS is not an accepted image format"):
        load_image(opened)
    assert decoded == []
    in_memory = Image.new("RGB", (3, 3), (1, 2, 3))  # built in memory: no format, nothing to decode
    assert load_image(in_memory).getpixel((0, 0)) == (1, 2, 3)


def test_a_corrupt_header_of_an_accepted_format_says_so() -> None:
    with pytest.raises(
        ImageError, match="<bytes>: not an image: looks like PNG but its header cannot be read"
    ):
        load_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
