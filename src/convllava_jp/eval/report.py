"""Summary tables across tasks and models, with the article's published rows beside ours.

`collect_summaries` reads every `<output>/<task>/<model>/summary.json`; `summary_tables` lays them
out one row per model (Markdown + CSV), appends the ConvLLaVA-JP article's published rows
(labelled as such), and a second table with the settings behind every number.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import read_json, write_atomic
from .cache import SCORING_PACKAGES
from .published import ARTICLE_ROWS, ARTICLE_SOURCE, EVALMM_SOURCE, PUBLISHED_ROWS

log = logging.getLogger(__name__)

__all__ = [
    "ARTICLE_ROWS",
    "ARTICLE_SOURCE",
    "PUBLISHED_ROWS",
    "COLUMNS",
    "Column",
    "SummaryTables",
    "collect_summaries",
    "summary_tables",
    "write_summary",
]


@dataclass(frozen=True)
class Column:
    """One number in the table: a task's aggregate `key`, times `scale`."""

    header: str
    task: str
    key: str
    scale: float = 1.0


COLUMNS: tuple[Column, ...] = (
    Column("JA-VG-VQA-500 ROUGE-L", "ja-vg-vqa-500", "score"),
    Column("JA-VLM-Bench-ItW ROUGE-L", "ja-vlm-bench-in-the-wild", "score"),
    Column("Heron detail", "heron-bench", "detail"),
    Column("Heron conv", "heron-bench", "conv"),
    Column("Heron complex", "heron-bench", "complex"),
    Column("Heron avg", "heron-bench", "overall"),
    Column("JDocQA x100", "jdocqa", "overall", 100.0),
    Column("synthetic EM %", "synthetic", "exact_match", 100.0),
    # eval-mm's leaderboard metrics (its units: LLM judge 1-5, Heron overall_rel, accuracy/F1 in %)
    Column("VG-VQA LLM (1-5)", "ja-vg-vqa-500", "llm_as_a_judge"),
    Column("JVB-ItW LLM (1-5)", "ja-vlm-bench-in-the-wild", "llm_as_a_judge"),
    Column("Heron overall_rel", "heron-bench", "overall_rel"),
    Column("CVQA acc %", "cvqa", "score", 100.0),
    Column("CC-OCR F1 %", "cc-ocr", "score", 100.0),
    Column("JIC acc %", "jic-vqa", "average", 100.0),
    Column("MulIm-VQA ROUGE-L", "ja-multi-image-vqa", "score"),
    Column("MulIm-VQA LLM (1-5)", "ja-multi-image-vqa", "llm_as_a_judge"),
    Column("JMMMU acc %", "jmmmu", "overall", 100.0),
    Column("MECHA acc %", "mecha-ja", "overall", 100.0),
    Column("JWTxt-Board acc %", "jawildtext-board-vqa", "accuracy", 100.0),
    Column("JWTxt-HW CER-sim %", "jawildtext-handwriting-ocr", "cer_similarity", 100.0),
    Column("JWTxt-Receipt F1 %", "jawildtext-receipt-kie", "f1", 100.0),
)
_ARTICLE_TASKS = ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild", "heron-bench")
_JUDGED_TASKS = ("heron-bench", "jawildtext-board-vqa")  # their primary number needs the judge


@dataclass
class SummaryTables:
    """The rendered tables: `markdown` (scores, then settings) and `csv` (one row per model)."""

    markdown: str
    csv: str


def collect_summaries(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every `<output>/<task>/<model>/summary.json` under `output_dir` (unreadable ones are skipped)."""
    out = []
    for path in sorted(Path(output_dir).glob("*/*/summary.json")):
        try:
            out.append(read_json(path, what="summary"))
        except DataError as err:
            log.warning("skipping %s: %s", path, err)
    return out


def _columns_for(tasks: Iterable[str]) -> list[Column]:
    """The known columns of the tasks present, plus one generic column per unknown task."""
    present = set(tasks)
    cols = [c for c in COLUMNS if c.task in present]
    known = {c.task for c in COLUMNS}
    for task in sorted(present - known):
        cols.append(Column(task, task, "score"))
    return cols


def _number(value: Any, scale: float) -> str:
    if value is None or isinstance(value, (dict, list, str)):
        return "" if value is None else str(value)
    value = float(value)
    return "nan" if math.isnan(value) else f"{value * scale:.2f}"


def _cell(summary: Mapping[str, Any] | None, col: Column) -> str:
    if summary is None:
        return ""
    metrics = summary.get("metrics", {})
    if col.task in _JUDGED_TASKS and metrics.get(summary.get("primary", "overall")) is None:
        return "judge failed" if metrics.get("judge_failures") else "not judged"
    text = _number(metrics.get(col.key), col.scale)
    spread = metrics.get(f"{col.key}_runs")
    if isinstance(spread, Mapping) and len(spread.get("runs") or []) > 1 and spread.get("std") is not None:
        text += f" ±{spread['std'] * col.scale:.2f} ({len(spread['runs'])} judge runs)"
    if col.task == "heron-bench" and col.key == "overall":
        failed = int(metrics.get("judge_failures", 0)) + int(metrics.get("not_judged", 0))
        if failed:
            text += f" ({failed}/{metrics.get('n')} unjudged)"
    return text


def _model_settings(per_task: Mapping[str, Mapping[str, Any]]) -> str:
    """One line on what the numbers of one model depend on."""
    settings = [s.get("settings", {}) for s in per_task.values()]
    parts = []
    decodings = sorted({str(s.get("decoding")) for s in settings})
    parts.append("/".join(decodings))
    tokens = {t: s.get("settings", {}).get("max_new_tokens") for t, s in per_task.items()}
    if len(set(tokens.values())) == 1:
        parts.append(f"max_new_tokens {next(iter(tokens.values()))}")
    else:
        parts.append("max_new_tokens " + ", ".join(f"{t} {v}" for t, v in tokens.items()))
    parts.append("/".join(sorted({str(s.get("template")) for s in settings})))
    judged = [s for t, s in per_task.items() if s.get("settings", {}).get("judge") or t in _JUDGED_TASKS]
    judges = sorted(
        {
            f"judge {j['model']} ({', '.join(s.get('metrics', {}).get('judge_model_versions') or ['?'])})"
            for s in judged
            if (j := s.get("settings", {}).get("judge"))
        }
    )
    if judges:
        parts.extend(judges)
    elif any(t in _JUDGED_TASKS for t in per_task):
        parts.append("no judge")
    return "; ".join(parts)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def summary_tables(summaries: Sequence[Mapping[str, Any]], include_article: bool = True) -> SummaryTables:
    """Scores of every model on every task (one row a model) and the article's rows, as Markdown + CSV.

    The Markdown has a second table listing, per task and model, the settings that move the
    numbers (samples, max_new_tokens, decoding, template, judge and its version, failures,
    package versions).
    """
    by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
    for s in summaries:
        by_model.setdefault(s["model"], {})[s["task"]] = s
    tasks = [s["task"] for s in summaries]
    if include_article:
        tasks += list(_ARTICLE_TASKS)
    cols = _columns_for(tasks)
    header = ["model", "source", *[c.header for c in cols], "settings"]

    rows: list[list[str]] = []
    for model, per_task in by_model.items():
        rows.append(
            [model, "this run", *[_cell(per_task.get(c.task), c) for c in cols], _model_settings(per_task)]
        )
    if include_article:
        for ref in PUBLISHED_ROWS:
            cells = [_number(ref.get(c.task, {}).get(c.key), 1.0) for c in cols]
            if any(cells):  # a published row with nothing in these columns is left out
                rows.append([ref["model"], ref["source"], *cells, ref["settings"]])

    md = [_md_row(header), _md_row(["---"] * len(header)), *(_md_row(r) for r in rows)]
    if include_article:
        md.append("")
        md.append(
            f"Rows marked 'published: ...' are numbers as their source reports them ('{ARTICLE_SOURCE}', "
            f"'{EVALMM_SOURCE}'), not produced by this run; an empty cell is one the source does not give. "
            "ROUGE-L is Japanese ROUGE-L x100 (llm-jp-eval-mm); Heron detail/conv/complex/avg are "
            "100 * mean(model score) / mean(reference score) per category over valid verdicts; "
            "Heron overall_rel is eval-mm's (failed verdicts averaged in, a missing category as 0); "
            "LLM (1-5) is eval-mm's llm-as-a-judge."
        )
    md += ["", *_settings_table(summaries)]
    scorers = _scoring_versions(summaries)
    if scorers:
        md += ["", f"Scored with {scorers}."]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return SummaryTables(markdown="\n".join(md) + "\n", csv=buf.getvalue())


def _settings_table(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    header = [
        "task",
        "model",
        "n",
        "max_new_tokens",
        "decoding",
        "template",
        "judge",
        "empty / errors / unjudged",
        "convllava-jp / transformers / torch",
        "dataset",
    ]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for s in summaries:
        st = s.get("settings", {})
        counts = s.get("counts", {})
        metrics = s.get("metrics", {})
        judge = st.get("judge")
        judge_text = ""
        if judge:
            versions = metrics.get("judge_model_versions") or ["?"]
            judge_text = f"{judge['model']} ({', '.join(versions)}), T={judge['temperature']}"
        elif s.get("task") == "heron-bench":
            judge_text = "none"
        pkgs = st.get("packages") or {}
        unjudged = int(metrics.get("judge_failures", 0)) + int(metrics.get("not_judged", 0))
        lines.append(
            _md_row(
                [
                    s["task"],
                    s["model"],
                    str(counts.get("n", metrics.get("n", ""))),
                    str(st.get("max_new_tokens")),
                    str(st.get("decoding")),
                    str(st.get("template")),
                    judge_text,
                    f"{counts.get('empty_predictions', 0)} / {counts.get('generation_errors', 0)} / {unjudged}",
                    " / ".join(str(pkgs.get(p)) for p in ("convllava-jp", "transformers", "torch")),
                    str(st.get("dataset")),
                ]
            )
        )
    return lines


def _scoring_versions(summaries: Sequence[Mapping[str, Any]]) -> str:
    """'rouge-score 0.1.2, fugashi 1.5.2, ...' (each package's versions across the summaries)."""
    versions: dict[str, set[str]] = {}
    for s in summaries:
        for name, version in (s.get("settings", {}).get("scoring_packages") or {}).items():
            if name in SCORING_PACKAGES and version:
                versions.setdefault(name, set()).add(version)
    return ", ".join(
        f"{name} {'/'.join(sorted(versions[name]))}" for name in SCORING_PACKAGES if name in versions
    )


def write_summary(
    output_dir: str | os.PathLike,
    summaries: Sequence[Mapping[str, Any]] | None = None,
    include_article: bool = True,
) -> tuple[Path, Path, SummaryTables]:
    """Write `summary.md` and `summary.csv` in `output_dir` (from every saved summary if none given)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if summaries is None:
        summaries = collect_summaries(output_dir)
    tables = summary_tables(summaries, include_article)
    md_path, csv_path = output_dir / "summary.md", output_dir / "summary.csv"
    write_atomic(md_path, tables.markdown)
    write_atomic(csv_path, tables.csv)
    return md_path, csv_path, tables
