"""Per-sample scores, computed the way llm-jp-eval-mm computes them.

- `rouge_l_ja`: JA-VG-VQA-500 and JA-VLM-Bench-In-the-Wild (llm-jp-eval-mm `rougel_scorer.py`).
- `exact_match_ja`: normalised string equality.
- `jdocqa_score`: JDocQA (llm-jp-eval-mm `jdocqa_scorer.py`).
- `parse_judge_response` / `heron_aggregate`: Heron-Bench (llm-jp-eval-mm `heron_bench_scorer.py`).

`METRICS` maps a metric name to a `Metric`, so a task names the metric it wants.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import emoji

from convllava_jp.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "HERON_CATEGORIES",
    "JDOCQA_ANSWER_TYPES",
    "METRICS",
    "JudgeScores",
    "Metric",
    "exact_match_ja",
    "get_metric",
    "heron_aggregate",
    "heron_evalmm_rel",
    "jdocqa_normalize",
    "jdocqa_score",
    "normalize_ja",
    "parse_judge_response",
    "rouge_l_ja",
    "tokenize_ja",
]

# llm-jp-eval-mm strips these ranges after `emoji.is_emoji`, which misses a few dingbats (U+2702..U+27B0).
_EMOJI_RANGES = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff\U00002702-\U000027b0]+"
)


def normalize_ja(text: str) -> str:
    """Normalise Japanese text as llm-jp-eval-mm's ROUGE-L tokenizer does.

    Order: drop emoji (per character `emoji.is_emoji`, then the emoji code-point ranges),
    `neologdn.normalize` (NFKC when neologdn is not installed), collapse runs of whitespace
    to one space and strip. Case is kept.
    """
    text = "".join("" if emoji.is_emoji(c) else c for c in text)
    text = _EMOJI_RANGES.sub("", text)
    try:
        import neologdn
    except ImportError:
        text = unicodedata.normalize("NFKC", text)
    else:
        text = neologdn.normalize(text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _mecab_tagger() -> Any:
    """The shared MeCab tagger (fugashi + unidic-lite, wakati output), built on first use."""
    import fugashi

    return fugashi.Tagger("-Owakati")


def tokenize_ja(text: str) -> list[str]:
    """`normalize_ja`, then MeCab (unidic-lite) word segmentation."""
    return _mecab_tagger().parse(normalize_ja(text)).split()


class _MecabRougeTokenizer:
    """rouge_score tokenizer protocol (`.tokenize`). Its default tokenizer keeps only [a-z0-9],
    which would erase Japanese; llm-jp-eval-mm passes a MeCab tokenizer instead: no lowercasing,
    no stemming, no character filtering."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_ja(text)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MecabRougeTokenizer())


def rouge_l_ja(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure between MeCab tokens of the normalised texts, in 0-100.

    Empty (or all-emoji) predictions score 0. llm-jp-eval-mm runs each sample through a
    one-element BootstrapAggregator whose `mid` is the sample's own score, so this is the same.
    """
    score = _rouge_l_scorer().score(reference, prediction)["rougeL"]
    return 100.0 * score.fmeasure


def exact_match_ja(prediction: str, reference: str, normalize: bool = True) -> float:
    """1.0 when the texts are equal after `normalize_ja` (emoji, width, whitespace), else 0.0.

    No punctuation is stripped: llm-jp-eval-mm's exact-match compares the raw strings
    (`int(ref == pred)`); pass `normalize=False` for exactly that.
    """
    if normalize:
        prediction, reference = normalize_ja(prediction), normalize_ja(reference)
    return float(prediction == reference)


# JDocQA stores answer_type as an int; llm-jp-eval-mm's ANSWER_TYPE_MAP gives the names.
JDOCQA_ANSWER_TYPES: dict[str, int] = {"yesno": 0, "factoid": 1, "numerical": 2, "open-ended": 3}
_JDOCQA_TYPE_NAMES = {v: k for k, v in JDOCQA_ANSWER_TYPES.items()}


def jdocqa_normalize(text: str) -> str:
    """llm-jp-eval-mm's JDocQA normalisation: drop 'です', '。', '、' and ASCII spaces, strip, NFKC."""
    text = text.replace("です", "").replace("。", "").replace("、", "").replace(" ", "").strip()
    return unicodedata.normalize("NFKC", text)


@functools.lru_cache(maxsize=1)
def _sentence_bleu_ja() -> Any:
    """sacrebleu BLEU with llm-jp-eval-mm's `bleu_ja` settings, built once (MeCab start-up is slow)."""
    from sacrebleu.metrics import BLEU

    # effective_order=False is what llm-jp-eval-mm uses; sacrebleu then logs a warning on every
    # sentence, which would flood the eval log. Drop only that message.
    logging.getLogger("sacrebleu").addFilter(lambda record: "effective_order" not in record.getMessage())
    return BLEU(
        lowercase=False,
        tokenize="ja-mecab",
        smooth_method="exp",
        smooth_value=0.0,
        effective_order=False,
    )


def _jdocqa_type_name(answer_type: str | int) -> str:
    if isinstance(answer_type, str) and answer_type in JDOCQA_ANSWER_TYPES:
        return answer_type
    if isinstance(answer_type, int) and answer_type in _JDOCQA_TYPE_NAMES:
        return _JDOCQA_TYPE_NAMES[answer_type]
    raise ConfigError(
        f"Unknown JDocQA answer_type {answer_type!r}; expected one of {list(JDOCQA_ANSWER_TYPES)} "
        f"or their codes {list(_JDOCQA_TYPE_NAMES)}."
    )


def jdocqa_score(prediction: str, reference: str, answer_type: str | int) -> float:
    """JDocQA score in 0-1, as llm-jp-eval-mm computes it.

    yesno / factoid / numerical: 1.0 when the `jdocqa_normalize`d reference occurs inside the
    normalised prediction (llm-jp-eval-mm tests `ref in pred`, not equality), else 0.0.
    open-ended: sentence BLEU (sacrebleu, tokenize="ja-mecab", exp smoothing, no effective order) / 100.
    `answer_type` is a name from `JDOCQA_ANSWER_TYPES` or its int code (as stored in the dataset).
    """
    kind = _jdocqa_type_name(answer_type)
    if kind == "open-ended":
        return _sentence_bleu_ja().sentence_score(prediction, [reference]).score / 100.0
    return float(jdocqa_normalize(reference) in jdocqa_normalize(prediction))


# ---------------------------------------------------------------------------------------------
# Heron-Bench

HERON_CATEGORIES: tuple[str, ...] = ("conv", "detail", "complex")

_FENCED_BLOCK = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_BRACED = re.compile(r"\{.*?\}", re.DOTALL)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class JudgeScores(NamedTuple):
    """The judge's two scores, 1-10: the reference answer's and the evaluated model's."""

    score_gpt: float
    score: float


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 1 <= value <= 10:  # before float(): 10**400 would overflow
        return None
    if not math.isfinite(value) or not 1 <= value <= 10:
        return None
    return float(value)


def _load_json_object(candidate: str) -> dict | None:
    candidate = candidate.strip()
    # Same repair as llm-jp-eval-mm: raw control characters (e.g. newlines inside strings) break json.
    for attempt in (candidate, _CONTROL_CHARS.sub("", candidate)):
        try:
            parsed = json.loads(attempt)
        except ValueError:  # JSONDecodeError, or an integer longer than Python's digit limit
            continue
        return parsed if isinstance(parsed, dict) else None
    return None


def parse_judge_response(text: str) -> JudgeScores | None:
    """Read `{"score_gpt": x, "score": y}` from a judge's reply; None if absent or out of 1-10.

    Looks in ```json fenced blocks first, then in any `{...}` in the text (prose around is fine),
    as llm-jp-eval-mm does. Numbers or numeric strings are accepted.
    """
    if not text:
        return None
    candidates = _FENCED_BLOCK.findall(text) + _BRACED.findall(text)
    for candidate in candidates:
        parsed = _load_json_object(candidate)
        if parsed is None or "score" not in parsed or "score_gpt" not in parsed:
            continue
        score_gpt, score = _as_score(parsed["score_gpt"]), _as_score(parsed["score"])
        if score_gpt is None or score is None:
            logger.debug("judge scores out of range or not numeric: %r", parsed)
            return None
        return JudgeScores(score_gpt=score_gpt, score=score)
    return None


def heron_aggregate(records: list[dict]) -> dict:
    """Heron-Bench summary from per-item judge records.

    Each record has `category` (conv / detail / complex), `score` and `score_gpt`; -1 marks a
    parse failure. Returns, per category present: `<cat>` = 100 * mean(score) / mean(score_gpt)
    over the valid records, `<cat>_score` and `<cat>_score_gpt` (raw means), `<cat>_count`,
    `<cat>_parse_errors`; and `overall` = mean of the categories that have valid records,
    `parse_errors` in total, `count`.

    Differs from llm-jp-eval-mm on purpose: failures are left out of the means (they average the
    -1s in) and a missing category does not count as 0 in `overall`.
    """
    result: dict[str, float | int] = {}
    relative: list[float] = []
    total_errors = 0
    for category in HERON_CATEGORIES:
        items = [r for r in records if r.get("category") == category]
        if not items:
            continue
        valid = [r for r in items if r["score"] != -1 and r["score_gpt"] != -1]
        errors = len(items) - len(valid)
        total_errors += errors
        result[f"{category}_count"] = len(items)
        result[f"{category}_parse_errors"] = errors
        if not valid:
            continue
        mean_score = sum(float(r["score"]) for r in valid) / len(valid)
        mean_gpt = sum(float(r["score_gpt"]) for r in valid) / len(valid)
        # llm-jp-eval-mm guards the division the same way; valid scores are >= 1 anyway.
        rel = 100.0 * mean_score / max(0.01, mean_gpt)
        result[category] = rel
        result[f"{category}_score"] = mean_score
        result[f"{category}_score_gpt"] = mean_gpt
        relative.append(rel)
    unknown = {r.get("category") for r in records} - set(HERON_CATEGORIES)
    if unknown:
        logger.warning(
            "heron_aggregate ignores records with unknown categories %s", sorted(map(str, unknown))
        )
    result["overall"] = sum(relative) / len(relative) if relative else float("nan")
    result["parse_errors"] = total_errors
    result["count"] = sum(1 for r in records if r.get("category") in HERON_CATEGORIES)
    result.update(heron_evalmm_rel(records))
    return result


def heron_evalmm_rel(records: list[dict]) -> dict[str, float]:
    """`<cat>_rel` and `overall_rel` exactly as llm-jp-eval-mm aggregates Heron-Bench.

    Its choices, kept: a failed verdict (-1 for both scores) is averaged in like a score; a
    category whose mean model score is exactly -1 (all failed) or that has no records gives no
    `<cat>_rel` and counts 0 in `overall_rel`, which is the sum of the three divided by 3.
    """
    out: dict[str, float] = {}
    for category in HERON_CATEGORIES:
        own = [float(r["score"]) for r in records if r.get("category") == category]
        gpt = [float(r["score_gpt"]) for r in records if r.get("category") == category]
        if not own or sum(own) / len(own) == -1:
            continue
        out[f"{category}_rel"] = 100.0 * (sum(own) / len(own)) / max(0.01, sum(gpt) / len(gpt))
    out["overall_rel"] = sum(out.get(f"{c}_rel", 0.0) for c in HERON_CATEGORIES) / len(HERON_CATEGORIES)
    return out


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Metric:
    """A per-sample metric: `fn(prediction, reference, **fields)` -> float.

    `fields` names the extra record keys the metric needs (e.g. JDocQA's `answer_type`).
    """

    name: str
    fn: Callable[..., float]
    description: str
    fields: tuple[str, ...] = ()

    def __call__(self, prediction: str, reference: str, record: Mapping[str, Any] | None = None) -> float:
        """Score one sample; `record` supplies the keys listed in `fields`."""
        record = record or {}
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise ConfigError(
                f"Metric {self.name!r} needs record fields {missing}; got keys {sorted(record)}."
            )
        return self.fn(prediction, reference, **{f: record[f] for f in self.fields})


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("rouge-l-ja", rouge_l_ja, "ROUGE-L F x100 on MeCab (unidic-lite) tokens of normalised text"),
        Metric("exact-match", exact_match_ja, "1 if the normalised texts are equal, else 0"),
        Metric(
            "jdocqa",
            jdocqa_score,
            "JDocQA: normalised containment for yesno/factoid/numerical, ja-mecab sentence BLEU/100 for open-ended",
            fields=("answer_type",),
        ),
    )
}


def get_metric(name: str) -> Metric:
    """The registered metric called `name`."""
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"Unknown metric {name!r}; known metrics: {', '.join(METRICS)}.") from None


from . import text_metrics  # noqa: E402,F401  (registers the newer tasks' metrics in METRICS)
