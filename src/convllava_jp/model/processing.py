"""`ConvLlavaProcessor`: text + images -> `input_ids` (image tags expanded), `labels`, `pixel_values`.

Each `<image>` tag becomes N placeholder ids, N = `image_token_count` of that image's size after
preprocessing ((H / stride) * (W / stride)). Conversations are tokenized segment by segment (see
`templates.segments`), so the ids of a prompt are the same in training and at inference, and
`labels` supervise exactly the template's `{% generation %}` blocks (the replies and their
end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import BatchFeature, ProcessorMixin

from ..data.collate import pad_sequences, stack_images
from ..data.constants import IGNORE_INDEX, IMAGE_TOKEN
from ..data.images import image_token_count
from ..errors import TemplateError
from .templates import (
    JINJA_TEMPLATES,
    LEGACY_TEMPLATES,
    TRAINED_TEMPLATE,
    check_trainable,
    end_of_turn_text,
    normalize_messages,
    segments,
    template_source,
    trained_template_name,
)


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
    def special_tokens(self) -> dict[str, str]:
        """The tokenizer's special token strings (`eos_token`, `bos_token`, ...) for the templates."""
        tok = self.tokenizer
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: getattr(tok, n) for n in names if isinstance(getattr(tok, n, None), str)}

    def template_source(self, template: str) -> str:
        """Jinja text of `template`: a built-in name, one of the tokenizer's named templates, a file."""
        return template_source(template, self.tokenizer.chat_template)

    def check_template(self, template: str, training: bool = False) -> None:
        """Raise TemplateError for an unknown template, or (training) one without generation blocks."""
        source = self.template_source(template)
        if training:
            check_trainable(source, template)
            if not end_of_turn_text(source, self.special_tokens):
                raise TemplateError(
                    f"chat template {template!r}: the {{% generation %}} block ends with the reply; put the "
                    "end-of-turn token (eos_token, '<|im_end|>', ...) inside it, or the model never learns to stop"
                )

    def default_template(self) -> str:
        """The template a chat stage recorded in this tokenizer (`trained_template_name`), else `llm-jp-v1`."""
        own = self.tokenizer.chat_template
        return trained_template_name(own.get(TRAINED_TEMPLATE) if isinstance(own, Mapping) else None)

    def record_trained_template(self, template: str) -> None:
        """Keep a chat stage's template in the tokenizer as `trained`, so the saved model dir is
        prompted the way it was trained (`plain`, the captioning template, is not recorded)."""
        if template == "plain":
            return
        source = self.template_source(template)
        own = self.tokenizer.chat_template
        named = dict(own) if isinstance(own, Mapping) else ({"default": own} if own else {})
        named[TRAINED_TEMPLATE] = source
        self.tokenizer.chat_template = named
        self.chat_template = named

    def stop_token_ids(self, template: str) -> list[int]:
        """Ids that end an answer: EOS and the template's end-of-turn token, when it is one token."""
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        text = end_of_turn_text(self.template_source(template), self.special_tokens).strip()
        if text:
            end = tok.encode(text, add_special_tokens=False)
            if len(end) == 1 and end[0] not in ids:
                ids.append(end[0])
        return ids

    @property
    def stride(self) -> int:
        return self.image_processor.stride

    def _encode_text(
        self, text: str, image_counts: Iterable[int], in_context: bool | None = None
    ) -> list[int]:
        """Tokenize `text`, replacing each `<image>` with its placeholder run.

        `in_context` (None: off): tokenize each piece as it tokenizes inside a longer text after a
        special token (`_encode_piece`); False does so only for the pieces after an `<image>`.
        """
        counts = iter(image_counts)
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                n = next(counts, None)
                if n is None:
                    raise TemplateError(f"more {IMAGE_TOKEN} tags than images in the text")
                ids += [self.image_token_id] * n
            if piece:
                ids += self._encode_piece(piece, in_context is not None and (in_context or i > 0))
        return ids

    def _encode_piece(self, piece: str, in_context: bool) -> list[int]:
        """Ids of `piece`; `in_context`: as after a special token (EOS, then dropped), so that a
        SentencePiece tokenizer adds no word-start marker a whole-text tokenization would not."""
        tok = self.tokenizer
        if in_context and tok.eos_token is not None:
            ids = tok.encode(tok.eos_token + piece, add_special_tokens=False)
            if ids and ids[0] == tok.eos_token_id:
                return ids[1:]
        return tok.encode(piece, add_special_tokens=False)

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
        messages = normalize_messages(messages)  # content lists -> text with <image> tags
        n_tags = sum((m["content"] or "").count(IMAGE_TOKEN) for m in messages)
        if n_tags != len(counts):
            raise TemplateError(
                f"conversation has {n_tags} {IMAGE_TOKEN} tags but {len(counts)} images were given"
            )
        pieces = segments(
            messages, template, self.special_tokens, add_generation_prompt, self.tokenizer.chat_template
        )
        rendered_tags = sum(s.text.count(IMAGE_TOKEN) for s in pieces)
        if rendered_tags != n_tags:
            raise TemplateError(
                f"chat template {template!r} renders {rendered_tags} of the conversation's {n_tags} "
                f"{IMAGE_TOKEN} tags (it drops or repeats a turn's text); put the images in user turns"
            )
        replies = any(m["role"] == "assistant" for m in messages)
        if replies and not add_generation_prompt and not any(s.supervised for s in pieces):
            check_trainable(self.template_source(template), template)
        # The article's templates tokenize each piece on its own (pinned); the others as inside the
        # whole rendered chat, so their ids are the LLM's own tokenization at special tokens.
        legacy = template in LEGACY_TEMPLATES
        count_iter = iter(counts)
        input_ids: list[int] = []
        labels: list[int] = []
        for k, seg in enumerate(pieces):
            n_images = seg.text.count(IMAGE_TOKEN)
            in_context = None if legacy else k > 0
            ids = self._encode_text(seg.text, [next(count_iter) for _ in range(n_images)], in_context)
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
        pieces = segments(
            messages, template, self.special_tokens, add_generation_prompt, self.tokenizer.chat_template
        )
        return "".join(s.text for s in pieces)

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
    """Add `<image>` as a special token and the named chat templates; returns the token's id.

    The tokenizer's own template (an instruct LLM's stock one) stays its `default`; without one the
    default is `llm-jp-v1`. Named templates it already has are kept.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
    own = tokenizer.chat_template
    templates = dict(JINJA_TEMPLATES)
    templates["default"] = own if isinstance(own, str) and own else JINJA_TEMPLATES["llm-jp-v1"]
    if isinstance(own, dict):
        templates = {**templates, **own}
    tokenizer.chat_template = templates
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
