"""Multiple-choice prompts and answer reading, and JMMMU's scorer, as eval-mm does them (our code).

eval-mm follows MMMU's reference evaluation with Japanese additions. Kept as it behaves, odd parts
included (docs/evaluation.md lists them): a bare letter followed by a space anywhere counts as a
choice ("DATA " names A); with several candidates the last-mentioned one wins; the open-answer cue
list lacks "回答は" on its own (a missing comma joins "解答は、" and "回答は"); "=" and "＝" count as
cues in every sentence (eval-mm adds them to a shared list on its first call and never removes them).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

__all__ = [
    "JMMMU_DOMAINS",
    "MULTI_CHOICE_PROMPT",
    "OPEN_ENDED_PROMPT",
    "choice_letters",
    "jmmmu_aggregate",
    "jmmmu_score",
    "options_prompt",
    "parse_choice",
    "parse_open",
]

MULTI_CHOICE_PROMPT = "与えられた選択肢の中から最も適切な回答のアルファベットを直接記入してください。"
OPEN_ENDED_PROMPT = "質問に対する回答を単語や短いフレーズで記入してください。"


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def options_prompt(question: str, options: Sequence[str]) -> str:
    """`question`, one "A. option" line per option, a blank line, then the instruction to answer a letter."""
    lines = "\n".join(f"{letter}. {opt}" for letter, opt in zip(choice_letters(len(options)), options))
    return f"{question}\n{lines}\n\n{MULTI_CHOICE_PROMPT}"


_EDGE_PUNCT = (",", ".", "!", "?", ";", ":", "'", "、", "。", "！", "？", "；", "：")
_JA_CHAR = "[\u3040-\u30ff\u4e00-\u9fff]"


def parse_choice(response: str, options: Sequence[str]) -> str | None:
    """The letter an answer picks among `options`, or None (eval-mm with random_choice off)."""
    letters = choice_letters(len(options))
    for char in _EDGE_PUNCT:  # one character kind at a time, in this order
        response = response.strip(char)
    text = f" {response} "
    bracketed = [c for c in letters if f"({c})" in text]
    candidates = bracketed or [c for c in letters if f"{c} " in text]
    if not candidates:
        candidates = [c for c in letters if re.search(f"{_JA_CHAR}{c}{_JA_CHAR}", text)]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in text]
    by_content = False
    if not candidates and len(text.split()) > 5:
        candidates = [c for c, opt in zip(letters, options) if opt.lower() in text.lower()]
        by_content = bool(candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        where = [text.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    elif bracketed:
        where = [text.rfind(f"({c})") for c in candidates]
    else:
        where = [text.rfind(f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]  # the first of equal positions, as argmax


_OPEN_CUES = [
    "よって",
    "よって、",
    "答えは",
    "答えは、",
    "最終的に",
    "最終的に、",
    "解答は",
    "解答は、回答は",
    "回答は、",
    "＝",
    "=",
]
_CUE_PUNCT = {",", ".", "!", "?", ";", ":", "'", "、", "。", "！", "？", "；", "："}
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])"),
    re.compile(r"(\d+)(?:つ|個|度|円|人|年|匹|台|%)"),
)


def _numbers(text: str) -> list[str]:
    return [m for p in _NUMBER_PATTERNS for m in p.findall(text)]


def _normalized(text: str) -> list[Any]:
    """A number (commas dropped, rounded to 2 places) or lower-cased text; one letter padded both ways."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_parts(response: str) -> list[str]:
    response = response.strip().strip("。")
    parts = []
    for sentence in re.split(r"[。！？.]\s*|\n", response):
        shortest = ""
        for cue in _OPEN_CUES:
            if cue in sentence:
                tail = sentence.split(cue)[-1].strip()
                # eval-mm's rule: an empty pick is replaced by the next tail; a shorter tail
                # (an empty one too) replaces a non-empty pick.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _CUE_PUNCT:
            parts.append(shortest)
    return parts or [response]


def parse_open(response: str) -> list[Any]:
    """The candidate answers in a free-form reply: cue tails, the numbers in them, normalised, deduplicated."""
    parts = _key_parts(response)
    found = parts + [n for p in parts for n in _numbers(p)]
    out: list[Any] = []
    for item in found:
        for value in _normalized(item):
            if value not in out:
                out.append(value)
    return out


def _open_correct(answer: Any, predicted: list[Any]) -> bool:
    golds: list[Any] = []
    for a in answer if isinstance(answer, list) else [answer]:
        golds.extend(_normalized(str(a)))
    for pred in predicted:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def _options(value: Any) -> list[str]:
    if isinstance(value, str):  # the hub stores the list as its Python repr
        value = ast.literal_eval(value)
    return [str(v) for v in value]


def jmmmu_score(prediction: str, answer: Any, question_type: str, options: Any) -> float:
    """1.0 when a JMMMU answer is right: the chosen letter, or an open answer containing the gold."""
    if question_type == "multiple-choice":
        return float(parse_choice(prediction, _options(options)) == answer)
    return float(_open_correct(answer, parse_open(prediction)))


JMMMU_DOMAINS = {
    "Art and Psychology": ["Design", "Music", "Psychology"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ],
    "Tech and Engineering": [
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ],
}  # fmt: skip


def subject_of(question_id: str) -> str:
    """'test_Clinical_Medicine_12' -> 'Clinical_Medicine' (eval-mm's reading of JMMMU ids)."""
    head = question_id.split("_")[0]
    match = re.match(rf"^{re.escape(head)}_(.+?)_\d+$", question_id)
    if not match:
        raise ValueError(f"JMMMU id {question_id!r} is not <split>_<Subject>_<n>")
    return match.group(1)


def jmmmu_aggregate(records: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """From (question id, score): "Overall" (plain accuracy) and per domain and subject (rounded to 5)."""
    by_subject: dict[str, list[float]] = defaultdict(list)
    for qid, score in records:
        by_subject[subject_of(qid)].append(score)
    acc = {s: sum(v) / len(v) for s, v in by_subject.items()}
    out: dict[str, Any] = {}
    for domain, subjects in JMMMU_DOMAINS.items():
        present = [s for s in subjects if s in acc]
        n = sum(len(by_subject[s]) for s in present)
        out[f"Overall-{domain}"] = round(sum(sum(by_subject[s]) for s in present) / n, 5) if n else 0
        out.update({s: round(acc[s], 5) for s in present})
    total = sum(len(v) for v in by_subject.values())
    overall = sum(sum(v) for v in by_subject.values()) / total if total else 0
    out["Overall"] = round(overall, 5)
    out["overall"] = overall
    return out
