"""Metrics against hand-computed values (MeCab tokens and LCS worked out below)."""

from __future__ import annotations

import math
import sys

import pytest

from convllava_jp.errors import ConfigError
from convllava_jp.eval.metrics import (
    METRICS,
    JudgeScores,
    Metric,
    exact_match_ja,
    get_metric,
    heron_aggregate,
    jdocqa_normalize,
    jdocqa_score,
    normalize_ja,
    parse_judge_response,
    rouge_l_ja,
    tokenize_ja,
)

# --- normalisation -------------------------------------------------------------------------


def test_normalize_ja_width_emoji_whitespace():
    assert normalize_ja("ＡＢＣ１２３") == "ABC123"
    assert normalize_ja("ｽﾏｰﾄﾌｫﾝ") == "スマートフォン"
    assert normalize_ja("犬が走っている🐶") == "犬が走っている"
    assert normalize_ja("✅完了") == "完了"  # U+2705, in the dingbat range llm-jp-eval-mm strips
    assert normalize_ja("  hello \t\n  world  ") == "hello world"
    assert normalize_ja("Hello") == "Hello"  # no lowercasing


def test_normalize_ja_uses_neologdn_specifics():
    # neologdn (not NFKC) joins Japanese words split by spaces and shortens repeated "ー".
    assert normalize_ja("東京 タワー") == "東京タワー"
    assert normalize_ja("すごーーーい") == "すごーい"


def test_normalize_ja_falls_back_to_nfkc_without_neologdn(monkeypatch):
    monkeypatch.setitem(sys.modules, "neologdn", None)  # makes `import neologdn` raise ImportError
    assert normalize_ja("ＡＢＣ１２３") == "ABC123"
    assert normalize_ja("東京 タワー") == "東京 タワー"
    assert normalize_ja("すごーーーい") == "すごーーーい"


# --- ROUGE-L -------------------------------------------------------------------------------


def test_rouge_identical_is_100():
    assert rouge_l_ja("私は猫です。", "私は猫です。") == pytest.approx(100.0, abs=1e-9)


def test_rouge_disjoint_is_0():
    assert rouge_l_ja("犬", "猫") == 0.0


def test_rouge_partial_overlap_hand_computed():
    ref = "猫が机の上で寝ている。"
    pred = "白い猫が机の下で寝ています。"
    ref_tokens = tokenize_ja(ref)
    pred_tokens = tokenize_ja(pred)
    assert ref_tokens == ["猫", "が", "机", "の", "上", "で", "寝", "て", "いる", "。"]
    assert pred_tokens == ["白い", "猫", "が", "机", "の", "下", "で", "寝", "て", "い", "ます", "。"]
    # LCS = 猫 が 机 の で 寝 て 。 -> 8;  P = 8/12, R = 8/10;  F = 2PR/(P+R) = 8/11.
    assert rouge_l_ja(pred, ref) == pytest.approx(100 * 8 / 11, abs=1e-6)


def test_rouge_matches_llm_jp_eval_mm_examples():
    # Values asserted in llm-jp-eval-mm's own test_rougel_scorer.py.
    assert rouge_l_ja("たかしが公園にいたようだ。", "たかしが公園で遊んでいた。") == pytest.approx(
        200 / 3, abs=1e-6
    )
    # P = 3/7 (ここ は 湖 の 岸 です 。), R = 3/5 (池 の ほとり です 。) -> F = 1/2.
    assert rouge_l_ja("ここは湖の岸です。", "池のほとりです。") == pytest.approx(50.0, abs=1e-6)


def test_rouge_normalisation_width_and_emoji():
    assert rouge_l_ja("赤い車が２台あります", "赤い車が2台あります") == pytest.approx(100.0)
    assert rouge_l_ja("犬が走っている🐶", "犬が走っている") == pytest.approx(100.0)
    # Without emoji removal this would be 5 of 6 tokens: F = 2*(5/6)*1/(5/6+1) = 10/11.
    assert tokenize_ja("犬が走っている🐶") == ["犬", "が", "走っ", "て", "いる"]


def test_rouge_is_case_sensitive_and_keeps_ascii():
    # The custom tokenizer does not lowercase (rouge_score's default one would).
    assert rouge_l_ja("hello world", "HELLO world") == pytest.approx(50.0)


@pytest.mark.parametrize("pred", ["", "   ", "🐶"])
def test_rouge_empty_prediction_scores_zero(pred):
    assert rouge_l_ja(pred, "猫が好き") == 0.0


# --- exact match and JDocQA ----------------------------------------------------------------


def test_exact_match_after_normalisation():
    assert exact_match_ja("ＡＢＣ", "ABC") == 1.0
    assert exact_match_ja(" 東京  ", "東京") == 1.0
    assert exact_match_ja("東京😀", "東京") == 1.0
    assert exact_match_ja("東京。", "東京") == 0.0  # punctuation is kept, as in llm-jp-eval-mm
    assert exact_match_ja("ＡＢＣ", "ABC", normalize=False) == 0.0


def test_jdocqa_normalize():
    assert jdocqa_normalize(" はい、そうです。 ") == "はいそう"
    assert jdocqa_normalize("１２３") == "123"


@pytest.mark.parametrize(
    ("pred", "ref", "kind", "expected"),
    [
        ("はい", "はい", "yesno", 1.0),
        ("はい、そうです。", "はい", "yesno", 1.0),  # containment, as llm-jp-eval-mm does
        ("いいえ", "はい", "yesno", 0.0),
        ("東京都です。", "東京都", "factoid", 1.0),
        ("大阪府", "東京都", "factoid", 0.0),
        ("１２３", "123", "numerical", 1.0),
        ("124", "123", "numerical", 0.0),
        ("はい", "はい", 0, 1.0),  # the dataset's int codes work too
        ("東京", "東京", 1, 1.0),
    ],
)
def test_jdocqa_closed_types(pred, ref, kind, expected):
    assert jdocqa_score(pred, ref, kind) == expected


def test_jdocqa_open_ended_bleu_hand_computed():
    # ja-mecab: ref 私 は 猫 が 好き だ (6), pred + 。 (7): p_n = 6/7, 5/6, 4/5, 3/4, BP = 1.
    got = jdocqa_score("私は猫が好きだ。", "私は猫が好きだ", "open-ended")
    assert got == pytest.approx((3 / 7) ** 0.25, abs=1e-6)
    assert jdocqa_score("私は猫が好きだ", "私は猫が好きだ", 3) == pytest.approx(1.0)
    assert jdocqa_score("", "私は猫が好きだ", "open-ended") == 0.0


def test_jdocqa_unknown_type():
    with pytest.raises(ConfigError, match="answer_type"):
        jdocqa_score("a", "a", "multiple-choice")


# --- judge parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('```json\n{"score_gpt": 8, "score": 6}\n```', (8.0, 6.0)),
        ('{"score_gpt": 9, "score": 3}', (9.0, 3.0)),
        ('評価結果です。{"score": 7, "score_gpt": 10} 以上です。', (10.0, 7.0)),
        ('Here you go:\n```\n{"score_gpt": "8", "score": "5.5"}\n```\nThanks', (8.0, 5.5)),
        ('{"score_gpt": 1, "score": 10}', (1.0, 10.0)),
        ('{"note": "x"} then {"score_gpt": 4, "score": 2}', (4.0, 2.0)),
        ('{"score_gpt": 8,\n "score": 6, "why": "good\nanswer"}', (8.0, 6.0)),  # raw newline in string
    ],
)
def test_parse_judge_response_ok(text, expected):
    got = parse_judge_response(text)
    assert got == expected
    assert isinstance(got, JudgeScores)
    assert (got.score_gpt, got.score) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I think the model answer is quite good.",
        "8 6",
        '{"score_gpt": 8}',
        '{"score_gpt": 11, "score": 5}',
        '{"score_gpt": 8, "score": 0}',
        '{"score_gpt": "eight", "score": 5}',
        '{"score_gpt": true, "score": 5}',
        '{"score_gpt": 8, "score": 6',
    ],
)
def test_parse_judge_response_rejects(text):
    assert parse_judge_response(text) is None


# --- Heron-Bench aggregation ---------------------------------------------------------------


def test_heron_aggregate_math():
    records = [
        {"category": "conv", "score_gpt": 8, "score": 6},
        {"category": "conv", "score_gpt": 10, "score": 9},
        {"category": "conv", "score_gpt": -1, "score": -1},  # parse failure: reported, not averaged
        {"category": "detail", "score_gpt": 5, "score": 5},
        {"category": "complex", "score_gpt": 8, "score": 2},
        {"category": "complex", "score_gpt": 8, "score": 4},
    ]
    out = heron_aggregate(records)
    conv = 100 * 7.5 / 9  # mean(6, 9) / mean(8, 10)
    assert out["conv"] == pytest.approx(conv)
    assert out["detail"] == pytest.approx(100.0)
    assert out["complex"] == pytest.approx(37.5)
    assert out["overall"] == pytest.approx((conv + 100.0 + 37.5) / 3)
    assert out["conv_parse_errors"] == 1 and out["detail_parse_errors"] == 0
    assert out["parse_errors"] == 1
    assert out["conv_count"] == 3 and out["count"] == 6
    assert out["conv_score"] == pytest.approx(7.5) and out["conv_score_gpt"] == pytest.approx(9.0)


def test_heron_aggregate_missing_and_all_failed_categories():
    records = [
        {"category": "conv", "score_gpt": 5, "score": 4},
        {"category": "detail", "score_gpt": -1, "score": -1},
    ]
    out = heron_aggregate(records)
    assert out["overall"] == pytest.approx(80.0)  # only conv has valid scores
    assert "detail" not in out and "complex" not in out
    assert out["detail_parse_errors"] == 1
    assert math.isnan(heron_aggregate([])["overall"])


# --- registry ------------------------------------------------------------------------------


def test_registry_names_and_dispatch():
    assert set(METRICS) == {
        "rouge-l-ja", "exact-match", "jdocqa", "contains", "substring-match", "cc-ocr", "cer-similarity",
        "receipt-kie", "jmmmu",
    }  # fmt: skip
    assert all(isinstance(m, Metric) and m.name == name for name, m in METRICS.items())
    assert get_metric("rouge-l-ja")("私は猫です。", "私は猫です。") == pytest.approx(100.0)
    assert get_metric("exact-match")("ＡＢＣ", "ABC") == 1.0
    assert get_metric("jdocqa")("はい、そうです", "はい", {"answer_type": 0, "other": 1}) == 1.0


def test_registry_errors_are_for_users():
    with pytest.raises(ConfigError, match="known metrics"):
        get_metric("bleu-4")
    with pytest.raises(ConfigError, match="answer_type"):
        get_metric("jdocqa")("はい", "はい")


def test_judge_reply_with_huge_or_overlong_numbers_is_unreadable_not_a_crash():
    for digits in (400, 5000):  # 10**400 overflows float(); 5000 digits exceed int()'s limit in json
        big = "9" * digits
        assert parse_judge_response(f'{{"score_gpt": {big}, "score": {big}}}') is None
        assert parse_judge_response(f'{{"score_gpt": 8, "score": {big}}}') is None
