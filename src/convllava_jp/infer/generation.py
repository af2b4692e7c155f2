"""Generation API: load a model dir, ask about images, batched (left-padded) and streamed.

`VLMPipeline.generate` takes many requests and runs them in batches; `chat` is the one-image,
one-question convenience; `stream` yields text pieces as they are decoded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.processor import pad_sequences
from ..data.templates import IMAGE_TOKEN

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def to_hf(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationRequest:
    """A conversation (role/content turns, `<image>` tags in the text) and its images in tag order."""

    messages: list[dict]
    images: list = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string; (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class VLMPipeline:
    """A model + processor ready to answer; thread-safe for one `generate` at a time."""

    def __init__(self, model, processor, template: str = "llm-jp-v1"):
        self.model = model.eval()
        self.processor = processor
        self.template = template
        self.lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", dtype=None, template: str = "llm-jp-v1"):
        from ..model.weights import load_model_dir

        model, processor = load_model_dir(model_dir, device=device, dtype=dtype)
        return cls(model, processor, template)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_context(self) -> int:
        cfg = self.model.config.text_config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    # --- prompts -----------------------------------------------------------------------------
    @staticmethod
    def question_messages(question: str, n_images: int = 1, history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """Turns for a question (images go first in the first user turn, as in training)."""
        messages: list[dict] = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prefix = (IMAGE_TOKEN + "\n") * n_images if n_images and IMAGE_TOKEN not in question else ""
        if messages and prefix:
            messages[0]["content"] = prefix + messages[0]["content"]
            prefix = ""
        messages.append({"role": "user", "content": prefix + question})
        return messages

    def encode(self, request: GenerationRequest):
        return self.processor.encode_conversation(
            request.messages, images=request.images, template=self.template, add_generation_prompt=True
        )

    # --- generation --------------------------------------------------------------------------
    def _batch_inputs(self, encoded: Sequence) -> dict:
        ids, mask = pad_sequences([e.input_ids for e in encoded], self.processor.tokenizer.pad_token_id, "left")
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        images = [p for e in encoded for p in e.pixel_values]
        if images:
            dtype = self.model.dtype
            if len({tuple(p.shape) for p in images}) == 1:
                inputs["pixel_values"] = torch.stack(images).to(self.device, dtype)
            else:
                inputs["pixel_values"] = [p.to(self.device, dtype) for p in images]
        return inputs

    def _hf_kwargs(self, config: GenerationConfig) -> dict:
        tok = self.processor.tokenizer
        kwargs = config.to_hf()
        kwargs.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return kwargs

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        config: GenerationConfig | None = None,
        batch_size: int = 8,
        encoded: Sequence | None = None,
    ) -> list[GenerationResult]:
        """Answer many requests, `batch_size` at a time (left padding); results in input order."""
        config = config or GenerationConfig()
        encoded = list(encoded) if encoded is not None else [self.encode(r) for r in requests]
        results: list[GenerationResult] = []
        tok = self.processor.tokenizer
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            inputs = self._batch_inputs(chunk)
            if config.seed is not None:
                torch.manual_seed(config.seed)
            with self.lock:
                out = self.model.generate(**inputs, **self._hf_kwargs(config))
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            for e, row in zip(chunk, new_tokens):
                row = row.tolist()
                ended = tok.eos_token_id in row
                if ended:
                    row = row[: row.index(tok.eos_token_id)]
                else:
                    row = [t for t in row if t != tok.pad_token_id]
                text = tok.decode(row, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, config.stop)
                results.append(
                    GenerationResult(
                        text=text,
                        prompt_tokens=len(e.input_ids),
                        completion_tokens=len(row) + (1 if ended else 0),
                        finish_reason="stop" if (ended or stopped) else "length",
                    )
                )
        return results

    def chat(self, image, question: str, history: Sequence[tuple[str, str]] = (), **generation_kwargs) -> str:
        """One answer about one image (or None for text only); generation_kwargs as GenerationConfig."""
        images = [] if image is None else [image]
        request = GenerationRequest(self.question_messages(question, len(images), history), images)
        return self.generate([request], GenerationConfig(**generation_kwargs))[0].text

    def stream(self, request: GenerationRequest, config: GenerationConfig | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (transformers' TextIteratorStreamer)."""
        from transformers import TextIteratorStreamer

        config = config or GenerationConfig()
        tok = self.processor.tokenizer
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        inputs = self._batch_inputs([self.encode(request)])
        errors: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode(), self.lock:
                    self.model.generate(**inputs, **self._hf_kwargs(config), streamer=streamer)
            except BaseException as err:  # surfaced to the consumer below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted = ""
        for piece in streamer:
            text, stopped = cut_at_stop(emitted + piece, config.stop)
            if text[len(emitted) :]:
                yield text[len(emitted) :]
            emitted = text
            if stopped:
                break
        thread.join()
        if errors:
            raise errors[0]
