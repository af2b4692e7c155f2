"""Model: config, the VLM (ConvNeXt + stage 5 -> projector -> causal LM), processing, presets, model dirs.

Importing this package registers the config, model, processor and image processor with the
transformers Auto classes, so `AutoModelForImageTextToText.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` load our model directories.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import ConvLlavaConfig
from .image_processing import ConvLlavaImageProcessor
from .modeling import ConvLlavaForConditionalGeneration, build_projector
from .presets import PRESETS, build_config, get_preset
from .processing import ConvLlavaProcessor

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
    "ConvLlavaImageProcessor",
    "ConvLlavaProcessor",
    "build_config",
    "build_projector",
    "get_preset",
]
