"""A pretrained ConvNeXt trunk from wherever it lives, loaded into the vision tower.

`load_vision_trunk` accepts an open_clip `hf-hub:` id, a local open_clip directory, a local
timm/open_clip checkpoint file or a timm model name, and returns timm-keyed trunk weights;
`load_trunk_into` copies them into the vision tower's pretrained stages (stage 5 stays fresh).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from torch import nn

from ..errors import CheckpointError
from ..model.modeling import ConvLlavaForConditionalGeneration
from .convnext_keys import TIMM_NON_TRUNK, convnext_arch, timm_convnext_to_hf
from .state_dicts import PICKLE_SUFFIXES, check_keys, read_state_dict, refuse_pickle

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLE = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"

VISION_SPEC_HELP = (
    "an open_clip hub id (hf-hub:org/name), a local open_clip directory (open_clip_model.safetensors "
    "+ open_clip_config.json), a local timm/open_clip checkpoint file (.safetensors; .pth/.pt/.bin "
    "only with allow_pickle), or a timm model name (e.g. convnext_large)"
)
_STAGE_RE = re.compile(r"encoder\.stages\.(\d+)\.")


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
        (dropped if k[len(prefix) :].startswith(TIMM_NON_TRUNK) else selected).append(k)
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
    state = read_state_dict(path, allow_pickle, select=select)
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
                raise refuse_pickle(directory / name)
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
    check_keys("vision trunk", expected, mapped, hint=hint)
    model.vision_tower.load_state_dict(mapped, strict=False)
    logger.info("loaded %d trunk tensors into vision tower stages 1-%d", len(mapped), config.trunk_stages)
