"""Which image formats are decoded, and naming the ones that are not.

`load_image` hands `Image.open` only the plugins of `SAFE_IMAGE_FORMATS`; for anything else the
error names the format, found from the first bytes by each Pillow plugin's signature check (which
compares magic bytes and parses nothing).
"""

from __future__ import annotations

import os
from typing import IO

from PIL import Image

# The only formats `load_image` decodes. `Image.open` alone tries every Pillow plugin, and some run
# external programs or large parsers on untrusted bytes (EPS's `load()` runs Ghostscript, with no
# timeout). Each entry is a deliberate choice:
SAFE_IMAGE_FORMATS: tuple[str, ...] = (
    "PNG",  # lossless screenshots and documents; the demo's format (APNG: first frame only)
    "JPEG",  # photos
    "MPO",  # phone-camera JPEGs with extra frames: Pillow's JPEG plugin returns this; first frame only
    "WEBP",  # common on the web (libwebp); animated WebP: first frame only
    "GIF",  # common on the web; first frame only
    "BMP",  # simple uncompressed / RLE raster, small header parser
)
# The plugins `Image.open` may try (MPO has none of its own: the JPEG plugin returns it).
OPENERS: tuple[str, ...] = tuple(f for f in SAFE_IMAGE_FORMATS if f != "MPO")
# Left out on purpose: TIFF (libtiff's many codecs and multi-page layouts are a large attack surface
# for a rare VLM input; scans convert to PNG losslessly), EPS/PS and PDF (Ghostscript), PSD, ICO/ICNS,
# JPEG 2000, TGA, PPM, FITS and the other plugins (rare as inputs; each is one more parser exposed).


def refused_format_message(label: str, image_format: str) -> str:
    return (
        f"{label}: {image_format} is not an accepted image format; accepted formats are "
        f"{', '.join(SAFE_IMAGE_FORMATS)} (convert the image to PNG or JPEG)"
    )


def unidentified_message(label: str, fp: str | os.PathLike | IO[bytes]) -> str:
    """Why no safe plugin opened the data: a refused format (named), a corrupt header, or not an image."""
    image_format = _sniff_format(fp)
    if image_format is None:
        return (
            f"{label}: not an image, or in a format that is not accepted "
            f"(accepted: {', '.join(SAFE_IMAGE_FORMATS)})"
        )
    if image_format in SAFE_IMAGE_FORMATS:
        return f"{label}: not an image: looks like {image_format} but its header cannot be read"
    return refused_format_message(label, image_format)


# Signatures of common non-raster or non-Pillow formats, to name them in the error message.
_OTHER_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "XML/SVG"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
)


def _sniff_format(fp: str | os.PathLike | IO[bytes]) -> str | None:
    """The format the first bytes announce, by Pillow's plugins' signature checks; nothing is parsed.

    Each plugin's ``accept`` function only compares the prefix with its magic bytes, so this is
    safe for any input, including the formats that are never decoded.
    """
    try:
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "rb") as file:
                prefix = file.read(32)
        else:
            fp.seek(0)  # where Pillow reads the image from too
            prefix = fp.read(32)
    except (OSError, ValueError, AttributeError):
        return None
    for offset, magic, name in _OTHER_SIGNATURES:
        if prefix[offset : offset + len(magic)] == magic:
            return name
    Image.init()
    for image_format in Image.ID:
        accept = Image.OPEN[image_format][1]
        try:
            if accept is not None and accept(prefix[:16]):
                return image_format
        except Exception:  # a plugin's check on a short prefix: not this format
            continue
    return None
