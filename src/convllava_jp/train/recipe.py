"""Recipes: one YAML file per model, one section per stage, overridable with `--set key=value`.

```yaml
name: convllava-jp-1.3b-768
model: {preset: convllava-jp-1.3b-768, llm: llm-jp/llm-jp-1.3b-v1.0, vision: hf-hub:...}
output_dir: runs/convllava-jp-1.3b-768
defaults: {lr: 2.0e-5, per_device_batch: 8, ...}      # applied to every stage
stages:
  "1": {data: [{path: ..., image_root: ...}], template: plain, trainable: [stage5, projector], lr: 3.0e-4}
```
Paths may use `{name}` variables from the recipe's `vars:` section (and `{recipe_dir}`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.constants import TEMPLATE_NAMES
from ..data.records import DataSource
from ..errors import ConfigError

TRAINABLE_NAMES = ("stage5", "vision", "projector", "llm")
LR_PARTS = ("vision", "projector", "llm")
OPTIMIZERS = ("adamw", "adamw_8bit")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LORA_BITS = (None, 4)


@dataclass
class LoraSpec:
    """LoRA (or QLoRA with `bits: 4`) adapters on the LLM, trained instead of its full weights.

    `target_modules` None picks the LLM family's defaults (`train.lora.DEFAULT_TARGET_MODULES`).
    The adapters are merged into the LLM when the stage saves its model, so the output is a
    plain model directory.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    bits: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive int, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora.target_modules is empty; leave it out for the LLM family's defaults")
        if self.bits not in LORA_BITS:
            raise ConfigError(
                f"lora.bits must be 4 (QLoRA) or null (LoRA on full-precision weights), got {self.bits!r}"
            )


@dataclass
class StageConfig:
    """Everything one training stage needs; the recipe's `defaults` fill what a stage leaves out."""

    name: str
    data: list[DataSource]
    template: str = "llm-jp-v1"
    trainable: list[Any] = field(default_factory=lambda: ["projector"])
    lr: float = 2e-5
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch: int = 8
    grad_accum: int = 1
    global_batch: int | None = None
    optimizer: str = "adamw"
    precision: str = "auto"
    gradient_checkpointing: bool = True
    max_length: int = 1532
    save_steps: int = 0
    save_total_limit: int | None = 2
    logging_steps: int = 10
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    max_grad_norm: float = 1.0
    lora: LoraSpec | None = None
    seed: int = 0
    # Image preprocessing of this stage and of its output model: {mode, size, max_tokens}, e.g.
    # {mode: keep-aspect, size: 2048, max_tokens: 576} for documents; None keeps the model's.
    image: dict | None = None
    # Frozen vision tower: encode each image once before the stage (train.feature_cache):
    # auto (when the features fit in 2 GiB), true, false.
    cache_image_features: Any = "auto"
    # torch's intra-op threads during the stage on a CPU device (train.threads); None: unchanged.
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self.data = [d if isinstance(d, DataSource) else DataSource(**d) for d in self.data]
        if not self.data:
            raise ConfigError(f"stage {self.name}: `data` lists no dataset")
        if isinstance(self.lora, dict):
            bad = set(self.lora) - {f.name for f in dataclasses.fields(LoraSpec)}
            if bad:
                raise ConfigError(
                    f"stage {self.name}: lora: unknown keys {sorted(bad)}; known: r, alpha, dropout, "
                    "target_modules, bits"
                )
            self.lora = LoraSpec(**self.lora)
        if self.lora is not None and "llm" not in self.trainable:
            raise ConfigError(
                f"stage {self.name}: `lora` adapts the LLM, but `trainable` does not list llm; add it "
                "(with lora the LLM trains through its adapters, its base weights stay frozen)"
            )
        for part, mult in (self.lr_multipliers or {}).items():
            if part not in LR_PARTS:
                raise ConfigError(
                    f"stage {self.name}: lr_multipliers: unknown part {part!r}; choose from {', '.join(LR_PARTS)}"
                )
            if mult < 0:
                raise ConfigError(
                    f"stage {self.name}: lr_multipliers.{part} must be a number >= 0, got {mult!r}"
                )
        for t in self.trainable:
            key = next(iter(t)) if isinstance(t, dict) else t
            if key not in (*TRAINABLE_NAMES, "vision_from_stage"):
                raise ConfigError(
                    f"stage {self.name}: unknown trainable module {t!r}; "
                    f"choose from {', '.join(TRAINABLE_NAMES)} or {{vision_from_stage: N}}"
                )
        self.cache_image_features = _cache_mode(self.cache_image_features, self.name)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(
                f"stage {self.name}: cpu_threads must be >= 1 (or null), got {self.cpu_threads!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"stage {self.name}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"stage {self.name}: precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.image is not None and (
            not isinstance(self.image, dict) or set(self.image) - {"mode", "size", "max_tokens"}
        ):
            raise ConfigError(
                f"stage {self.name}: image must be a mapping of mode / size / max_tokens, got {self.image!r}"
            )
        if self.template not in (*TEMPLATE_NAMES, "default") and not Path(self.template).suffix:
            raise ConfigError(
                f"stage {self.name}: template must be one of {', '.join(TEMPLATE_NAMES)}, default (the "
                f"model dir's own) or a .jinja file, got {self.template!r}"
            )

    def _coerce_numbers(self) -> None:
        """Numbers given as text (`max_steps: "12"`) become numbers; anything else is refused here,
        with the key's name, rather than deep inside the optimizer."""
        for f in dataclasses.fields(self):
            kind = {"float": float, "int": int, "int | None": int, "float | None": float}.get(str(f.type))
            value = getattr(self, f.name)
            if kind is None or (value is None and "None" in str(f.type)):
                continue
            setattr(self, f.name, _number(value, kind, f"stage {self.name}: {f.name}"))
        self.lr_multipliers = {
            part: _number(mult, float, f"stage {self.name}: lr_multipliers.{part}")
            for part, mult in (self.lr_multipliers or {}).items()
        }

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(per-device batch, accumulation steps) giving `global_batch` samples a step on `world_size` devices.

        Without `global_batch` the recipe's `per_device_batch` and `grad_accum` are used as they are.
        With it, the per-device batch is `per_device_batch` (the most that fits one device) or the
        largest smaller size that divides the per-device share, and accumulation makes up the rest:
        global 32 on 1 device with per_device_batch 8 -> (8, 4); on 8 devices -> (4, 1).
        """
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if not self.global_batch:
            return self.per_device_batch, self.grad_accum
        if self.global_batch % world_size:
            raise ConfigError(
                f"stage {self.name}: global_batch {self.global_batch} cannot be split over {world_size} "
                f"processes; set global_batch to a multiple of {world_size} (e.g. --set "
                f"global_batch={world_size * max(1, -(-self.global_batch // world_size))}; scale lr with it)"
            )
        share = self.global_batch // world_size
        per_device = min(self.per_device_batch, share)
        while share % per_device:
            per_device -= 1
        return per_device, share // per_device

    def grad_accum_for(self, world_size: int) -> int:
        """Accumulation steps of `batch_plan` (kept for callers that only need this number)."""
        return self.batch_plan(world_size)[1]


@dataclass
class ModelSpec:
    preset: str = "tiny"
    llm: str | None = None
    vision: str | None = None
    tokenizer: str | None = None
    init: str | None = None  # an existing model dir to start from instead of building one


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    output_dir: str
    stages: dict[str, StageConfig]
    description: str = ""
    path: str | None = None

    def stage_names(self) -> list[str]:
        return sorted(self.stages, key=lambda s: (len(s), s))

    def select(self, which: str) -> list[str]:
        """`all` -> every stage in order; `2` -> ["2"]; `1,3` or `2-3` -> those."""
        names = self.stage_names()
        if which == "all":
            return names
        chosen: list[str] = []
        for part in which.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                chosen += (
                    [n for n in names if names.index(lo) <= names.index(n) <= names.index(hi)]
                    if (lo in names and hi in names)
                    else []
                )
            elif part in names:
                chosen.append(part)
            else:
                raise ConfigError(f"recipe {self.name} has no stage {part!r}; stages: {', '.join(names)}")
        if not chosen:
            raise ConfigError(f"no stage selected by {which!r}; stages: {', '.join(names)}")
        return chosen


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading `2e-3` (no dot) as a float, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where that is a string: `lr: 2e-3` in a recipe, or
    `--set stages.3.lora.dropout=5e-2`, would reach the code as text.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _cache_mode(value: Any, stage: str) -> str | bool:
    """`cache_image_features` as "auto", True or False (YAML bools, or their text from --set)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        text = value.strip().lower()
        return "auto" if text == "auto" else text == "true"
    raise ConfigError(f"stage {stage}: cache_image_features must be auto, true or false, got {value!r}")


def _number(value: Any, kind: type, what: str) -> int | float:
    """`value` as an int or float (`kind`): numbers and numeric text pass, bools and the rest fail."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ConfigError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _substitute(obj: Any, variables: dict[str, str]) -> Any:
    if isinstance(obj, str):
        try:
            return obj.format(**variables) if "{" in obj else obj
        except KeyError as err:
            raise ConfigError(f"unknown variable {err} in {obj!r}; defined: {', '.join(variables)}") from None
    if isinstance(obj, list):
        return [_substitute(x, variables) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, variables) for k, v in obj.items()}
    return obj


def parse_overrides(pairs: list[str] | None) -> list[tuple[str, Any]]:
    """`key=value` strings -> (dotted key, YAML-parsed value)."""
    out = []
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.load(raw, Loader=_RecipeLoader)))
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML; `overrides` like `stages.1.lr=1e-4`, `defaults.max_steps=10`, `vars.data_dir=x`.

    A key under `defaults.` applies to every stage; a bare stage key (`lr=1e-4`) too.
    """
    path = Path(path)
    if not path.exists():
        builtin = Path(__file__).resolve().parents[1] / "recipes" / f"{path.name.removesuffix('.yaml')}.yaml"
        if builtin.exists():
            path = builtin
        else:
            raise ConfigError(f"recipe {str(path)!r} not found (and no built-in recipe of that name)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
    for key, value in parse_overrides(overrides):
        if key.split(".")[0] in stage_fields:
            key = "defaults." + key
        _set_dotted(raw, key, value)
    variables = {"recipe_dir": str(path.parent), **{k: str(v) for k, v in (raw.get("vars") or {}).items()}}
    raw = _substitute(raw, variables)
    unknown = set(raw) - {"name", "description", "model", "output_dir", "defaults", "stages", "vars"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
    defaults = raw.get("defaults") or {}
    stages = {}
    for name, body in (raw.get("stages") or {}).items():
        merged = copy.deepcopy(defaults)
        merged.update(body or {})
        bad = set(merged) - stage_fields
        if bad:
            raise ConfigError(
                f"{path}: stage {name}: unknown keys {sorted(bad)}; known: {sorted(stage_fields)}"
            )
        stages[str(name)] = StageConfig(name=str(name), **{k: v for k, v in merged.items() if k != "name"})
    if not stages:
        raise ConfigError(f"{path}: no stages")
    model = raw.get("model") or {}
    bad = set(model) - {f.name for f in dataclasses.fields(ModelSpec)}
    if bad:
        raise ConfigError(f"{path}: model: unknown keys {sorted(bad)}")
    return Recipe(
        name=raw.get("name", path.stem),
        description=raw.get("description", ""),
        model=ModelSpec(**model),
        output_dir=raw.get("output_dir", f"runs/{path.stem}"),
        stages=stages,
        path=str(path),
    )
