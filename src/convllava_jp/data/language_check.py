"""Is a data source's text Japanese? A sampled check of its assistant replies, at dataset construction.

A set that keeps its Japanese under another key than the one read (an English `value` beside a
Japanese `value_ja`, say) would otherwise train a Japanese model on English without a word.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from .constants import ASSISTANT_ROLES
from .records import DataSource, RecordIndex

logger = logging.getLogger(__name__)

_LANGUAGE_SAMPLE = 200
# Hiragana, katakana (+ phonetic extensions, half-width), CJK ideographs (+ ext. A, compat.), 々.
_JAPANESE_CHAR = re.compile(
    r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\u3005]"
)


def japanese_fraction(text: str) -> float | None:
    """Share of letters in ``text`` that are hiragana, katakana or CJK ideographs (None: no letters)."""
    letters = sum(1 for ch in text if ch.isalpha())
    if not letters:
        return None
    return len(_JAPANESE_CHAR.findall(text)) / letters


def check_language(source: DataSource, index: RecordIndex, minimum: float) -> None:
    """Warn when a source's sampled assistant text has less than `minimum` Japanese letters."""
    n = len(index)
    if not n:
        return
    picks = np.unique(np.linspace(0, n - 1, min(n, _LANGUAGE_SAMPLE)).astype(np.int64))
    texts: list[str] = []
    other_fields: set[str] = set()
    for j in picks:
        try:
            record = index.record(int(j))
        except Exception:  # an unreadable record is reported when it is used
            continue
        if isinstance(record.get("text"), str) and "conversations" not in record:
            texts.append(record["text"])
            continue
        turns = record.get("conversations") or []
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            if turn.get("from", turn.get("role")) in ASSISTANT_ROLES:
                text = turn.get(source.text_field)
                if isinstance(text, str):
                    texts.append(text)
            other_fields.update(
                k
                for k, v in turn.items()
                if isinstance(v, str) and k not in ("from", "role", source.text_field)
            )
    fraction = japanese_fraction("".join(texts))
    if fraction is not None and fraction < minimum:
        hint = f" Other text fields in its turns: {', '.join(sorted(other_fields))}." if other_fields else ""
        logger.warning(
            "%s: only %.0f%% of the letters in the assistant replies (text_field=%r, %d records "
            "sampled) are Japanese, below min_japanese_fraction=%.2f. If this set keeps its "
            "Japanese text under another key, set text_field.%s",
            index.name,
            100 * fraction,
            source.text_field,
            len(picks),
            minimum,
            hint,
        )
