"""Training samples: LLaVA-format records -> (input_ids, labels, pixel_values), lazily.

The path of one sample::

    DataSource (records.py: JSON / JSONL / HF dataset / parquet)
      -> record index (record_index.py: byte offsets, built once by a scan that validates the schema)
      -> ConversationDataset[i]: parse one record, load its images, encode with the chat template,
         truncate -> sample dict, or a SkippedRecord for a broken record (never an exception)
      -> DataCollator (collate.py): pad a batch, collect the SkippedRecords under "skipped"
      -> SkipTracker (skips.py, main process): skipped.jsonl, warnings, stop above --max-bad-fraction

`ModalityLengthGroupedSampler` (sampler.py) orders the samples by modality and length.

Using it with the HF Trainer: pass ``remove_unused_columns=False`` (the dataset yields plain dicts)
and pop ``"skipped"`` from the batch (feed it to a `SkipTracker`) before the model's forward.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, ImageError, TemplateError
from .cached_images import CachedImage
from .constants import ASSISTANT_ROLES, IGNORE_INDEX, IMAGE_TOKEN, TEMPLATE_NAMES, USER_ROLES
from .language_check import check_language, japanese_fraction
from .records import DataSource, RecordIndex, open_source
from .skips import (
    BAD_CONVERSATION,
    BAD_IMAGE,
    BAD_TURN,
    EMPTY_CONVERSATION,
    IMAGE_OUTSIDE_ROOT,
    MISSING_IMAGE,
    NO_LABELS,
    TAG_MISMATCH,
    TOO_LONG_IMAGE,
    TOO_LONG_NO_LABELS,
    UNREADABLE_RECORD,
    WRONG_ROLE,
    SkippedRecord,
)

if TYPE_CHECKING:  # the processor is used by duck type: data/ never imports model/
    from ..model.processing import ConvLlavaProcessor

logger = logging.getLogger(__name__)

__all__ = ["ConversationDataset", "japanese_fraction"]

_MEMO_TOKENS = 32 * 1024 * 1024  # records x max_length at most: 512 MiB of ids and labels


class _Skip(Exception):
    """Internal: carries a skip reason out of the nested checks of `__getitem__`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class ConversationDataset(Dataset):
    """LLaVA records -> tokenized samples, lazily, one record parsed per access.

    Args:
        sources: one or more `DataSource`s (a path is accepted for a default source).
        processor: a `ConvLlavaProcessor` or anything with its ``tokenizer``, ``image_token_id``,
            ``image_processor`` (``image_size``, ``num_image_tokens``), ``preprocess_images`` and
            ``encode_conversation`` (which builds each sample).
        template: chat template name, ``"plain"`` (stages 1-2) or ``"llm-jp-v1"`` (stage 3).
        max_length: samples are cut to this many tokens (never through image placeholders).
        min_japanese_fraction: warn when a source's sampled assistant text has a smaller share of
            Japanese letters (0 turns the check off).

    ``dataset[i]`` is ``{"input_ids": list[int], "labels": list[int], "pixel_values": list of
    (3, H, W) tensors}`` or a `SkippedRecord` for a broken record (never an exception for one).

    Raises (at construction): DataError for a missing file, malformed JSON, a record that is not a
    LLaVA record (file and line); ConfigError for an unknown template or a bad max_length.
    """

    def __init__(
        self,
        sources: DataSource | str | os.PathLike | Sequence[DataSource | str | os.PathLike],
        processor: ConvLlavaProcessor,
        template: str,
        max_length: int,
        *,
        min_japanese_fraction: float = 0.3,
    ) -> None:
        check_template = getattr(processor, "check_template", None)  # names, files, {% generation %}
        if check_template is not None:
            try:
                check_template(template, training=True)
            except TemplateError as exc:
                raise ConfigError(str(exc)) from exc
        elif template not in TEMPLATE_NAMES:
            raise ConfigError(f"unknown chat template {template!r}; choose from {', '.join(TEMPLATE_NAMES)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(sources, (DataSource, str, os.PathLike)):
            sources = [sources]
        self.sources = [s if isinstance(s, DataSource) else DataSource(s) for s in sources]
        if not self.sources:
            raise DataError("no data sources given")
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.image_token_id = processor.image_token_id
        # Image tokens one image takes at most (the length estimate; the feature cache's size).
        self.tokens_per_image = _max_image_tokens(processor)
        # Image file -> its cached vision features (`train.feature_cache`); None: load every image.
        self.image_cache: dict[str, CachedImage] | None = None
        # Samples whose images are all cached are pure functions of their record: encoded once
        # (the chat template and tokenizer cost more than the step of a small model), when all
        # of them fit in _MEMO_TOKENS tokens.
        self._memo: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, list[CachedImage]]] = {}

        self._indexes: list[RecordIndex] = []
        for source in self.sources:
            index = open_source(source)
            if not len(index):
                logger.warning("%s: no records", index.name)
            logger.info("%s: %d records (x%d)", index.name, len(index), source.repeat)
            self._indexes.append(index)
        sizes = [len(ix) * s.repeat for ix, s in zip(self._indexes, self.sources)]
        self._ends = np.cumsum(sizes, dtype=np.int64)
        if not len(self):
            raise DataError(f"no records in {', '.join(str(s.path) for s in self.sources)}")
        self._memo_fits = sum(len(ix) for ix in self._indexes) * max_length <= _MEMO_TOKENS
        if min_japanese_fraction > 0:
            for source, index in zip(self.sources, self._indexes):
                check_language(source, index, min_japanese_fraction)

    # --- size and lengths --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def lengths(self) -> list[int]:
        """Per-sample modality length, LLaVA's convention: > 0 with images, < 0 text-only.

        The magnitude is an estimate made in the index scan without opening any image: characters
        of text (about one token each for Japanese) + image tokens per image (the most the image
        processor can make), at least 1.
        """
        parts = []
        for source, index in zip(self.sources, self._indexes):
            text = index.text_chars.astype(np.int64)
            magnitude = np.maximum(text + index.image_counts.astype(np.int64) * self.tokens_per_image, 1)
            signed = np.where(index.image_counts > 0, magnitude, -magnitude)
            parts.append(np.tile(signed, source.repeat))
        return np.concatenate(parts).tolist()

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return k, (i - start) % len(self._indexes[k])

    # --- samples -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        k, local = self._locate(i)
        memo = self._memo.get((k, local))
        if memo is not None:
            return {"input_ids": memo[0].tolist(), "labels": memo[1].tolist(), "pixel_values": list(memo[2])}
        index, source = self._indexes[k], self.sources[k]
        record_id: str | None = None
        try:
            try:
                record = index.record(local)
            except Exception as exc:  # the file changed since the scan, or a disk error
                raise _Skip(UNREADABLE_RECORD, f"{type(exc).__name__}: {exc}") from exc
            if record.get("id") is not None:
                record_id = str(record["id"])
            sample = self._encode(record, source)
        except _Skip as skip:
            return SkippedRecord(index.name, index.line(local), record_id, skip.reason, skip.detail)
        self._remember((k, local), sample)
        return sample

    def _remember(self, key: tuple[int, int], sample: dict[str, Any]) -> None:
        images = sample["pixel_values"]
        if not self._memo_fits or self.image_cache is None or not images:
            return
        if not all(isinstance(p, CachedImage) for p in images):
            return
        ids, labels = sample["input_ids"], sample["labels"]
        self._memo[key] = (np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), list(images))

    def _encode(self, record: dict, source: DataSource) -> dict[str, Any]:
        """One record -> sample dict; raises _Skip for anything that makes the record unusable."""
        if "conversations" not in record and isinstance(record.get("text"), str):
            return self._encode_text_record(record["text"])
        turns = _turns(record.get("conversations"), source.text_field)
        images = _image_list(record.get("image"))
        n_tags = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        if images and n_tags == 0:
            # As LLaVA: a record with an image but no tag gets it in front of the first user turn.
            first_user = next(t for t in turns if t["from"] in USER_ROLES)
            first_user["value"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["value"]
            n_tags = len(images)
        if n_tags != len(images):
            raise _Skip(TAG_MISMATCH, f"{n_tags} {IMAGE_TOKEN} tags but {len(images)} images")
        pixel_values = self._load_images(images, source)
        try:
            encoded = self.processor.encode_conversation(
                turns, pixel_values=pixel_values, template=self.template
            )
        except TemplateError as exc:
            raise _Skip(BAD_CONVERSATION, str(exc)) from exc
        input_ids, labels = encoded.input_ids, encoded.labels
        if all(label == IGNORE_INDEX for label in labels):
            raise _Skip(NO_LABELS, "no assistant reply to learn from")
        if len(input_ids) > self.max_length:
            # Keep the first max_length tokens; a cut inside or before an image's placeholders
            # would leave image features without a place, so such a sample is dropped instead.
            if self.image_token_id in input_ids[self.max_length :]:
                raise _Skip(TOO_LONG_IMAGE, f"{len(input_ids)} tokens > max_length {self.max_length}")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise _Skip(TOO_LONG_NO_LABELS, f"{len(encoded.input_ids)} tokens > {self.max_length}")
        return {"input_ids": input_ids, "labels": labels, "pixel_values": encoded.pixel_values}

    def _encode_text_record(self, text: str) -> dict[str, Any]:
        """A `{"text": ...}` record: the text + EOS, all supervised (LLM pretraining data)."""
        if not text.strip():
            raise _Skip(EMPTY_CONVERSATION, "empty text")
        tokenizer = self.processor.tokenizer
        input_ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if self.image_token_id in input_ids:
            raise _Skip(TAG_MISMATCH, f"a text record contains {IMAGE_TOKEN}")
        input_ids = input_ids[: self.max_length]
        return {"input_ids": input_ids, "labels": list(input_ids), "pixel_values": []}

    def _load_images(self, images: list[Any], source: DataSource) -> list[torch.Tensor]:
        resolved = []
        for image in images:
            if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes", "path"}
                if image.get("bytes"):
                    resolved.append(image["bytes"])
                    continue
                image = image.get("path")
            if isinstance(image, str) and image:
                try:
                    path = source.image_path(image)
                except DataError as exc:
                    raise _Skip(IMAGE_OUTSIDE_ROOT, str(exc)) from None
                if not path.is_file():
                    raise _Skip(MISSING_IMAGE, f"{path}: no such image file")
                resolved.append(str(path))
            elif image is not None and not isinstance(image, str):
                resolved.append(image)  # e.g. a PIL image from a custom dataset
            else:
                raise _Skip(MISSING_IMAGE, f"empty image entry {image!r}")
        cache = self.image_cache or {}
        cached = [isinstance(r, str) and r in cache for r in resolved]
        try:
            loaded = iter(self.processor.preprocess_images([r for r, c in zip(resolved, cached) if not c]))
        except ImageError as exc:
            raise _Skip(BAD_IMAGE, str(exc)) from exc
        return [cache[r] if c else next(loaded) for r, c in zip(resolved, cached)]

    def image_files(self) -> list[str]:
        """Every image file the records name (resolved paths, each once, in order of first use).

        For caching what the frozen vision tower makes of each image. Records that cannot be
        read or parsed, and images given as bytes or missing files, are left out: the dataset
        reports those when it meets them.
        """
        seen: dict[str, None] = {}
        for source, index in zip(self.sources, self._indexes):
            for local in range(len(index)):
                try:
                    images = _image_list(index.record(local).get("image"))
                except Exception:  # reported as unreadable when the sample is used
                    continue
                for image in images:
                    if isinstance(image, dict):
                        image = None if image.get("bytes") else image.get("path")
                    if not isinstance(image, str) or not image:
                        continue
                    try:
                        path = str(source.image_path(image))
                    except DataError:
                        continue
                    if path not in seen and os.path.isfile(path):
                        seen[path] = None
        return list(seen)


def _max_image_tokens(processor: ConvLlavaProcessor) -> int:
    """Image tokens per image for the length estimate: the most the image processor makes."""
    image_processor = processor.image_processor
    size = image_processor.image_size
    long_side = max(size) if isinstance(size, (list, tuple)) else size
    return int(image_processor.num_image_tokens(long_side, long_side))


def _turns(conversations: Any, text_field: str) -> list[dict]:
    """Validate roles and text; return fresh ``{"from", "value"}`` turns (text from text_field)."""
    if not isinstance(conversations, list) or not conversations:
        raise _Skip(EMPTY_CONVERSATION, "no turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Skip(BAD_TURN, f"turn {k} is a {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get(text_field)
        if not isinstance(text, str):
            raise _Skip(BAD_TURN, f"turn {k} has no {text_field!r} text")
        turns.append({"from": role, "value": text})
    roles = [t["from"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        raise _Skip(EMPTY_CONVERSATION, "only a system turn")
    for k, role in enumerate(body):
        expected = USER_ROLES if k % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            position = k + (len(roles) - len(body))
            raise _Skip(
                WRONG_ROLE,
                f"turn {position} is from {role!r}; expected {expected[0]!r} (turns alternate human/gpt)",
            )
    replies = [t["value"] for t in turns if t["from"] in ASSISTANT_ROLES]
    if not replies:
        raise _Skip(NO_LABELS, "no assistant reply to learn from")
    if not any(reply.strip() for reply in replies):
        raise _Skip(EMPTY_CONVERSATION, "every assistant reply is empty")
    return turns


def _image_list(image: Any) -> list[Any]:
    if image is None or (isinstance(image, str) and not image):
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]
