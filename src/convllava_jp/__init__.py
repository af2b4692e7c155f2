"""ConvLLaVA-JP: build, train, serve and evaluate Japanese ConvLLaVA vision-language models.

Importing the package registers the model, config and processor with the transformers Auto
classes, so `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` load our model dirs.
"""

from .errors import CheckpointError, ConfigError, ConvLlavaError, DataError, ImageError, TemplateError
from .model import ConvLlavaConfig, ConvLlavaForConditionalGeneration, build_config, get_preset

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvLlavaConfig",
    "ConvLlavaError",
    "ConvLlavaForConditionalGeneration",
    "DataError",
    "ImageError",
    "TemplateError",
    "build_config",
    "get_preset",
]
