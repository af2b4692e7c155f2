"""Serving ConvLLaVA models with vLLM: an out-of-tree model plugin, and an export road.

Plugin road (`register`, entry point group `vllm.general_plugins`): with this package installed
in vLLM's environment, `vllm serve MODEL_DIR` loads our model dir as it is. `model` runs the
vision tower and projector on our modules and the LLM on vLLM's own implementation of its family;
`processing` preprocesses images with our image processor (crop / pad / keep-aspect, any size)
and expands each `<image>` to the image's token count.

Export road (`launch`): a model dir exported to transformers' FastVLM class (`convert.export`)
served by vLLM's Transformers backend, without this package in vLLM's environment.

`launch` builds the `vllm serve` command line and never imports vLLM, which usually lives in its
own virtual environment (it pins an older transformers than the main one).
"""

from __future__ import annotations

import logging

from .support import ARCHITECTURE


def register() -> None:
    """vLLM general plugin: register our config, processor and model class with vLLM.

    Runs in every vLLM process (it may run more than once), whatever model is served: a failure
    here is logged, not raised, so it never stops vLLM from serving other models. The model module
    is imported lazily by vLLM from the "module:Class" string.
    """
    try:
        from transformers import AutoProcessor
        from vllm import ModelRegistry

        from ..model import ConvLlavaConfig  # registers the config with transformers' AutoConfig
        from .support import served_processor_class

        # vLLM's chat endpoint takes the chat template from the processor AutoProcessor gives it.
        AutoProcessor.register(ConvLlavaConfig, served_processor_class(), exist_ok=True)
        if ARCHITECTURE not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:ConvLlavaForConditionalGeneration")
    except Exception:
        logging.getLogger(__name__).exception(
            "convllava-jp's vLLM plugin could not register; ConvLLaVA model dirs will not load "
            "(docs/vllm.md lists the versions that pair)"
        )


__all__ = ["ARCHITECTURE", "register"]
