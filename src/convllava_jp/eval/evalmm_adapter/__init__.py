"""Run a ConvLLaVA-JP model dir inside llm-jp-eval-mm, as one of its models (`BaseVLM`).

eval-mm imports `model_table` from its `--adapter_dir` and calls
`model_table.get_class_from_model_id(model_id)(model_id)`; this folder is such an adapter dir:

    eval-mm run --adapter_dir "$(python -m convllava_jp.eval.evalmm_adapter)" \\
        --model_id runs/stage3 --task_id ja-vg-vqa-500 --metrics rougel

`--model_id` is the model dir. Device, dtype and chat template come from CONVLLAVA_DEVICE (auto),
CONVLLAVA_DTYPE (as saved) and CONVLLAVA_TEMPLATE (llm-jp-v1). eval-mm's text reaches the model as
it is when its "<image>" tags match the images given, else with the tags removed and one
"<image>" line per image before it (the layout the model was trained on). Greedy unless eval-mm
asks for sampling (`do_sample` with a temperature); beam search is not supported (a warning,
then greedy).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["BaseVLM", "ConvLlavaVLM", "adapter_dir", "to_generation_config", "to_prompt"]

try:  # the real base class when eval-mm is installed, so `isinstance(model, BaseVLM)` holds there
    from eval_mm.models.base_vlm import BaseVLM
except ImportError:  # a stand-in of the same shape (eval-mm is not installable everywhere)
    from abc import ABC, abstractmethod

    class BaseVLM(ABC):  # type: ignore[no-redef]
        @abstractmethod
        def generate(self, images: list[Any] | None, text: str, gen_kwargs: Any = None) -> str: ...

        @abstractmethod
        def batch_generate(
            self, images_list: list[list[Any]] | None, text_list: list[str], gen_kwargs: Any = None
        ) -> list[str]: ...


IMAGE_TAG = "<image>"


def adapter_dir() -> str:
    """The folder to pass as eval-mm's `--adapter_dir`."""
    return os.path.dirname(os.path.abspath(__file__))


def to_prompt(text: str, n_images: int) -> str:
    """eval-mm's text as our user turn: kept when its `<image>` tags match the images, else re-laid."""
    if text.count(IMAGE_TAG) == n_images and (n_images == 0 or IMAGE_TAG in text):
        return text
    return f"{IMAGE_TAG}\n" * n_images + text.replace(IMAGE_TAG, "").strip()


def to_generation_config(gen_kwargs: Any) -> Any:
    """eval-mm's GenerationConfig (or a dict of its fields) as ours."""
    from ...infer.generation import GenerationConfig

    get = gen_kwargs.get if isinstance(gen_kwargs, dict) else lambda k, d=None: getattr(gen_kwargs, k, d)
    if gen_kwargs is None:
        return GenerationConfig(max_new_tokens=1024)  # eval-mm's dataclass default
    if (get("num_beams", 1) or 1) > 1:
        log.warning("num_beams=%s: beam search is not supported; decoding greedily", get("num_beams"))
    sample = bool(get("do_sample", False)) and float(get("temperature", 0.0) or 0.0) > 0
    return GenerationConfig(
        max_new_tokens=int(get("max_new_tokens", 1024)),
        temperature=float(get("temperature", 0.0)) if sample else 0.0,
        top_p=float(get("top_p", 1.0) or 1.0) if sample else 1.0,
    ).validate()


class ConvLlavaVLM(BaseVLM):
    """A ConvLLaVA-JP model dir behind eval-mm's model interface."""

    def __init__(
        self,
        model_id: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        template: str | None = None,
        batch_size: int = 8,
    ) -> None:
        from ...infer.generation import VLMPipeline

        self.model_id = model_id
        self.batch_size = batch_size
        self.pipeline = VLMPipeline.from_pretrained(
            model_id,
            device=device or os.environ.get("CONVLLAVA_DEVICE", "auto"),
            dtype=dtype or os.environ.get("CONVLLAVA_DTYPE") or None,
            template=template or os.environ.get("CONVLLAVA_TEMPLATE") or None,  # None: the trained one
        )

    def generate(self, images: list[Any] | None, text: str, gen_kwargs: Any = None) -> str:
        return self.batch_generate([images or []], [text], gen_kwargs)[0]

    def batch_generate(
        self, images_list: list[list[Any]] | None, text_list: Sequence[str], gen_kwargs: Any = None
    ) -> list[str]:
        from ...infer.generation import GenerationRequest

        images_list = images_list or [[] for _ in text_list]
        if len(images_list) != len(text_list):
            raise ValueError(f"{len(images_list)} image lists for {len(text_list)} texts")
        requests = [
            GenerationRequest(
                [{"role": "user", "content": to_prompt(text, len(imgs or []))}], list(imgs or [])
            )
            for imgs, text in zip(images_list, text_list)
        ]
        results = self.pipeline.generate(
            requests, to_generation_config(gen_kwargs), batch_size=self.batch_size
        )
        return [r.text for r in results]
