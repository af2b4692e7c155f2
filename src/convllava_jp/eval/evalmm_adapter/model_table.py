"""eval-mm's adapter entry point: every model id (a ConvLLaVA-JP model dir) maps to `ConvLlavaVLM`."""

from convllava_jp.eval.evalmm_adapter import ConvLlavaVLM


def get_class_from_model_id(model_id: str) -> type:
    return ConvLlavaVLM
