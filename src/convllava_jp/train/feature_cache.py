"""Cache what a frozen vision tower makes of each training image, once per stage.

With the tower frozen (the article's stage 3), every step would load, preprocess and encode its
images again although their features never change. `build_feature_cache` encodes each image file
of the stage's data once before training; the dataset then hands out `CachedImage` stand-ins
instead of pixel tensors (no file is opened), and `FeatureCache.swap_in` puts the cached features
into the batch, where only the projector (and the LLM) run on them. The stage computes what it
would without the cache, up to float rounding: the features are the tower's own output (taken in
eval mode, so nothing in the tower may compute differently in train mode, else the cache is not
used).

`cache_image_features` in a recipe stage: `auto` (default) caches when the tower is frozen and the
features take at most `AUTO_LIMIT_BYTES`; `true` whenever the tower is frozen; `false` never.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.cached_images import CachedImage
from ..errors import ImageError

log = logging.getLogger(__name__)

AUTO_LIMIT_BYTES = 2 * 1024**3
_ENCODE_BATCH = 64


class FeatureCache:
    """Per-image tower features (CPU), and the dataset's map from image file to `CachedImage`."""

    def __init__(self, features: list[torch.Tensor], files: dict[str, CachedImage]) -> None:
        self.features = features
        self.files = files

    def __len__(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def swap_in(self, inputs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """`inputs` with `CachedImage`s in `pixel_values` replaced by `vision_features`.

        Images of the batch that are not in the cache (bytes, files that failed to encode
        beforehand) are encoded here, without gradients: the tower is frozen.
        """
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, (list, tuple)) or not any(isinstance(p, CachedImage) for p in pixels):
            return inputs
        device = _tower_device(model)
        feats = []
        for item in pixels:
            if isinstance(item, CachedImage):
                feats.append(self.features[item.key].to(device, non_blocking=True))
            else:
                with torch.no_grad():
                    feats.append(_unwrap(model).encode_images(item.unsqueeze(0).to(device))[0])
        out = {k: v for k, v in inputs.items() if k != "pixel_values"}
        same = all(f.shape == feats[0].shape for f in feats)
        out["vision_features"] = torch.stack(feats) if same else feats
        return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The ConvLlava model inside DDP / peft / accelerate wrappers."""
    while not hasattr(model, "encode_images"):
        inner = getattr(model, "module", None) or getattr(model, "base_model", None)
        if inner is None or inner is model:
            raise TypeError(f"{type(model).__name__} has no encode_images (not a ConvLLaVA model)")
        model = inner
    return model


def _tower_device(model: nn.Module) -> torch.device:
    return next(_unwrap(model).vision_tower.parameters()).device


def _random_in_training(module: nn.Module) -> bool:
    """Whether `module` computes differently in train mode (dropout, stochastic depth, batch norm)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        if type(m).__name__.endswith("DropPath") and float(getattr(m, "drop_prob", 0) or 0) > 0:
            return True
    return False


def cache_refusal(model: nn.Module) -> str | None:
    """Why the tower's features cannot be cached for this stage, or None when they can."""
    tower = _unwrap(model).vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        return "the vision tower trains in this stage"
    if _random_in_training(tower):
        return "the vision tower computes differently in train mode (dropout, stochastic depth or batch norm)"
    return None


def estimated_bytes(model: nn.Module, n_images: int, tokens_per_image: int) -> int:
    """Bytes the features of `n_images` images take at most (`tokens_per_image` tokens each)."""
    inner = _unwrap(model)
    element = next(inner.vision_tower.parameters()).element_size()
    return n_images * tokens_per_image * int(inner.config.vision_hidden_size) * element


class _ImageFiles(Dataset):
    """Image files -> preprocessed tensors (None for a file that cannot be used), for a DataLoader."""

    def __init__(self, files: Sequence[str], processor) -> None:
        self.files = files
        self.processor = processor

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return self.processor.preprocess_images([self.files[i]])[0]
        except ImageError:  # the dataset reports the file when it meets it
            return None


def build_feature_cache(
    model: nn.Module, processor, files: Sequence[str], batch_size: int = _ENCODE_BATCH, num_workers: int = 0
) -> FeatureCache:
    """Encode every image file once with the (frozen) tower; files that fail to load are left out.

    `num_workers` DataLoader workers load and preprocess the images while the tower encodes.
    """
    inner = _unwrap(model)
    device = next(inner.vision_tower.parameters()).device
    was_training = inner.vision_tower.training
    inner.vision_tower.eval()
    features: list[torch.Tensor] = []
    index: dict[str, CachedImage] = {}
    loader = DataLoader(
        _ImageFiles(files, processor), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    bar = tqdm(total=len(files), desc="caching image features (frozen vision tower)", unit="img")
    try:
        for start, pixels in zip(range(0, len(files), batch_size), loader):
            chunk = list(files[start : start + batch_size])
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(pixels):
                if p is not None:
                    groups.setdefault(tuple(p.shape), []).append(i)
            encoded: dict[int, torch.Tensor] = {}
            for members in groups.values():
                batch = torch.stack([pixels[i] for i in members]).to(device)
                with torch.no_grad():
                    out = inner.encode_images(batch).cpu()
                for j, i in enumerate(members):
                    encoded[i] = out[j].clone()
            for i, path in enumerate(chunk):
                if i in encoded:
                    index[path] = CachedImage(len(features), tuple(pixels[i].shape))
                    features.append(encoded[i])
            bar.update(len(chunk))
    finally:
        bar.close()
        inner.vision_tower.train(was_training)
    return FeatureCache(features, index)


def maybe_cache_features(
    mode, model: nn.Module, processor, dataset, stage_name: str, num_workers: int = 0
) -> FeatureCache | None:
    """The stage's feature cache per `cache_image_features` (`mode`), or None; sets `dataset.image_cache`."""
    if mode is False:
        return None
    refusal = cache_refusal(model)
    if refusal is not None:
        (log.warning if mode is True else log.debug)(
            "stage %s: not caching image features: %s", stage_name, refusal
        )
        return None
    files = dataset.image_files()
    if not files:
        return None
    estimate = estimated_bytes(model, len(files), dataset.tokens_per_image)
    if mode == "auto" and estimate > AUTO_LIMIT_BYTES:
        log.info(
            "stage %s: not caching image features: %d images would take up to %.1f GiB (auto limit "
            "%.1f GiB; cache_image_features: true caches anyway)",
            stage_name,
            len(files),
            estimate / 1024**3,
            AUTO_LIMIT_BYTES / 1024**3,
        )
        return None
    cache = build_feature_cache(model, processor, files, num_workers=num_workers)
    dataset.image_cache = cache.files
    log.info(
        "stage %s: frozen vision tower: features of %d images cached (%.1f MiB); steps skip loading and encoding them",
        stage_name,
        len(cache),
        cache.nbytes / 1024**2,
    )
    return cache
