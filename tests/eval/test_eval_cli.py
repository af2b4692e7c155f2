"""`convllava-jp eval` as a real subprocess: all five tasks on local fixtures with a real HTTP judge,
--rescore without the model, a SIGKILL mid-run and the resume, and bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convllava_jp.cli import main
from convllava_jp.eval.report import ARTICLE_ROWS
from convllava_jp.io import text_lines

from .test_runner import heron_judge, judge_server
from .test_tasks import jdocqa_dataset, write_all

SRC = Path(__file__).resolve().parents[2] / "src"
TASKS = "ja-vg-vqa-500,ja-vlm-bench-in-the-wild,heron-bench,jdocqa,synthetic"


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(SRC),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
        **extra,
    )
    return env


def eval_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "convllava_jp.cli", "eval", "--no-progress", *args]


def run_cli(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        eval_cmd(*args), env=cli_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout
    )


def data_flags(paths: dict[str, Path]) -> list[str]:
    return [flag for task, path in paths.items() for flag in ("--data", f"{task}={path}")]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in text_lines(path.read_text(encoding="utf-8")) if line.strip()]


def test_help_explains_the_command_and_imports_no_torch(tmp_path):
    """One subprocess: does importing the command load torch (only the package root may), then --help."""
    probe = (
        "import json, sys\n"
        "sys.argv[0] = 'convllava-jp'\n"  # as the console script starts
        "import convllava_jp\n"
        "root = 'torch' in sys.modules\n"
        "from convllava_jp import cli\n"
        "print(json.dumps({'root': root, 'ours': 'torch' in sys.modules or 'transformers' in sys.modules}),"
        " file=sys.stderr)\n"
        "sys.exit(cli.main(['eval', '--help']))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=cli_env(tmp_path), capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for text in ("--model", "--data TASK=PATH", "--rescore", "--judge-url", "--judge-api-key-env", "--no-cache",
                 "JA-VG-VQA-500", "heron-bench", "llm-jp-eval-mm"):  # fmt: skip
        assert text in result.stdout
    imported = json.loads(result.stderr.strip().splitlines()[-1])
    assert not imported["root"] and not imported["ours"]


def in_process(*args: str) -> int:
    """The same command in this process (cheaper: torch is already imported here)."""
    return main(["eval", "--no-progress", *args])


def test_all_five_tasks_end_to_end_then_rescore(tmp_path, tiny_world, tiny_model_dir, caplog, capsys):
    paths = write_all(tmp_path / "data", tiny_world)
    out = tmp_path / "result"
    with judge_server(heron_judge) as (url, bodies):
        args = ["--model", f"tiny={tiny_model_dir}", "--tasks", TASKS, *data_flags(paths), "--output", str(out),
                "--batch-size", "4", "--max-new-tokens", "6", "--limit", "4", "--judge-url", url,
                "--judge-model", "gpt-4o-2024-11-20", "--judge-api-key-env", "TEST_JUDGE_KEY"]  # fmt: skip
        result = run_cli(tmp_path, *args, TEST_JUDGE_KEY="sk-test-123")
        assert result.returncode == 0, result.stderr[-3000:]

        expected_n = {
            "ja-vg-vqa-500": 4,
            "ja-vlm-bench-in-the-wild": 3,
            "heron-bench": 4,
            "jdocqa": 4,
            "synthetic": 4,
        }
        summaries = {}
        for task, n in expected_n.items():
            d = out / task / "tiny"
            assert len(lines(d / "prediction.jsonl")) == n and len(lines(d / "evaluation.jsonl")) == n, task
            summaries[task] = json.loads((d / "summary.json").read_text(encoding="utf-8"))
            assert summaries[task]["settings"]["max_new_tokens"] == 6
        assert [p["n_images"] for p in lines(out / "jdocqa" / "tiny" / "prediction.jsonl")] == [1, 2, 4, 3]

        # The judge was asked over HTTP with the key from the environment and the context.
        heron_bodies = [b for b in bodies if "gpt4o_answer" in b["messages"][-1]["content"]]
        assert len(heron_bodies) == 5 and all(
            b["_headers"]["Authorization"] == "Bearer sk-test-123" for b in bodies
        )
        # VG-VQA and JVB-ItW are also judged (eval-mm's llm-as-a-judge), non-empty answers only.
        answered = sum(
            1
            for task in ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild")
            for p in lines(out / task / "tiny" / "prediction.jsonl")
            if p["text"] != ""
        )
        assert len(bodies) - len(heron_bodies) == answered
        vg = summaries["ja-vg-vqa-500"]["metrics"]
        assert vg["llm_as_a_judge"] == pytest.approx(
            8.0 * sum(p["text"] != "" for p in lines(out / "ja-vg-vqa-500" / "tiny" / "prediction.jsonl")) / 4
        )
        assert summaries["ja-vg-vqa-500"]["settings"]["judge"]["metric"] == "llm-as-a-judge"
        assert any("浅草寺の雷門の写真" in b["messages"][-1]["content"] for b in bodies)
        heron = summaries["heron-bench"]["metrics"]
        assert heron["overall"] == pytest.approx(50.0) and heron["judge_failures"] == 1

        # The table: our row beside every article row, and the settings.
        table = result.stdout
        ours = next(line for line in table.splitlines() if line.startswith("| tiny | this run |"))
        assert "| 50.00 (1/4 unjudged) |" in ours and "greedy; max_new_tokens 6; llm-jp-v1" in ours
        for ref in ARTICLE_ROWS:
            assert f"| {ref['model']} | published" in table
        assert "| 12.05 | 42.80 | 44.24 | 40.00 | 48.16 | 44.96 |" in table
        assert "Scored with rouge-score " in table and "fugashi " in table and "sacrebleu " in table
        assert (out / "summary.md").read_text(encoding="utf-8") in table
        assert (
            (out / "summary.csv").read_text(encoding="utf-8").startswith("model,source,JA-VG-VQA-500 ROUGE-L")
        )

        # --rescore (in-process): no model, same numbers; the judge is asked again only where it failed.
        bodies.clear()
        caplog.set_level(logging.INFO)
        rc = in_process("--rescore", "--tasks", TASKS, *data_flags(paths), "--output", str(out),
                        "--limit", "4", "--judge-url", url, "--judge-model", "gpt-4o-2024-11-20")  # fmt: skip
        assert rc == 0
        assert "| tiny | this run |" in capsys.readouterr().out
        assert "loaded" not in caplog.text and "to generate" not in caplog.text
        assert len(bodies) == 2
        for task in expected_n:
            again = json.loads((out / task / "tiny" / "summary.json").read_text(encoding="utf-8"))
            assert again["metrics"] == summaries[task]["metrics"], task
            assert again["settings"]["max_new_tokens"] == 6


def test_sigkill_mid_run_then_resume(tmp_path, tiny_world, tiny_model_dir, caplog):
    records = json.loads((tiny_world / "test.json").read_text(encoding="utf-8"))
    many = [
        {**r, "id": f"{r['id']}-{k}", "image": str(tiny_world / r["image"])}
        for k in range(2)
        for r in records
    ][:24]
    world = tmp_path / "world"
    world.mkdir()
    (world / "test.json").write_text(json.dumps(many, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "result"
    pred = out / "synthetic" / "tiny" / "prediction.jsonl"
    args = ["--model", f"tiny={tiny_model_dir}", "--tasks", "synthetic", "--data", f"synthetic={world}",
            "--output", str(out), "--max-new-tokens", "12"]  # fmt: skip

    proc = subprocess.Popen(
        eval_cmd(*args, "--batch-size", "1"),
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if pred.exists() and pred.read_text(encoding="utf-8").count("\n") >= 3:
                proc.kill()  # SIGKILL: no handler, no cleanup
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, "the run ended before it could be killed"
    done = [json.loads(x) for x in pred.read_text(encoding="utf-8").splitlines() if x.endswith("}")]
    assert 3 <= len(done) < len(many)

    caplog.set_level(logging.INFO)
    assert in_process(*args, "--batch-size", "8") == 0  # batch size does not invalidate the cache
    assert f"{len(done)} cached predictions, {len(many) - len(done)} to generate" in caplog.text
    final = lines(pred)
    assert [p["question_id"] for p in final] == [r["id"] for r in many]
    resumed = {p["question_id"]: p["text"] for p in final}
    assert all(resumed[p["question_id"]] == p["text"] for p in done)  # kept, not regenerated


def test_wrong_schema_fails_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "jdocqa.parquet"
    jdocqa_dataset().remove_columns("answer_type").to_parquet(str(bad))
    rc = in_process("--model", str(tmp_path / "no-such-model"), "--tasks", "jdocqa",
                    "--data", f"jdocqa={bad}", "--output", str(tmp_path / "r"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "missing column(s) 'answer_type'" in err and str(bad) in err


def test_unknown_task_and_bad_flags_are_user_errors(capsys):
    assert in_process("--model", "m", "--tasks", "mmmu") == 2
    assert "unknown task 'mmmu'; known tasks: ja-vg-vqa-500" in capsys.readouterr().err
    assert in_process("--tasks", "synthetic") == 2
    assert "give at least one --model DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        in_process("--model", "m", "--data", "no-equals-sign")
    assert "--data takes TASK=PATH" in capsys.readouterr().err


def test_list_tasks_prints_each_task_metric_and_layout(capsys):
    from convllava_jp.eval.tasks import task_names

    assert in_process("--list-tasks") == 0
    out = capsys.readouterr().out
    for name in task_names():
        assert f"\n{name}\n  metric: " in f"\n{out}", name
    assert "wulipc/CC-OCR [test, config multi_lan_ocr]" in out and "llm-as-a-judge (with --judge-url)" in out
    assert out.count("  layout: ") == len(task_names())
