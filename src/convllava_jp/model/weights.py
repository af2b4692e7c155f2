"""Weight import: pretrained ConvNeXt trunks, the stage-1 starting model, LLaVA-JP checkpoints.

Everything here turns someone else's checkpoint into our model's keys:

- `timm_convnext_to_hf` / `hf_convnext_to_timm`: the key mapping between a timm ConvNeXt trunk
  (what open_clip's `visual.trunk` is) and transformers' `ConvNextModel` (our `vision_tower`).
- `load_vision_trunk`: timm-keyed trunk weights from an open_clip `hf-hub:` id, a local open_clip
  directory, a local timm/open_clip checkpoint file or a timm model name.
- `load_trunk_into`: those weights into the vision tower's pretrained stages (stage 5 stays fresh).
- `init_model`: the starting model of stage 1 (pretrained LLM + pretrained trunk + fresh stage 5
  and projector), written with its processor as a model directory.
- `convert_llava_jp`: a checkpoint of the reference LLaVA-JP code (github tosiyuki/LLaVA-JP,
  GPT-2 LLM + ConvNeXt with the added fifth stage) as a model directory of ours.
- `save_model_dir` / `load_model_dir`: the model directory (model + processor) everyone else uses.

Pickles are never loaded unless the caller says so (`allow_pickle`), and then only with
`torch.load(weights_only=True)`. Every key mismatch is an error that lists the keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..data.templates import IMAGE_TOKEN
from ..errors import CheckpointError, ConfigError
from .configuration import ConvLlavaConfig
from .modeling import ConvLlavaForConditionalGeneration
from .presets import ModelPreset, build_config, build_vision_config, get_preset

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLE = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

VISION_SPEC_HELP = (
    "an open_clip hub id (hf-hub:org/name), a local open_clip directory (open_clip_model.safetensors "
    "+ open_clip_config.json), a local timm/open_clip checkpoint file (.safetensors; .pth/.pt/.bin "
    "only with allow_pickle), or a timm model name (e.g. convnext_large)"
)

# timm ConvNeXt trunk <-> transformers ConvNextModel. `{i}` is the stage, `{j}` the block.
# The reference LLaVA-JP code names the block's layer scale `weight` instead of timm's `gamma`
# (transformers<5 renamed `gamma` keys to `weight` on load), so both spellings are read.
_KEY_PAIRS = [  # (timm name, ConvNextModel name)
    ("stem.0.{wb}", "embeddings.patch_embeddings.{wb}"),
    ("stem.1.{wb}", "embeddings.layernorm.{wb}"),
    ("stages.{i}.downsample.{k}.{wb}", "encoder.stages.{i}.downsampling_layer.{k}.{wb}"),
    ("stages.{i}.blocks.{j}.{gamma}", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
    ("stages.{i}.blocks.{j}.conv_dw.{wb}", "encoder.stages.{i}.layers.{j}.dwconv.{wb}"),
    ("stages.{i}.blocks.{j}.norm.{wb}", "encoder.stages.{i}.layers.{j}.layernorm.{wb}"),
    ("stages.{i}.blocks.{j}.mlp.fc1.{wb}", "encoder.stages.{i}.layers.{j}.pwconv1.{wb}"),
    ("stages.{i}.blocks.{j}.mlp.fc2.{wb}", "encoder.stages.{i}.layers.{j}.pwconv2.{wb}"),
]
_FIELDS = {"i": r"\d+", "j": r"\d+", "k": "[01]", "wb": "weight|bias", "gamma": "gamma|weight"}


def _key_table(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    """(source template, target template) -> (regex over source keys, `match.expand` template).

    `{gamma}` matches both layer-scale spellings and is always written as timm's `gamma`.
    """
    table = []
    for source, target in pairs:
        pattern = re.escape(source)
        for name, regex in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{regex})")
        template = target.replace("{gamma}", "gamma")
        for name in _FIELDS:
            template = template.replace("{" + name + "}", rf"\g<{name}>")
        table.append((re.compile(pattern), template))
    return table


_TIMM_TO_HF = _key_table(_KEY_PAIRS)
_HF_TO_TIMM = _key_table([(hf, timm) for timm, hf in _KEY_PAIRS])
# Parts of a timm ConvNeXt that are not the trunk: the classifier head and the (usually identity)
# norm before it. The vision tower ends at the last stage's feature map.
_TIMM_NON_TRUNK = ("head.", "norm_pre.")
_STAGE_RE = re.compile(r"encoder\.stages\.(\d+)\.")


# --------------------------------------------------------------------------------------------------
# Errors that list keys
# --------------------------------------------------------------------------------------------------


def _key_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


def _check_keys(
    where: str,
    expected: Mapping[str, torch.Size],
    given: Mapping[str, torch.Tensor],
    optional: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Raise CheckpointError listing missing / unexpected / shape-mismatched keys, if any."""
    optional = set(optional)
    missing = set(expected) - set(given) - optional
    unexpected = set(given) - set(expected)
    mismatched = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k])})"
        for k in sorted(set(given) & set(expected))
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{where}: the checkpoint does not fit the model."]
    if hint:
        lines.append(hint)
    if missing:
        lines.append(f"missing {_key_list(missing)}")
    if unexpected:
        lines.append(f"unexpected {_key_list(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatch in {_key_list(mismatched)}")
    raise CheckpointError("\n  ".join(lines))


# --------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------


def _map_keys(
    state_dict: Mapping[str, torch.Tensor], table: list[tuple[re.Pattern[str], str]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for pattern, template in table:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(template)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def timm_convnext_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm ConvNeXt keys -> transformers `ConvNextModel` keys (prefixed with `prefix`).

    Maps the trunk (`stem.*`, `stages.{i}.*`, any number of stages); `head.*` and `norm_pre.*`
    are dropped. 1x1-conv MLP weights (timm's `conv_mlp=True`, shape (out, in, 1, 1)) become the
    Linear weights (out, in) `ConvNextModel` uses. Tensors are not copied.

    Raises:
        CheckpointError: keys that are neither trunk nor head (listed), e.g. ConvNeXt-V2's GRN.
    """
    trunk = {k: v for k, v in state_dict.items() if not k.startswith(_TIMM_NON_TRUNK)}
    mapped, unknown = _map_keys(trunk, _TIMM_TO_HF)
    if unknown:
        raise CheckpointError(f"not keys of a timm ConvNeXt trunk (stem.*, stages.*): {_key_list(unknown)}")
    out = {}
    for key, value in mapped.items():
        if key.endswith(("pwconv1.weight", "pwconv2.weight")) and value.ndim == 4:
            value = value.flatten(1)
        out[prefix + key] = value
    return out


def hf_convnext_to_timm(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers `ConvNextModel` keys -> timm ConvNeXt trunk keys (the inverse mapping).

    Only keys starting with `prefix` are read (e.g. `vision_tower.` on our full model's state
    dict); the pooled-output `layernorm.*` is dropped. MLP weights stay Linear-shaped, as in timm's
    default `conv_mlp=False`.

    Raises:
        CheckpointError: keys under `prefix` that are not ConvNeXt keys (listed).
    """
    inner = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("layernorm.")
    }
    mapped, unknown = _map_keys(inner, _HF_TO_TIMM)
    if unknown:
        raise CheckpointError(f"not keys of a transformers ConvNextModel: {_key_list(unknown)}")
    return mapped


def convnext_arch(timm_state_dict: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(depths, widths) per stage of a timm-keyed ConvNeXt trunk, read from its keys and shapes."""
    blocks: dict[int, set[int]] = {}
    for key in timm_state_dict:
        match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"ConvNeXt stages are not numbered 0..n-1: found stages {stages}")
    depths, widths = [], []
    for i in stages:
        if blocks[i] != set(range(len(blocks[i]))):
            raise CheckpointError(f"ConvNeXt stage {i} has gaps in its block numbers: {sorted(blocks[i])}")
        depths.append(len(blocks[i]))
        dw = timm_state_dict.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if dw is None:
            raise CheckpointError(f"ConvNeXt stage {i}: no stages.{i}.blocks.0.conv_dw.weight")
        widths.append(int(dw.shape[0]))
    return depths, widths


# --------------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------------


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint; pickles can run code when loaded, so they are read only "
        "with allow_pickle=True (CLI: --allow-pickle), and then with torch.load(weights_only=True). "
        "Prefer a .safetensors file."
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    # Training checkpoints wrap the weights: {"state_dict": ...}, {"model": ...}.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(obj)


def _read_state_dict(
    path: Path, allow_pickle: bool, select: Callable[[list[str]], list[str]] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file; `select(all_keys) -> keys` limits what is read (safetensors)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                return {k: f.get_tensor(k) for k in (select(keys) if select else keys)}
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _refuse_pickle(path)
        state = _torch_load(path)
        return {k: state[k] for k in select(list(state))} if select else state
    raise CheckpointError(
        f"{path}: unknown checkpoint format; use .safetensors (or .pth/.pt/.bin with allow_pickle)"
    )


def _trunk_prefix(keys: list[str], source: object) -> str:
    """The prefix under which a ConvNeXt trunk sits: '', 'module.', 'visual.trunk.', ..."""
    candidates = sorted(
        (k[: -len("stem.0.weight")] for k in keys if k.endswith("stem.0.weight")),
        key=len,
    )
    candidates = [c for c in candidates if c == "" or c.endswith(".")]
    if not candidates:
        raise CheckpointError(
            f"{source}: no ConvNeXt trunk found (no key ending in stem.0.weight); first keys: "
            f"{', '.join(sorted(keys)[:10]) or '(none)'}"
        )
    if len(candidates) > 1:
        logger.warning("%s: several ConvNeXt trunks (%s); using %r", source, candidates, candidates[0])
    return candidates[0]


def _select_trunk(keys: list[str], source: object) -> tuple[str, list[str]]:
    """(prefix, keys of the trunk under it); the head under that prefix is left out."""
    prefix = _trunk_prefix(keys, source)
    selected, dropped = [], []
    for k in keys:
        if not k.startswith(prefix):
            continue
        (dropped if k[len(prefix) :].startswith(_TIMM_NON_TRUNK) else selected).append(k)
    if any(k[len(prefix) :].startswith("norm_pre.") for k in dropped):
        logger.warning(
            "%s: dropping norm_pre (a norm after the last stage; the vision tower has none)", source
        )
    logger.debug(
        "%s: trunk under prefix %r, %d tensors (%d head tensors dropped)",
        source,
        prefix,
        len(selected),
        len(dropped),
    )
    return prefix, selected


def _trunk_from_state_dict(state: Mapping[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    prefix, keys = _select_trunk(list(state), source)
    return {k[len(prefix) :]: state[k] for k in keys}


def _trunk_from_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    chosen: dict[str, str] = {}

    def select(keys: list[str]) -> list[str]:
        chosen["prefix"], selected = _select_trunk(keys, path)
        return selected

    # Only the trunk's tensors are read (an open_clip file also holds the text tower).
    state = _read_state_dict(path, allow_pickle, select=select)
    return {k[len(chosen["prefix"]) :]: v for k, v in state.items()}


def _check_open_clip_config(config_path: Path, source: object) -> None:
    """An open_clip model whose vision tower is not a timm ConvNeXt is refused early."""
    if not config_path.is_file():
        return
    try:
        cfg = json.loads(config_path.read_text())
        vision_cfg = cfg.get("model_cfg", cfg)["vision_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: not an open_clip config (model_cfg.vision_cfg): {e}") from e
    name = vision_cfg.get("timm_model_name")
    if not name or "convnext" not in name:
        raise CheckpointError(
            f"{source}: its vision tower is {name or 'not a timm model (an open_clip ViT?)'}, "
            "not a timm ConvNeXt; ConvLLaVA needs a ConvNeXt trunk"
        )


def _open_clip_dir(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    _check_open_clip_config(directory / OPEN_CLIP_CONFIG, directory)
    for name in (OPEN_CLIP_SAFETENSORS, "model.safetensors"):
        if (directory / name).is_file():
            return _trunk_from_file(directory / name, allow_pickle)
    for name in (OPEN_CLIP_PICKLE, "open_clip_pytorch_model.pth", "pytorch_model.bin"):
        if (directory / name).is_file():
            if not allow_pickle:
                raise _refuse_pickle(directory / name)
            return _trunk_from_file(directory / name, allow_pickle)
    raise CheckpointError(
        f"{directory}: no {OPEN_CLIP_SAFETENSORS} (or model.safetensors, or with allow_pickle "
        f"{OPEN_CLIP_PICKLE}) in this directory"
    )


def _hub_entry_missing(error: Exception) -> bool:
    """True when the hub answered that the file is not in the repo (not: no network)."""
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", None)
    if remote is not None:
        return isinstance(error, remote)
    return isinstance(error, errors.EntryNotFoundError) and not isinstance(
        error, errors.LocalEntryNotFoundError
    )


def _open_clip_hub(spec: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    repo_id = spec[len(HF_HUB_PREFIX) :].strip("/")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{spec!r}: expected hf-hub:org/name")
    try:
        path = hf_hub_download(repo_id, OPEN_CLIP_SAFETENSORS)
    except Exception as e:
        if not _hub_entry_missing(e):
            raise CheckpointError(f"{spec}: cannot download {OPEN_CLIP_SAFETENSORS} from the hub: {e}") from e
        if not allow_pickle:
            raise CheckpointError(
                f"{spec}: the repo has no {OPEN_CLIP_SAFETENSORS} (older open_clip repos hold only the "
                f"pickle {OPEN_CLIP_PICKLE}); pass allow_pickle=True (CLI: --allow-pickle) to load that "
                "with torch.load(weights_only=True)"
            ) from e
        try:
            path = hf_hub_download(repo_id, OPEN_CLIP_PICKLE)
        except Exception as e2:
            raise CheckpointError(f"{spec}: cannot download {OPEN_CLIP_PICKLE} from the hub: {e2}") from e2
    # The config only names the vision tower (a clearer error than missing keys); weights first,
    # so that without network there is one failed download, not two.
    try:
        config_path = hf_hub_download(repo_id, OPEN_CLIP_CONFIG)
    except Exception as e:
        logger.debug("%s: no %s (%s)", spec, OPEN_CLIP_CONFIG, e)
    else:
        _check_open_clip_config(Path(config_path), spec)
    return _trunk_from_file(Path(path), allow_pickle)


def _timm_model(name: str) -> dict[str, torch.Tensor]:
    try:
        import timm
    except ImportError as e:
        raise CheckpointError(
            f"{name!r} is not a file, a directory or an hf-hub: id, and timm is not installed to load it "
            "as a timm model name (pip install 'convllava-jp[vision]')"
        ) from e
    if not timm.is_model(name):
        raise CheckpointError(
            f"unknown vision checkpoint {name!r}: not a file, directory or timm model; give {VISION_SPEC_HELP}"
        )
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise CheckpointError(f"timm could not load pretrained {name!r} (network or hub error?): {e}") from e
    return _trunk_from_state_dict(model.state_dict(), name)


def load_vision_trunk(spec: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """timm-keyed ConvNeXt trunk weights (`stem.*`, `stages.*`) from any accepted source.

    `spec` is one of: an open_clip hub id `hf-hub:org/name` (`open_clip_model.safetensors`, or
    `open_clip_pytorch_model.bin` with `allow_pickle`); a local directory in that layout; a local
    checkpoint file (timm keys, or open_clip's `visual.trunk.*`, or under `module.` / `model.`;
    `.safetensors`, or a pickle with `allow_pickle`, possibly wrapped in {"state_dict": ...});
    a timm model name (`timm.create_model(name, pretrained=True)`). Head keys are dropped.

    Raises:
        CheckpointError: an unknown spec, an unsafe or unreadable file, no ConvNeXt inside, or a
            download that failed.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.startswith(HF_HUB_PREFIX):
        trunk = _open_clip_hub(text, allow_pickle)
    elif path.is_dir():
        trunk = _open_clip_dir(path, allow_pickle)
    elif path.is_file():
        trunk = _trunk_from_file(path, allow_pickle)
    elif os.sep in text or text.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise CheckpointError(f"{text}: no such file or directory")
    else:
        trunk = _timm_model(text)
    depths, widths = convnext_arch(trunk)
    logger.info("vision trunk from %s: ConvNeXt depths %s widths %s", text, depths, widths)
    return trunk


# --------------------------------------------------------------------------------------------------
# Into our model
# --------------------------------------------------------------------------------------------------


def _trunk_shapes(vision_tower: nn.Module, trunk_stages: int) -> dict[str, torch.Size]:
    shapes = {}
    for key, value in vision_tower.state_dict().items():
        match = _STAGE_RE.match(key)
        if key.startswith("embeddings.") or (match and int(match.group(1)) < trunk_stages):
            shapes[key] = value.shape
    return shapes


def load_trunk_into(
    model: ConvLlavaForConditionalGeneration, timm_state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Copy timm-keyed trunk weights into `model.vision_tower` stages 1..`config.trunk_stages`.

    The added stages (stage 5) and the projector keep their weights. Tensors are cast to the
    model's dtype.

    Raises:
        CheckpointError: missing, unexpected or shape-mismatched keys (listed), e.g. a trunk of
            another ConvNeXt size than the preset's.
    """
    config = model.config
    mapped = timm_convnext_to_hf(timm_state_dict)
    expected = _trunk_shapes(model.vision_tower, config.trunk_stages)
    hint = ""
    try:
        depths, widths = convnext_arch(timm_state_dict)
        vc = config.vision_config
        want = (list(vc.depths[: config.trunk_stages]), list(vc.hidden_sizes[: config.trunk_stages]))
        if (depths, widths) != want:
            hint = f"checkpoint ConvNeXt depths {depths} widths {widths}; model trunk depths {want[0]} widths {want[1]}"
    except CheckpointError:
        pass
    _check_keys("vision trunk", expected, mapped, hint=hint)
    model.vision_tower.load_state_dict(mapped, strict=False)
    logger.info("loaded %d trunk tensors into vision tower stages 1-%d", len(mapped), config.trunk_stages)


# --------------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------------


def _atomic_dir(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh directory beside `output_dir`, then move it into place.

    An existing `output_dir` is replaced only if it is empty or a model directory (has
    config.json), so a mistyped path never deletes unrelated files.
    """
    dst = Path(output_dir)
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst} exists and is not a directory")
        if any(dst.iterdir()) and not (dst / "config.json").is_file():
            raise CheckpointError(
                f"{dst} is not empty and not a model directory (no config.json); refusing to replace it"
            )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    old = dst.parent / f".{dst.name}.old-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException:
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # put the previous model back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst


def save_model_dir(
    model: ConvLlavaForConditionalGeneration, processor, output_dir: str | os.PathLike
) -> Path:
    """Write model (safetensors) + processor into `output_dir` atomically; returns the path.

    The directory appears complete or not at all (written beside it, then renamed). An existing
    model directory there is replaced as a whole.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    dst = _atomic_dir(output_dir, write)
    logger.info("saved model and processor to %s", dst)
    return dst


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def load_processor(model_dir: str | os.PathLike):
    """`ConvLlavaProcessor` of a model directory (tokenizer + image processor)."""
    from ..data.images import ConvLlavaImageProcessor
    from ..data.processor import ConvLlavaProcessor

    # Built from its parts rather than ConvLlavaProcessor.from_pretrained, which would need the
    # image processor registered with transformers' AutoImageProcessor.
    image_processor = ConvLlavaImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ConvLlavaProcessor(image_processor, tokenizer)


def load_model_dir(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[ConvLlavaForConditionalGeneration, object]:
    """(model, processor) of a model directory written by `save_model_dir`.

    `dtype` None keeps the dtype the weights were saved in. The model is returned in eval mode.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    kwargs = {}
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    model = ConvLlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return model, load_processor(path)


# --------------------------------------------------------------------------------------------------
# Stage-1 starting model
# --------------------------------------------------------------------------------------------------


def _prepare_tokenizer(tokenizer, model: ConvLlavaForConditionalGeneration) -> int:
    """Pad token (EOS if none), `<image>` token and chat templates; model resized if needed."""
    from ..data.processor import add_image_token

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    image_token_id = add_image_token(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    needed = max(len(tokenizer), image_token_id + 1)
    if needed > rows:
        # The placeholder is never embedded, but keep every tokenizer id a valid embedding row.
        model.resize_token_embeddings(needed)
        logger.info("resized token embeddings %d -> %d (%s id %d)", rows, needed, IMAGE_TOKEN, image_token_id)
    model.config.image_token_id = image_token_id
    return image_token_id


def _make_processor(tokenizer, image_size: int, mode: str, stride: int):
    from ..data.images import ConvLlavaImageProcessor
    from ..data.processor import ConvLlavaProcessor

    return ConvLlavaProcessor(
        ConvLlavaImageProcessor(image_size=image_size, mode=mode, stride=stride), tokenizer
    )


def init_model(
    preset: str | ModelPreset,
    output_dir: str | os.PathLike,
    llm: str | None = None,
    vision: str | None = None,
    tokenizer: str | None = None,
    allow_pickle: bool = False,
    dtype: str | torch.dtype | None = None,
) -> ConvLlavaForConditionalGeneration:
    """Write the starting model of stage 1 to `output_dir` and return it.

    Args:
        preset: a preset name (`convllava-jp-1.3b-768`, ...) or a `ModelPreset`.
        llm: HF hub id or local directory of the causal LM (`AutoModelForCausalLM`); its config
            replaces the preset's text config. Default: the preset's LLM; a preset without one
            gets a randomly initialised LLM of the preset's size.
        vision: the ConvNeXt trunk, any form `load_vision_trunk` accepts. Default: the preset's;
            a preset without one keeps a fresh trunk.
        tokenizer: hub id or directory of the tokenizer; default the LLM's (required when no LLM).
        allow_pickle: allow pickle checkpoints for the trunk (`torch.load(weights_only=True)`).
        dtype: dtype of the saved weights (default float32).

    Stage 5 and the projector start fresh. `<image>` is added to the tokenizer and
    `config.image_token_id` set to its id; the embeddings grow only if that id has no row.
    """
    p = preset if isinstance(preset, ModelPreset) else get_preset(preset)
    llm = llm if llm is not None else p.llm
    vision = vision if vision is not None else p.vision
    tokenizer_source = tokenizer if tokenizer is not None else llm
    if tokenizer_source is None:
        raise ConfigError(f"preset {p.name!r} names no LLM: give a tokenizer (hub id or directory) or an LLM")
    torch_dtype = _resolve_dtype(dtype)
    tok = AutoTokenizer.from_pretrained(tokenizer_source)

    if llm is not None:
        logger.info("loading LLM %s", llm)
        config = build_config(p, text_config=AutoConfig.from_pretrained(llm))
    else:
        logger.warning("preset %s names no LLM: the language model starts from random weights", p.name)
        # A fresh LLM gets exactly the tokenizer's vocabulary (with <image>).
        config = build_config(p, vocab_size=len(tok) + (IMAGE_TOKEN not in tok.get_vocab()))
    model = ConvLlavaForConditionalGeneration(config)

    if llm is not None:
        source = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
        source_state = source.state_dict()
        expected = {k: v.shape for k, v in model.language_model.state_dict().items()}
        _check_keys(f"LLM {llm}", expected, source_state)
        model.language_model.load_state_dict(source_state)
        if source.generation_config is not None:
            model.generation_config = source.generation_config
        del source, source_state

    if vision is not None:
        load_trunk_into(model, load_vision_trunk(vision, allow_pickle=allow_pickle))
    else:
        logger.warning(
            "preset %s names no vision trunk: the ConvNeXt stages start from random weights", p.name
        )

    _prepare_tokenizer(tok, model)
    if torch_dtype is not None:
        model.to(torch_dtype)
    processor = _make_processor(tok, p.image_size, p.image_mode, config.image_stride)
    save_model_dir(model, processor, output_dir)
    return model


# --------------------------------------------------------------------------------------------------
# Reference LLaVA-JP checkpoints
# --------------------------------------------------------------------------------------------------

# GPT-2 fields of the reference config (a GPT2Config subclass with the mm_* fields added).
_GPT2_FIELDS = (
    "activation_function",
    "attn_pdrop",
    "bos_token_id",
    "embd_pdrop",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "layer_norm_epsilon",
    "n_embd",
    "n_head",
    "n_inner",
    "n_layer",
    "n_positions",
    "reorder_and_upcast_attn",
    "resid_pdrop",
    "scale_attn_by_inverse_layer_idx",
    "scale_attn_weights",
    "use_cache",
    "vocab_size",
)
_LLAVA_JP_VISION = "model.vision_tower.vision_tower."
_LLAVA_JP_PROJECTOR = "model.mm_projector."
# Causal-mask buffers older transformers saved with GPT-2; not weights.
_GPT2_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _read_llava_jp_weights(src: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return _read_state_dict(src / "model.safetensors", allow_pickle)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a shard index (weight_map): {e}") from e
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_state_dict(src / shard, allow_pickle))
            return state
    if (src / "pytorch_model.bin").is_file():
        return _read_state_dict(src / "pytorch_model.bin", allow_pickle)
    raise CheckpointError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _llava_jp_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the LLaVA-JP config: {e}") from e
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llava-jp", "llava") and "LlavaGpt2ForCausalLM" not in archs:
        raise CheckpointError(
            f"{path}: model_type {cfg.get('model_type')!r} / architectures {archs} is not a LLaVA-JP "
            "checkpoint (model_type llava-jp, LlavaGpt2ForCausalLM)"
        )
    if archs and "LlavaGpt2ForCausalLM" not in archs:
        raise CheckpointError(f"{path}: only the GPT-2 LLaVA-JP models are supported, this is {archs}")
    return cfg


def convert_llava_jp(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, allow_pickle: bool = False
) -> ConvLlavaForConditionalGeneration:
    """Import a ConvLLaVA checkpoint of the reference LLaVA-JP code as a model directory of ours.

    Reads `config.json` (GPT-2 fields + `mm_vision_resolution`, `vision_add_five_stage`,
    `vision_five_stage_width`, `mm_projector_type`, `drop_path_rates`, `image_aspect_ratio`), the
    weights (`model.safetensors`, sharded safetensors, or `pytorch_model.bin` with `allow_pickle`)
    and the tokenizer; writes model + processor to `dst_dir` and returns the model.

    Key mapping: `transformer.*` / `lm_head.weight` -> `language_model.*`;
    `model.vision_tower.vision_tower.{stem,stages}.*` -> `vision_tower.*` (timm -> ConvNextModel,
    the added stage is `stages.4`); `model.mm_projector.{i}.*` (or `.weight/.bias` for `linear`)
    -> `projector.{i}.*`. The ConvNeXt's depths and widths are read from the weights.

    Raises:
        CheckpointError: not a GPT-2 + ConvNeXt LLaVA-JP checkpoint, or keys that do not fit (listed).
    """
    src = Path(src_dir)
    cfg = _llava_jp_config(src)
    weights = _read_llava_jp_weights(src, allow_pickle)

    vision_timm = {
        k[len(_LLAVA_JP_VISION) :]: v for k, v in weights.items() if k.startswith(_LLAVA_JP_VISION)
    }
    if not vision_timm:
        raise CheckpointError(
            f"{src}: no ConvNeXt vision tower weights ({_LLAVA_JP_VISION}stem.*); a CLIP-ViT LLaVA-JP "
            "checkpoint cannot be converted to ConvLLaVA"
        )
    vision_timm = {k: v for k, v in vision_timm.items() if not k.startswith(_TIMM_NON_TRUNK)}
    depths, widths = convnext_arch(vision_timm)
    trunk_stages = min(4, len(depths))
    stage5_depth = sum(depths[trunk_stages:])
    if len(depths) > trunk_stages + 1:
        raise CheckpointError(f"{src}: {len(depths)} ConvNeXt stages; at most one added stage is supported")
    stage5_width = widths[trunk_stages] if stage5_depth else 0
    added = int(cfg.get("vision_add_five_stage", 0) or 0)
    if added != stage5_depth or (
        stage5_depth and int(cfg.get("vision_five_stage_width", stage5_width)) != stage5_width
    ):
        raise CheckpointError(
            f"{src}: config says vision_add_five_stage={cfg.get('vision_add_five_stage')}, "
            f"vision_five_stage_width={cfg.get('vision_five_stage_width')}, but the weights have an added "
            f"stage of depth {stage5_depth} and width {stage5_width}"
        )
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != widths[-1]:
        raise CheckpointError(
            f"{src}: mm_hidden_size {mm_hidden} but the vision tower outputs {widths[-1]} channels"
        )

    projector_type = cfg.get("mm_projector_type", "linear")
    has_lm_head = "lm_head.weight" in weights
    wte = weights.get("transformer.wte.weight")
    tied = not has_lm_head or (
        bool(cfg.get("tie_word_embeddings", False))
        and wte is not None
        and torch.equal(weights["lm_head.weight"], wte)
    )
    text_kwargs = {k: cfg[k] for k in _GPT2_FIELDS if k in cfg}
    text_config = AutoConfig.for_model("gpt2", **text_kwargs, tie_word_embeddings=tied)

    rates = cfg.get("drop_path_rates") or [0.0]
    config = ConvLlavaConfig(
        vision_config=build_vision_config(
            depths[:trunk_stages], widths[:trunk_stages], stage5_depth, stage5_width
        ),
        text_config=text_config,
        projector_type=projector_type,
        image_token_id=text_config.vocab_size,
        trunk_stages=trunk_stages,
        stage5_drop_path_rates=[float(rates[0]), float(rates[-1])],
    )
    try:
        # Every weight comes from the checkpoint: build without allocating or initialising any.
        with torch.device("meta"):
            model = ConvLlavaForConditionalGeneration(config)
    except ConfigError as e:
        raise CheckpointError(f"{src}: mm_projector_type {projector_type!r} is not supported: {e}") from e

    mapped: dict[str, torch.Tensor] = timm_convnext_to_hf(vision_timm, prefix="vision_tower.")
    unknown: list[str] = []
    for key, value in weights.items():
        if key.startswith(_LLAVA_JP_VISION) or _GPT2_BUFFERS.fullmatch(key):
            continue
        if key.startswith("transformer.") or key == "lm_head.weight":
            mapped["language_model." + key] = value
        elif key.startswith(_LLAVA_JP_PROJECTOR):
            rest = key[len(_LLAVA_JP_PROJECTOR) :]
            mapped["projector." + (rest if rest[0].isdigit() else "0." + rest)] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{src}: keys that are not LLM, vision tower or projector: {_key_list(unknown)}"
        )
    if tied:
        mapped.pop("language_model.lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(str(src), expected, mapped, optional=["language_model.lm_head.weight"] if tied else [])
    model.load_state_dict(mapped, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise CheckpointError(f"{src}: weights the checkpoint does not provide: {_key_list(left)}")
    if len({param.dtype for param in model.parameters()}) > 1:
        model.float()  # a checkpoint with mixed dtypes: one dtype for the whole model

    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(src)
    _prepare_tokenizer(tokenizer, model)
    resolution = int(cfg.get("mm_vision_resolution", 768))
    mode = "pad" if cfg.get("image_aspect_ratio") == "pad" else "crop"
    processor = _make_processor(tokenizer, resolution, mode, config.image_stride)
    save_model_dir(model, processor, dst_dir)
    logger.info(
        "converted %s -> %s (ConvNeXt depths %s widths %s, projector %s, %d px, %s)",
        src,
        dst_dir,
        depths,
        widths,
        projector_type,
        resolution,
        mode,
    )
    return model
