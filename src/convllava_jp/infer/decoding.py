"""Token ids to text while they are generated: stop strings cut, incomplete UTF-8 held back.

`IncrementalDecoder` turns token ids into text pieces whose concatenation is exactly the text
`generate` returns; the pipeline's `stream` and the server's continuous batcher both use it, so
streamed and non-streamed answers agree.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string; (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of byte-fallback tokens (`<0xE3>`): their text is incomplete until the bytes form a character."""
    return frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.match(t))


class IncrementalDecoder:
    """Token ids in, text pieces out; the pieces concatenate to `text` at the end.

    Emits only the part of the answer's text that can no longer change: text made of a trailing run
    of byte-fallback tokens, or ending in U+FFFD, may still become a different character, and a
    tail that could begin a stop string may still be cut. `stopped` turns true when a stop string
    appears; `finish()` flushes the rest.

    The text is not decoded whole at every token (quadratic in the answer's length): the ids up to
    a boundary where the text is complete are kept as text, and only the ids after it are decoded,
    with a few visible tokens before it as context (what a tokenizer needs to render the first
    tokens of a sequence as in the middle of one: sentencepiece's leading space, byte runs). The
    boundary moves every `window` tokens; at 64, 128, 256... ids the kept text is checked against a
    whole decode, and a tokenizer whose text does not split this way is decoded whole from then on.
    """

    window: int | None = 32  # None: decode the whole answer at every token
    context = 4  # visible tokens decoded before the boundary

    def __init__(self, tokenizer, stop: Sequence[str] = (), byte_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.byte_ids = byte_fallback_ids(tokenizer) if byte_ids is None else byte_ids
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self.text = ""
        self._in_byte_run = False  # last visible token is a byte token (special ones are skipped)
        self._whole = self.window is None
        self._kept = 0  # ids[:_kept] are decoded in _kept_text
        self._kept_text = ""
        self._start = 0  # the ids decoded at each token: ids[_start:], context included
        self._context_text = ""  # the text of ids[_start:_kept]
        self._next_check = 64

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode(self) -> str:
        """The text of all the ids so far."""
        if self._whole:
            return self._decode_ids(self.ids)
        tail = self._decode_ids(self.ids[self._start :])
        if not tail.startswith(self._context_text):
            log.debug(
                "context %r is not a prefix of %r: decoding whole from now on", self._context_text, tail
            )
            self._whole = True
            return self._decode_ids(self.ids)
        return self._kept_text + tail[len(self._context_text) :]

    def _keep(self, text: str) -> None:
        """Move the boundary to the end when `text` (of all the ids) is complete there."""
        n = len(self.ids)
        if self._whole or n - self._kept < self.window or self._in_byte_run or text.endswith("\ufffd"):
            return
        if n >= self._next_check:
            self._next_check *= 2
            if self._decode_ids(self.ids) != text:
                log.debug("the kept text differs from a whole decode: decoding whole from now on")
                self._whole = True
                return
        start, visible = n, 0
        while start > 0 and visible < self.context:
            start -= 1
            visible += self.ids[start] not in self.special_ids
        self._kept, self._kept_text = n, text
        self._start, self._context_text = start, self._decode_ids(self.ids[start:n])

    def add(self, token_id: int) -> str:
        """Feed one generated id (not EOS); returns the new text piece, maybe ''."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id not in self.special_ids:
            self._in_byte_run = token_id in self.byte_ids
        whole = self._decode()
        self._keep(whole)
        text, found = cut_at_stop(whole, self.stop)
        if found:
            self.stopped = True
            return self._advance(text)
        if self._in_byte_run:
            # A byte run decodes as one group: one bad byte later turns all of it into U+FFFD.
            return ""
        safe = text.rstrip("\ufffd")
        for k in range(min(len(safe), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(safe[-k:]) for s in self.stop):
                safe = safe[:-k]
                break
        return self._advance(safe)

    def _advance(self, text: str) -> str:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece = text[len(self.emitted) :]
            self.emitted = text
            return piece
        return ""

    def finish(self) -> str:
        """The last piece; afterwards `text` is the whole answer (stop string cut), decoded whole."""
        self.text = cut_at_stop(self._decode_ids(self.ids), self.stop)[0]
        if not self.text.startswith(self.emitted):
            # Only a tokenizer whose decoding of a prefix is not a prefix of the whole gets here.
            log.warning("streamed text %r is not a prefix of the final answer %r", self.emitted, self.text)
            return ""
        piece = self.text[len(self.emitted) :]
        self.emitted = self.text
        return piece
