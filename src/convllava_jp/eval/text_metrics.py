"""Per-sample scorers of eval-mm's newer Japanese tasks (our code; eval-mm's rules, its quirks kept).

- `contains`: 1 when the reference occurs in the prediction, case and width as they are (JIC-VQA,
  MECHA-ja: for MECHA the reference is the option letter, so any capital "A" in the answer counts).
- `substring_match`: CVQA's scorer: both lower-cased, English number words turned to digits,
  then containment. With a one-letter reference ("a") almost any answer matches; eval-mm's choice.
- `cc_ocr_f1`: CC-OCR's Japanese setting: characters (all whitespace removed, "###"/"***" dropped,
  lower-cased) compared as bags; F1 with eval-mm's 1e-9 guards (an empty reference scores 0).
- `cer_similarity`: JaWildText handwriting: max(0, 1 - edit distance / reference length) after NFKC,
  literal "\\n" -> newline, trimmed lines, lower-case; both empty = 1, empty reference = 0.
- `receipt_kie`: JaWildText receipt KIE: "field:value" tokens (NFKC, lower, no yen signs or commas)
  as bags, F1 / precision / recall and per-field exact match; an unreadable JSON answer scores 0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from typing import Any

from .choice_metrics import jmmmu_score
from .metrics import METRICS, Metric

__all__ = [
    "KIE_FIELDS",
    "cc_ocr_counts",
    "cc_ocr_f1",
    "cc_ocr_tokens",
    "cer_similarity",
    "contains",
    "extract_json_object",
    "levenshtein",
    "receipt_kie",
    "substring_match",
]


def contains(prediction: str, reference: str) -> float:
    return float(reference in prediction)


_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50",
    "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100",
    "thousand": "1000", "million": "1000000", "billion": "1000000000",
}  # fmt: skip
_WORD_PATTERNS = [(re.compile(rf"\b{w}\b"), d) for w, d in _NUMBER_WORDS.items()]


def _number_words_to_digits(text: str) -> str:
    text = text.lower()
    for pattern, digits in _WORD_PATTERNS:  # in this order: "fourteen" is not touched by "four"
        text = pattern.sub(digits, text)
    return text


def substring_match(prediction: str, reference: str | list[str]) -> float:
    pred = _number_words_to_digits(prediction.lower())
    refs = reference if isinstance(reference, list) else [reference]
    return float(any(_number_words_to_digits(r.lower()) in pred for r in refs))


def cc_ocr_tokens(text: str) -> list[str]:
    text = str(text).strip().replace("\t", " ").replace("\n", " ").replace("###", "").replace("***", "")
    text = re.sub(r"\s+", " ", text).replace(" ", "")
    return [c.lower() for c in text if c.lower()]


def cc_ocr_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(matched characters, reference length, prediction length) as bags of characters."""
    gt, pred = Counter(cc_ocr_tokens(reference)), Counter(cc_ocr_tokens(prediction))
    return sum((gt & pred).values()), sum(gt.values()), sum(pred.values())


def _f1(right: int, n_gt: int, n_pred: int) -> float:
    recall = right / (n_gt + 1e-9) if n_gt > 0 else 0.0
    precision = right / (n_pred + 1e-9) if n_pred > 0 else 0.0
    return 2 * recall * precision / (recall + precision + 1e-9) if recall + precision > 0 else 0.0


def cc_ocr_f1(prediction: str, reference: str) -> float:
    return _f1(*cc_ocr_counts(prediction, reference))


def cc_ocr_corpus(counts: list[tuple[int, int, int]]) -> dict[str, float]:
    """eval-mm's macro and micro recall / precision / F1 over samples (its 1e-9 guards included)."""
    if not counts:
        return {k: 0.0 for k in ("macro_recall", "macro_precision", "macro_f1_score",
                                 "micro_recall", "micro_precision", "micro_f1_score")}  # fmt: skip
    rec, prec, f1 = [], [], []
    for right, n_gt, n_pred in counts:
        r, p = right / (n_gt + 1e-9), right / (n_pred + 1e-9)
        rec.append(r)
        prec.append(p)
        f1.append(2 * r * p / (r + p + 1e-9))
    n = len(counts) + 1e-9
    right, n_gt, n_pred = (sum(c[i] for c in counts) for i in range(3))
    micro_r = right / (n_gt + 1e-9) if n_gt > 0 else 0.0
    micro_p = right / (n_pred + 1e-9) if n_pred > 0 else 0.0
    micro_f = 2 * micro_r * micro_p / (micro_r + micro_p + 1e-9) if micro_r + micro_p > 0 else 0.0
    return {
        "macro_recall": sum(rec) / n,
        "macro_precision": sum(prec) / n,
        "macro_f1_score": sum(f1) / n,
        "micro_recall": micro_r,
        "micro_precision": micro_p,
        "micro_f1_score": micro_f,
    }


def _ocr_normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").replace("\\n", "\n").replace("\r\n", "\n")
    return "\n".join(re.sub(r"[ \t]+", " ", line.strip()) for line in text.split("\n")).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def cer_similarity(prediction: str, reference: str) -> float:
    ref, pred = _ocr_normalize(reference), _ocr_normalize(prediction)
    if not ref:
        return 1.0 if not pred else 0.0
    return max(0.0, 1.0 - levenshtein(ref, pred) / len(ref))


KIE_FIELDS = ("store_name", "store_address", "receipt_id", "date", "time", "total_amount", "tax_amount")
_ITEM_FIELDS = ("item_name", "item_price", "item_quantity")
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)\n?```", re.DOTALL)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # bad JSON, or an integer longer than Python's digit limit
        return None


def extract_json_object(text: str) -> Any:
    """eval-mm's reading of a KIE answer: a fenced block, else the first balanced `{...}`; None if neither parses."""
    fenced = _FENCE.search(text)
    if fenced:
        value = _loads(fenced.group(1).strip())
        if value is not None:
            return value
    start = text.find("{")
    if start == -1:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return _loads(text[start : i + 1])
    return None


def _kie_value(value: Any) -> str:
    if value is None:
        return ""
    text = unicodedata.normalize("NFKC", str(value)).lower().strip()
    return re.sub(r"\s+", " ", re.sub(r"[¥￥,]", "", text))


def _kie_tokens(data: dict) -> Counter:
    tokens = []
    for name in KIE_FIELDS:
        if data.get(name) is not None and (norm := _kie_value(data[name])):
            tokens.append(f"{name}:{norm}")
    for item in data.get("line_items") or []:
        if isinstance(item, dict):
            for name in _ITEM_FIELDS:
                if item.get(name) is not None and (norm := _kie_value(item[name])):
                    tokens.append(f"line_items.{name}:{norm}")
    return Counter(tokens)


def receipt_kie(prediction: str, reference: str) -> dict[str, Any]:
    """{"f1", "precision", "recall", "field_accuracy": {field_<name>: 0/1}, "parse_error"}."""
    gold = json.loads(reference)
    pred = extract_json_object(prediction)
    if not isinstance(pred, dict):  # eval-mm would fail on a JSON list; here it is a parse error
        zero = {f"field_{f}": 0.0 for f in KIE_FIELDS}
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "field_accuracy": zero, "parse_error": True}
    g, p = _kie_tokens(gold), _kie_tokens(pred)
    if not g and not p:
        prf = (1.0, 1.0, 1.0)
    elif not p:
        prf = (0.0, 0.0, 0.0)
    elif not g:
        prf = (0.0, 1.0, 0.0)
    else:
        right = sum((g & p).values())
        precision, recall = right / sum(p.values()), right / sum(g.values())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        prf = (precision, recall, f1)
    fields = {
        f"field_{f}": float(_kie_value(str(gold.get(f, ""))) == _kie_value(str(pred.get(f, ""))))
        for f in KIE_FIELDS
    }
    return {
        "f1": prf[2],
        "precision": prf[0],
        "recall": prf[1],
        "field_accuracy": fields,
        "parse_error": False,
    }


for _metric in (
    Metric("contains", contains, "1 if the reference occurs in the prediction (as written), else 0"),
    Metric("substring-match", substring_match, "CVQA: lower-cased containment, number words as digits"),
    Metric("cc-ocr", cc_ocr_f1, "CC-OCR: character-bag F1 (whitespace removed, lower-cased)"),
    Metric("cer-similarity", cer_similarity, "1 - character edit distance / reference length, floored at 0"),
    Metric("receipt-kie", lambda p, r: receipt_kie(p, r)["f1"], "receipt KIE: field:value token F1"),
    Metric(
        "jmmmu",
        jmmmu_score,
        "JMMMU: the chosen letter (multiple choice) or an open answer containing the gold",
        fields=("question_type", "options"),
    ),
):
    METRICS.setdefault(_metric.name, _metric)
