"""`ConvLlavaProcessor`: text + images -> `input_ids` (image tags expanded), `labels`, `pixel_values`.

Each `<image>` tag becomes N placeholder ids, N = `image_token_count` of that image's size after
preprocessing ((H / stride) * (W / stride)). Conversations are tokenized segment by segment (see `templates.segments`),
so the ids of a prompt are the same in training and at inference, and `labels` supervise exactly
the assistant replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import BatchFeature, ProcessorMixin

from ..data.collate import pad_sequences, stack_images
from ..data.constants import IGNORE_INDEX, IMAGE_TOKEN
from ..data.images import image_token_count
from ..errors import TemplateError
from .templates import JINJA_TEMPLATES, segments


@dataclass
class EncodedConversation:
    """One tokenized sample: `input_ids` / `labels` of length T, `pixel_values` one (3, H, W) per image."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor]


class ConvLlavaProcessor(ProcessorMixin):
    """Tokenizer + `ConvLlavaImageProcessor`, saved and loaded together (`AutoProcessor` works)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    # --- ids ---------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise TemplateError(f"the tokenizer has no {IMAGE_TOKEN} token; add it with add_image_token()")
        return token_id

    @property
    def stride(self) -> int:
        return self.image_processor.stride

    def _encode_text(self, text: str, image_counts: Iterable[int]) -> list[int]:
        """Tokenize `text`, replacing each `<image>` with its placeholder run."""
        counts = iter(image_counts)
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                n = next(counts, None)
                if n is None:
                    raise TemplateError(f"more {IMAGE_TOKEN} tags than images in the text")
                ids += [self.image_token_id] * n
            if piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    def preprocess_images(self, images: Sequence) -> list[torch.Tensor]:
        """Images (paths, bytes, PIL) -> list of (3, H, W) tensors."""
        if not images:
            return []
        out = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return list(out)

    def _image_tokens(self, pixel_values: torch.Tensor) -> int:
        """Placeholder ids one preprocessed (3, H, W) image takes (`image_token_count` of its size)."""
        height, width = pixel_values.shape[-2:]
        return image_token_count(int(height), int(width), self.stride)

    def encode_conversation(
        self,
        messages: Sequence[dict],
        images: Sequence = (),
        template: str = "llm-jp-v1",
        add_generation_prompt: bool = False,
        pixel_values: Sequence[torch.Tensor] | None = None,
    ) -> EncodedConversation:
        """A conversation (LLaVA `from`/`value` or `role`/`content` turns) -> ids, labels, images.

        Images are given raw (`images`) or already preprocessed (`pixel_values`), one per
        `<image>` tag in order. A count mismatch raises TemplateError.
        """
        if pixel_values is None:
            pixel_values = self.preprocess_images(images)
        pixel_values = list(pixel_values)
        counts = [self._image_tokens(p) for p in pixel_values]
        n_tags = sum(
            (m.get("content", m.get("value")) or "").count(IMAGE_TOKEN)
            for m in messages
            if isinstance(m.get("content", m.get("value")), str)
        )
        if n_tags != len(counts):
            raise TemplateError(
                f"conversation has {n_tags} {IMAGE_TOKEN} tags but {len(counts)} images were given"
            )
        count_iter = iter(counts)
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in segments(messages, template, self.tokenizer.eos_token, add_generation_prompt):
            n_images = seg.text.count(IMAGE_TOKEN)
            ids = self._encode_text(seg.text, [next(count_iter) for _ in range(n_images)])
            input_ids += ids
            if seg.supervised:
                labels += [IGNORE_INDEX if t == self.image_token_id else t for t in ids]
            else:
                labels += [IGNORE_INDEX] * len(ids)
        return EncodedConversation(input_ids, labels, pixel_values)

    def render(
        self, messages: Sequence[dict], template: str = "llm-jp-v1", add_generation_prompt: bool = False
    ) -> str:
        """The prompt string, as the tokenizer's Jinja chat template of that name renders it."""
        return "".join(
            s.text for s in segments(messages, template, self.tokenizer.eos_token, add_generation_prompt)
        )

    # --- batches -----------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        padding_side: str = "left",
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Rendered prompt text(s) with `<image>` tags + the images in tag order -> a padded batch.

        Returns input_ids / attention_mask (B, T) and pixel_values (`stack_images`: (N, 3, H, W)
        when all images share a size, else a list of N (3, H, W); absent without images), the one
        form `ConvLlavaForConditionalGeneration.forward` takes.
        """
        if text is None:
            raise TemplateError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values = self.preprocess_images(images or [])
        counts = iter([self._image_tokens(p) for p in pixel_values])
        encoded = []
        for t in texts:
            encoded.append(
                self._encode_text(t, [next(counts, None) or 0 for _ in range(t.count(IMAGE_TOKEN))])
            )
        if next(counts, None) is not None:
            raise TemplateError(f"more images than {IMAGE_TOKEN} tags in the text")
        batch = pad_sequences(encoded, self.tokenizer.pad_token_id, padding_side)
        data = {"input_ids": batch[0], "attention_mask": batch[1]}
        if pixel_values:
            data["pixel_values"] = stack_images(pixel_values)
        return BatchFeature(data, tensor_type=None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def add_image_token(tokenizer) -> int:
    """Add `<image>` as a special token and the named chat templates; returns the token's id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
    templates = dict(JINJA_TEMPLATES)
    templates["default"] = JINJA_TEMPLATES["llm-jp-v1"]
    if not isinstance(tokenizer.chat_template, dict):
        tokenizer.chat_template = templates
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
