"""vLLM's multimodal processing for ConvLLaVA: our image processor, `<image>` -> N placeholder ids.

vLLM tokenizes the prompt text itself; here the images become pixel values through OUR
`ConvLlavaImageProcessor` (the model dir's preprocessor settings: crop / pad / keep-aspect, any
size, so pixels equal `VLMPipeline`'s), and each `<image>` id is replaced by as many ids as that
image makes tokens ((H / stride) * (W / stride) of its preprocessed size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ..data.constants import IMAGE_TOKEN
from ..data.images import image_token_count
from ..model.configuration import ConvLlavaConfig
from ..model.image_processing import ConvLlavaImageProcessor
from ..model.model_dir import load_processor
from ..model.processing import ConvLlavaProcessor
from .support import image_input_size, max_image_tokens


class ConvLlavaProcessingInfo(BaseProcessingInfo):
    """The model dir's config, image processor and token counts."""

    def get_hf_config(self) -> ConvLlavaConfig:
        return self.ctx.get_hf_config(ConvLlavaConfig)

    @cached_property
    def _processor(self) -> ConvLlavaProcessor:
        return load_processor(self.ctx.model_config.model)

    @property
    def image_processor(self) -> ConvLlavaImageProcessor:
        return self._processor.image_processor

    def get_hf_processor(self, **kwargs: object) -> ConvLlavaProcessor:
        """Our `ConvLlavaProcessor` (tokenizer + image processor) of the model dir, loaded once."""
        return self._processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.image_processor.num_image_tokens(image_height, image_width)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": max_image_tokens(self.image_processor)}


class ConvLlavaDummyInputsBuilder(BaseDummyInputsBuilder[ConvLlavaProcessingInfo]):
    """Profiling inputs: `<image>` tags and white images of the size that makes the most tokens."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options):
        height, width = image_input_size(self.info.image_processor)
        images = self._get_dummy_images(
            width=width,
            height=height,
            num_images=mm_counts.get("image", 0),
            overrides=(mm_options or {}).get("image"),
        )
        return {"image": images}


class ConvLlavaMultiModalProcessor(BaseMultiModalProcessor[ConvLlavaProcessingInfo]):
    """Images -> our pixel values; each `<image>` id -> the image's count of placeholder ids."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        images = list(hf_data.get("images") or [])
        # vLLM's call casts the pixels to the model's dtype, as the HF processors' outputs are.
        out = self.info.ctx.call_hf_processor(self.info.image_processor, {"images": images})
        # One (3, H, W) tensor per image: keep-aspect images differ in size.
        out["pixel_values"] = list(out["pixel_values"])
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "image_sizes": MultiModalFieldConfig.batched("image"),
            "image_embeds": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            # The size our processor gave the pixels (EXIF rotation and keep-aspect included).
            height, width = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_sizes"].data)
            return [image_token_id] * image_token_count(height, width, self.info.image_processor.stride)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]
