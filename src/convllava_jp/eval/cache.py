"""What a cached prediction depends on: model fingerprints, prompt keys, package versions.

A saved prediction is reused only while the model files (`model_fingerprint`), the template and
decoding settings (together the run key) and the prompt text and image bytes (`prompt_key`) it
was made with are unchanged; the package versions go into every summary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .tasks import Sample

# Packages whose version can move a score: the scorers and the tokenizers/normalizers they use.
SCORING_PACKAGES = (
    "rouge-score",
    "fugashi",
    "unidic-lite",
    "neologdn",
    "emoji",
    "sacrebleu",
    "mecab-python3",
    "ipadic",
)
# Packages whose version can move a number: the model code, generation, tokenizers and scorers.
PACKAGES = ("convllava-jp", "torch", "transformers", "tokenizers", "datasets", *SCORING_PACKAGES)
_CHUNK = 8 << 20


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (key order does not matter)."""
    return hashlib.sha256(
        json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A content fingerprint of a model dir: every file's name and bytes (sha256).

    Checkpoint sub-dirs and logs are left out. A retrained, converted or merged model changes it;
    copying the dir does not. Hashing reads the weights once (seconds for a 2B model), and the
    result is remembered for unchanged files (same size and mtime) within the process.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"model dir {root} does not exist")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0].startswith(("checkpoint-", "runs", ".")):
            continue
        stat = path.stat()
        files.append((rel, stat.st_size, stat.st_mtime_ns))
    return _fingerprint(str(root.resolve()), tuple(files))


@functools.lru_cache(maxsize=32)
def _fingerprint(root: str, files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, size, _ in files:
        h.update(f"{rel}\0{size}\0".encode())
        with open(os.path.join(root, rel), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where a package is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if out.get("convllava-jp", "") is None:  # run from a source tree (PYTHONPATH=src), not installed
        from .. import __version__

        out["convllava-jp"] = f"{__version__} (source)"
    return out


def _imagedigest(image: Any) -> str:
    if isinstance(image, bytes):
        data = image
    elif isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError:
            data = str(image).encode()  # a missing file fails at generation, with its name
    elif hasattr(image, "tobytes"):
        data = image.tobytes()
    else:
        data = repr(image).encode()
    return hashlib.sha1(data).hexdigest()


def prompt_key(sample: Sample) -> str:
    """Identifies what the model is shown for a sample: the prompt text and the image bytes."""
    return digest(sample.prompt, [_imagedigest(im) for im in sample.images])


def run_key(model_fingerprint: str | None, template: str, generation: Any) -> str:
    """Identifies how predictions are made: the model files, the template and the decoding settings."""
    return digest(model_fingerprint, template, generation)
