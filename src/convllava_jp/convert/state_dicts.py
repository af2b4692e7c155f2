"""Reading checkpoint files safely, and checking state dicts against a model with errors that list keys.

Pickle files (`.pth`, `.pt`, `.bin`, `.ckpt`) can run code when loaded: they are read only when the
caller passes `allow_pickle`, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def key_list(keys: Iterable[str], limit: int = 20) -> str:
    """'N key(s): a, b, ... and M more' for error messages."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {', '.join(keys[:limit])}{more}"


def check_keys(
    where: str,
    expected: Mapping[str, torch.Size],
    given: Mapping[str, torch.Tensor],
    optional: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Raise CheckpointError listing missing / unexpected / shape-mismatched keys, if any."""
    missing = set(expected) - set(given) - set(optional)
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
        lines.append(f"missing {key_list(missing)}")
    if unexpected:
        lines.append(f"unexpected {key_list(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatch in {key_list(mismatched)}")
    raise CheckpointError("\n  ".join(lines))


def refuse_pickle(path: Path) -> CheckpointError:
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


def read_state_dict(
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
            raise refuse_pickle(path)
        state = _torch_load(path)
        return {k: state[k] for k in select(list(state))} if select else state
    raise CheckpointError(
        f"{path}: unknown checkpoint format; use .safetensors (or .pth/.pt/.bin with allow_pickle)"
    )
