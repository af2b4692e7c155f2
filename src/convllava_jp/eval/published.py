"""Published scores printed beside ours, each with where it comes from and the settings behind it.

Only numbers that can be cited: the results table of the ConvLLaVA-JP article
("ConvLLaVAを日本語LLMで学習してみた", 2024-06), and llm-jp-eval-mm's `leaderboard.md` at commit 84dfcbe
(2025-08-29, unchanged at its HEAD 9f450a5 of 2026-04-12). Cells are in the summary table's
units: ROUGE-L x100, llm-as-a-judge 1-5, Heron relative scores x100, accuracies and F1 in %.
A cell the source does not give is absent, never filled in. LLaVA-JP's README was not available
here, so its rows come only through the article (llava-jp-1.3b-v1.1, v1.0-620k).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ARTICLE_SETTINGS", "ARTICLE_SOURCE", "EVALMM_SETTINGS", "EVALMM_SOURCE", "PUBLISHED_ROWS"]

ARTICLE_SOURCE = "published: article (2024-06)"
ARTICLE_SETTINGS = "as published; ROUGE-L (llm-jp-eval-mm of 2024); Heron-Bench judged by GPT-4 (prompt before eval-mm's 2025-03 change)"
EVALMM_SOURCE = "published: llm-jp-eval-mm leaderboard.md @84dfcbe (2025-08-29)"
EVALMM_SETTINGS = (
    "eval-mm defaults: greedy, max_new_tokens 256, judge gpt-4o-2024-11-20 (its CLI default; "
    "not stated per row), Heron prompt after 2025-03, each model's own prompt adapter"
)


def _article(model: str, params: str, vg: float | None, wild: float | None, heron: dict[str, float]) -> dict:
    row: dict[str, Any] = {
        "model": model,
        "params": params,
        "source": ARTICLE_SOURCE,
        "settings": ARTICLE_SETTINGS,
    }
    if vg is not None:
        row["ja-vg-vqa-500"] = {"score": vg}
    if wild is not None:
        row["ja-vlm-bench-in-the-wild"] = {"score": wild}
    row["heron-bench"] = heron
    return row


def _heron(detail: float, conv: float, complex_: float, avg: float) -> dict[str, float]:
    return {"detail": detail, "conv": conv, "complex": complex_, "overall": avg}


# The article's table: model, parameters, JA-VG-VQA-500, JA-VLM-Bench-ItW, Heron detail/conv/complex/average.
ARTICLE_ROWS: tuple[dict[str, Any], ...] = (
    _article("ConvLLaVA-JP-1.3b-768", "2.10B", 12.05, 42.80, _heron(44.24, 40.00, 48.16, 44.96)),
    _article("ConvLLaVA-JP-1.3b-1280", "-", 11.88, 43.64, _heron(38.95, 44.79, 41.24, 42.31)),
    _article("llava-jp-1.3b-v1.1", "1.86B", 13.33, 44.40, _heron(50.00, 51.83, 48.98, 50.39)),
    _article("llava-jp-1.3b-v1.0-620k", "1.86B", 12.69, 44.58, _heron(51.21, 41.05, 45.95, 44.84)),
    _article("EvoVLM-JP-v1-7B", "7.57B", 19.70, 51.25, _heron(50.31, 44.42, 40.47, 45.07)),
    _article("Heron BLIP-7B", "8.15B", 14.51, 33.26, _heron(49.09, 41.51, 45.72, 45.44)),
    _article("Heron GIT-7B", "7.32B", 15.18, 37.82, _heron(42.77, 54.20, 43.53, 46.83)),
    _article("Japanese Stable VLM", "7.57B", None, 40.50, _heron(25.15, 51.23, 37.84, 38.07)),
)


def _evalmm(model: str, cells: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {"model": model, "params": "", "source": EVALMM_SOURCE, "settings": EVALMM_SETTINGS, **cells}


def _lb(cvqa, ccocr, jic, mulim, jmmmu, jvb, vg, heron, mecha) -> dict[str, dict[str, float]]:
    cells = {
        "cvqa": {"score": cvqa},
        "cc-ocr": {"score": ccocr},
        "jic-vqa": {"average": jic},
        "ja-multi-image-vqa": {"llm_as_a_judge": mulim},
        "jmmmu": {"overall": jmmmu},
        "ja-vlm-bench-in-the-wild": {"llm_as_a_judge": jvb},
        "ja-vg-vqa-500": {"llm_as_a_judge": vg},
        "heron-bench": {"overall_rel": heron},
        "mecha-ja": {"overall": mecha},
    }
    return {
        t: {k: v for k, v in c.items() if v is not None}
        for t, c in cells.items()
        if any(v is not None for v in c.values())
    }


# leaderboard.md columns CVQA/Acc, CC-OCR/macro_f1, JIC/Acc, MulIm-VQA/LLM, JMMMU/Acc, JVB-ItW/LLM,
# VG-VQA/LLM, Heron/LLM (overall_rel), MECHA/Acc. Its JDocQA/LLM column is an LLM-judge score, not
# our JDocQA metric, so it is not shown.
EVALMM_ROWS: tuple[dict[str, Any], ...] = (
    _evalmm(
        "turing-motors/Heron-NVILA-Lite-2B", _lb(42.36, 29.29, 46.42, 3.11, 36.89, 4.0, 3.81, 63.22, 48.02)
    ),
    _evalmm("Qwen/Qwen2.5-VL-3B-Instruct", _lb(54.68, 68.86, 74.04, 3.38, 45.0, 4.12, 3.07, 60.72, 54.13)),
    _evalmm("OpenGVLab/InternVL3-2B", _lb(44.33, 61.94, 67.26, 3.69, 38.64, 3.68, 3.7, 55.28, 47.25)),
    _evalmm("google/gemma-3-4b-it", _lb(48.77, 51.43, 76.62, 3.98, 36.74, 3.76, 3.49, 52.26, 46.86)),
    _evalmm(
        "sbintuitions/sarashina2-vision-8b", _lb(48.77, 8.2, 78.67, None, 39.17, 4.26, 3.73, 64.38, 56.66)
    ),
    _evalmm("llm-jp/llm-jp-3-vila-14b", _lb(30.05, 11.54, 81.35, 3.64, 19.24, 4.1, 4.0, 70.71, 45.71)),
)

PUBLISHED_ROWS: tuple[dict[str, Any], ...] = ARTICLE_ROWS + EVALMM_ROWS
