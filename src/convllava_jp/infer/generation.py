"""Generation API: load a model dir, ask about images, batched (left-padded) and streamed.

`VLMPipeline.generate` takes many requests and runs them in batches through transformers'
`generate`; `chat` is the one-image, one-question convenience; `stream` yields text pieces as they
are decoded (`streaming.py`, through `decoding.IncrementalDecoder` as the server's batcher does).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.collate import pad_sequences
from ..data.constants import IMAGE_TOKEN
from ..errors import ConfigError
from ..model.processing import EncodedConversation
from ..model.templates import split_content_parts
from .decoding import byte_fallback_ids, cut_at_stop

log = logging.getLogger(__name__)

History = Sequence[tuple[str, str]]
TEMPERATURE_FLOOR = 0.01  # below it decoding is greedy: scores / ~0 overflow to inf, softmax to NaN


@dataclass
class GenerationConfig:
    """Decoding settings; temperature 0 means greedy.

    A temperature below `TEMPERATURE_FLOOR` also decodes greedily (dividing by ~0 overflows the
    scores). `stop`: strings that end the answer (not included in it). `seed`: in [0, 2**64),
    makes sampling repeatable.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]

    def validate(self) -> GenerationConfig:
        """Raise ConfigError on values no sampler accepts; returns self."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise ConfigError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.01 <= self.repetition_penalty <= 100:
            raise ConfigError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64
        ):
            raise ConfigError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a list of strings, got {self.stop!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    def to_hf(self) -> dict:
        """Keyword arguments for transformers' `generate` (stop strings are added by the pipeline)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if not self.greedy:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationRequest:
    """A conversation (role/content turns, `<image>` tags in the text) and its images in tag order.

    A turn's content may also be a list of OpenAI-style parts ({"type": "text", "text": ...},
    {"type": "image", "image": ...}, {"type": "image_url", "image_url": {"url": ...}}), in any order.

    Images are anything `load_image` takes: paths, bytes, file objects or PIL images.
    """

    messages: list[dict]
    images: list = field(default_factory=list)

    def __post_init__(self) -> None:
        # OpenAI-style content lists: image parts become <image> tags in place, their images join `images`.
        self.messages, self.images = split_content_parts(self.messages, self.images or [])


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda if available, else mps, else cpu; anything else as given."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


class VLMPipeline:
    """A model + processor ready to answer; one `generate` runs at a time (`lock`)."""

    def __init__(self, model, processor, template: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.template = template or processor.default_template()
        self.lock = threading.Lock()
        self.byte_ids = byte_fallback_ids(processor.tokenizer)
        self.stop_token_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        """EOS, the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`...) and the generation
        config's EOS ids; written back into `model.generation_config.eos_token_id` for every path."""
        ids = list(self.processor.stop_token_ids(self.template))
        config = getattr(self.model, "generation_config", None)
        configured = getattr(config, "eos_token_id", None)
        for i in configured if isinstance(configured, (list, tuple)) else [configured]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        if config is not None and ids:
            config.eos_token_id = ids
        return ids

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        template: str | None = None,
    ) -> VLMPipeline:
        """Load a model directory (`save_model_dir` layout).

        Args:
            device: "cpu", "cuda", "cuda:1", "mps" or "auto".
            dtype: "float32", "bfloat16", "float16" (or a torch dtype); None keeps the saved one;
                "auto" is bfloat16 where the device has native bf16, else the saved one. bfloat16 /
                float16 on the CPU also take the CPU fast path (`model.fast_inference`).
            template: chat template the prompts are rendered with; default: the one the model's
                last chat stage was trained with (recorded in the dir), else `llm-jp-v1`.
        """
        from ..model.fast_inference import prepare_cpu_inference
        from ..model.model_dir import load_model_dir

        model, processor = load_model_dir(model_dir, device=resolve_device(device), dtype=dtype)
        fast = prepare_cpu_inference(model)
        log.info(
            "loaded %s on %s (%s%s)", model_dir, model.device, model.dtype, ", CPU fast path" if fast else ""
        )
        return cls(model, processor, template)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + answer) the language model takes."""
        cfg = self.model.config.text_config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    # --- prompts -----------------------------------------------------------------------------
    @staticmethod
    def question_messages(question: str, n_images: int = 1, history: History | None = ()) -> list[dict]:
        """Turns for a question; history is (question, answer) pairs of earlier turns.

        The images' `<image>` tags go first in the first user turn, as in training.
        """
        messages: list[dict] = []
        for q, a in history or ():
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prefix = (IMAGE_TOKEN + "\n") * n_images if n_images and IMAGE_TOKEN not in question else ""
        if messages and prefix:
            messages[0]["content"] = prefix + messages[0]["content"]
            prefix = ""
        messages.append({"role": "user", "content": prefix + question})
        return messages

    def encode(self, request: GenerationRequest) -> EncodedConversation:
        """Tokenize a request and preprocess its images (raises ImageError / TemplateError)."""
        return self.processor.encode_conversation(
            request.messages, images=request.images, template=self.template, add_generation_prompt=True
        )

    def check_fits(self, encoded: EncodedConversation, config: GenerationConfig) -> None:
        """Raise ConfigError when prompt + max_new_tokens does not fit the context window."""
        n = len(encoded.input_ids)
        if n + config.max_new_tokens > self.max_context:
            raise ConfigError(
                f"the prompt has {n} tokens and max_new_tokens is {config.max_new_tokens}: together "
                f"more than the model's context of {self.max_context} tokens; ask for at most "
                f"{max(self.max_context - n, 0)} new tokens or shorten the conversation"
            )

    # --- generation --------------------------------------------------------------------------
    def batch_inputs(self, encoded: Sequence[EncodedConversation]) -> dict:
        """Left-padded input_ids / attention_mask (B, T) and pixel_values on the model's device."""
        ids, mask = pad_sequences([e.input_ids for e in encoded], self.tokenizer.pad_token_id, "left")
        inputs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        images = [p for e in encoded for p in e.pixel_values]
        if images:
            dtype = self.model.dtype
            if len({tuple(p.shape) for p in images}) == 1:
                inputs["pixel_values"] = torch.stack(images).to(self.device, dtype)
            else:
                inputs["pixel_values"] = [p.to(self.device, dtype) for p in images]
        return inputs

    def _hf_kwargs(self, config: GenerationConfig) -> dict:
        tok = self.tokenizer
        kwargs = config.to_hf()
        # The model's generation config carries `suppress_tokens` (the image placeholder is never
        # generated); the request's settings override the rest of it.
        kwargs.update(
            generation_config=self.model.generation_config,
            eos_token_id=self.stop_token_ids,
            pad_token_id=tok.pad_token_id,
        )
        if config.stop:
            # Ends a row as soon as its text contains a stop string; the text is cut afterwards.
            kwargs.update(stop_strings=list(config.stop), tokenizer=tok)
        return kwargs

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        config: GenerationConfig | None = None,
        batch_size: int = 8,
        encoded: Sequence[EncodedConversation] | None = None,
    ) -> list[GenerationResult]:
        """Answer many requests, `batch_size` at a time (left padding); results in input order.

        `encoded` (from `encode`) skips tokenizing and image preprocessing again.
        """
        config = (config or GenerationConfig()).validate()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        encoded = list(encoded) if encoded is not None else [self.encode(r) for r in requests]
        for e in encoded:
            self.check_fits(e, config)
        results: list[GenerationResult] = []
        tok = self.tokenizer
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            inputs = self.batch_inputs(chunk)
            with self.lock:
                if config.seed is not None:
                    torch.manual_seed(config.seed)
                out = self.model.generate(**inputs, **self._hf_kwargs(config))
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            for e, row in zip(chunk, new_tokens):
                row = row.tolist()
                end = next((i for i, t in enumerate(row) if t in self.stop_token_ids), None)
                ended = end is not None
                if ended:
                    row = row[:end]
                elif config.stop:
                    # rows that met a stop string are padded to the batch's length
                    while row and row[-1] == tok.pad_token_id:
                        row.pop()
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

    def chat(self, image, question: str, history: History | None = None, **generation_kwargs) -> str:
        """One answer about one image (None: text only); generation_kwargs as GenerationConfig.

        `history`: earlier (question, answer) pairs of the same conversation about this image.
        """
        images = [] if image is None else [image]
        request = GenerationRequest(self.question_messages(question, len(images), history), images)
        return self.generate([request], GenerationConfig(**generation_kwargs))[0].text

    def chat_batch(
        self,
        pairs: Sequence[tuple[Any, str]],
        batch_size: int = 8,
        **generation_kwargs,
    ) -> list[str]:
        """Answers to many (image, question) pairs (image None: text only), `batch_size` at a time."""
        requests = [
            GenerationRequest(
                self.question_messages(q, 0 if image is None else 1), [] if image is None else [image]
            )
            for image, q in pairs
        ]
        results = self.generate(requests, GenerationConfig(**generation_kwargs), batch_size=batch_size)
        return [r.text for r in results]

    def chat_stream(
        self, image, question: str, history: History | None = None, **generation_kwargs
    ) -> Iterator[str]:
        """`chat`, streamed: yields text pieces that concatenate to `chat`'s answer."""
        images = [] if image is None else [image]
        request = GenerationRequest(self.question_messages(question, len(images), history), images)
        return self.stream(request, GenerationConfig(**generation_kwargs))

    def stream(self, request: GenerationRequest, config: GenerationConfig | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; they concatenate to `generate`'s text.

        Generation runs in a background thread, the image's preprocessing included, with the
        caller's torch thread count: the caller's thread then runs no parallel op, and holds no
        OpenMP team beside the generating one (compute_threads.py). Leaving the loop early stops
        it after one step.
        """
        from .streaming import stream_pieces

        return stream_pieces(self, request, (config or GenerationConfig()).validate())
