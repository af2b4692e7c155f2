"""Model: config, vision tower (ConvNeXt + stage 5), projector, the VLM, presets, weight import."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from ..data.images import ConvLlavaImageProcessor
from ..data.processor import ConvLlavaProcessor
from .configuration import ConvLlavaConfig
from .modeling import ConvLlavaForConditionalGeneration, build_projector
from .presets import PRESETS, build_config, get_preset

AutoConfig.register(ConvLlavaConfig.model_type, ConvLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(ConvLlavaConfig, ConvLlavaForConditionalGeneration, exist_ok=True)
AutoModel.register(ConvLlavaConfig, ConvLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    ConvLlavaConfig, slow_image_processor_class=ConvLlavaImageProcessor, exist_ok=True
)
AutoProcessor.register(ConvLlavaConfig, ConvLlavaProcessor, exist_ok=True)

__all__ = [
    "PRESETS",
    "ConvLlavaConfig",
    "ConvLlavaForConditionalGeneration",
    "build_config",
    "build_projector",
    "get_preset",
]
