"""ConvLLaVA as a vLLM model: our vision tower + projector, vLLM's own LLM of the family.

Registered with vLLM (`register()` in this package) under the architecture name our config.json
carries, so `vllm serve MODEL_DIR` loads a model dir as it is: the weights keep our key names
(`vision_tower.*`, `projector.*`, `language_model.*` = the HF causal LM's own names, which vLLM's
GPT-2 / Llama / Qwen / GPT-NeoX... implementations load).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import ConvNextModel
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..errors import ConfigError
from ..model.modeling import build_projector
from ..model.small_map_conv import use_small_map_convs
from .processing import ConvLlavaDummyInputsBuilder, ConvLlavaMultiModalProcessor, ConvLlavaProcessingInfo
from .support import causal_lm_architecture, placeholder


@MULTIMODAL_REGISTRY.register_processor(
    ConvLlavaMultiModalProcessor, info=ConvLlavaProcessingInfo, dummy_inputs=ConvLlavaDummyInputsBuilder
)
class ConvLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """vLLM model of a ConvLLaVA model dir."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return placeholder(modality)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = ConvNextModel(config.vision_config)
            self.vision_tower.layernorm = nn.Identity()  # unused and not saved, as in our model
            use_small_map_convs(self.vision_tower)  # the same convolutions as our model's tower
            self.projector = build_projector(
                config.projector_type, config.vision_hidden_size, config.text_config.hidden_size
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=[causal_lm_architecture(config.text_config)],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/s * W/s, d): the last stage's map, row-major, projected (as ours)."""
        tower = self.vision_tower
        hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embeddings.weight.dtype))
        for stage in tower.encoder.stages:
            hidden = stage(hidden)
        return self.projector(hidden.flatten(2).transpose(1, 2))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One (N_i, d) tensor per image, in prompt order; images of one size run together."""
        embeds = kwargs.get("image_embeds")
        if embeds is not None:
            return list(embeds)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        images = list(pixel_values)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3:
                raise ConfigError(f"image {i}: expected (3, H, W) pixel values, got {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            feats = self.encode_images(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out  # type: ignore[return-value]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our model dir's keys: `vision_tower.*` / `projector.*` (ours), `language_model.*` (the
        family's HF names, loaded by vLLM's implementation, tied embeddings included)."""

        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["vision_tower.layernorm."])
        return loader.load_weights(weights)
