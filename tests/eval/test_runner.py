"""The runner in-process: result files, cache and resume, rescoring, failures, the judge over real HTTP,
and the summary tables. A scripted pipeline stands in for the model where only the bookkeeping is
under test; the tiny random model runs where the prompts and batching are."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from convllava_jp.demo.evaluate import evaluate_synthetic
from convllava_jp.errors import ConfigError, DataError, ImageError
from convllava_jp.eval.judge import JudgeConfig
from convllava_jp.eval.published import EVALMM_SOURCE, PUBLISHED_ROWS
from convllava_jp.eval.report import ARTICLE_SOURCE, summary_tables, write_summary
from convllava_jp.eval.runner import (
    EvalModel,
    EvalSettings,
    generate_predictions,
    run_eval,
    run_task,
)
from convllava_jp.eval.tasks import get_task
from convllava_jp.io import read_jsonl

from .test_tasks import HERON_ROWS, write_heron_bench

JUDGE_VERSION = "judge-2024-11-20"


# --- helpers -------------------------------------------------------------------------------------


class ScriptedPipeline:
    """Answers `answer(request)`; raises ImageError when a batch holds the image `fail_on`; logs prompts."""

    def __init__(self, answer: Callable[[Any], str] = lambda r: "3つです。", fail_on: str | None = None):
        self.answer = answer
        self.fail_on = fail_on
        self.prompts: list[str] = []

    def generate(self, requests, config, batch_size=8):
        prompts = [r.messages[-1]["content"] for r in requests]
        if self.fail_on is not None and any(self.fail_on in r.images for r in requests):
            raise ImageError(f"{self.fail_on}: bad image")
        self.prompts += prompts
        return [
            SimpleNamespace(text=self.answer(r), finish_reason="stop", completion_tokens=2) for r in requests
        ]


def never() -> Any:
    raise AssertionError("the model was loaded although every prediction was cached")


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    from convllava_jp.infer.generation import VLMPipeline

    return VLMPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    """A world whose test.json may be edited (images point back at the session world)."""
    records = json.loads((tiny_world / "test.json").read_text(encoding="utf-8"))
    for r in records:
        r["image"] = str(tiny_world / r["image"])
    out = tmp_path / "world"
    out.mkdir()
    (out / "test.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


def quiet(**kw: Any) -> EvalSettings:
    kw.setdefault("show_progress", False)
    return EvalSettings(**kw)


def run_synthetic(world: Path, model_dir: Path, out: Path, get_pipeline, **kw: Any) -> dict:
    task = get_task("synthetic")
    samples = task.load(world, kw.pop("limit", None))
    return run_task(task, samples, EvalModel("m", model_dir), out, quiet(**kw), get_pipeline=get_pipeline)


@contextmanager
def judge_server(reply: Callable[[dict], tuple[int, Any]]) -> Iterator[tuple[str, list[dict]]]:
    """A real OpenAI-compatible HTTP judge on 127.0.0.1; yields (url, request bodies).

    Each body also gets the request's headers under "_headers".
    """
    bodies: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # name fixed by http.server
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_headers"] = dict(self.headers)
            with lock:
                bodies.append(body)
            status, payload = reply(body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def chat_completion(content: str) -> dict:
    return {
        "model": JUDGE_VERSION,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


def heron_judge(body: dict) -> tuple[int, Any]:
    """Scores 8 (reference) and 4 (model); answers garbage whenever the question is '電車の名前は？'."""
    prompt = body["messages"][-1]["content"]
    if "電車の名前は？" in prompt:
        return 200, chat_completion("I cannot decide.")
    return 200, chat_completion('```json\n{"score_gpt": 8, "score": 4}\n```')


# --- result files, prompts, batching -------------------------------------------------------------


def test_results_are_written_with_the_prompt_as_trained(pipeline, tiny_world, tiny_model_dir, tmp_path):
    summary = run_synthetic(tiny_world, tiny_model_dir, tmp_path, lambda: pipeline, limit=4, max_new_tokens=5)
    out = tmp_path / "synthetic" / "m"
    samples = get_task("synthetic").load(tiny_world, 4)
    preds = read_jsonl(out / "prediction.jsonl")
    assert [p["question_id"] for p in preds] == [s.id for s in samples]
    for p, s in zip(preds, samples):
        # The runner's prompt is what `chat` (and training) use: '<image>\n' + question.
        assert p["text"] == pipeline.chat(s.images[0], s.question, max_new_tokens=5)
        assert p["answer"] == s.reference and p["input_text"] == s.question and p["error"] is None
    evals = read_jsonl(out / "evaluation.jsonl")
    assert [e["question_id"] for e in evals] == [s.id for s in samples]
    assert json.loads((out / "summary.json").read_text()) == summary
    st = summary["settings"]
    assert st["max_new_tokens"] == 5 and st["decoding"] == "greedy" and st["template"] == "llm-jp-v1"
    assert st["packages"]["transformers"] and st["packages"]["rouge-score"]
    assert summary["counts"] == {
        "cached_predictions": 0,
        "generated": 4,
        "n": 4,
        "empty_predictions": sum(1 for p in preds if not p["text"].strip()),
        "generation_errors": 0,
    }


def test_batching_does_not_change_answers(pipeline, tiny_world):
    samples = get_task("synthetic").load(tiny_world, limit=6)
    one = generate_predictions(pipeline, samples, {"max_new_tokens": 6}, 1, show_progress=False)
    many = generate_predictions(pipeline, samples, {"max_new_tokens": 6}, 5, show_progress=False)
    assert {k: v["text"] for k, v in one.items()} == {k: v["text"] for k, v in many.items()}


def test_evaluate_synthetic_keeps_its_contract(pipeline, tiny_world, tiny_model_dir, tmp_path):
    scores, samples = evaluate_synthetic(pipeline, tiny_world, batch_size=3, max_new_tokens=5, limit=6)
    assert set(scores) == {"exact_match", "chance", "n", "per_type"} and scores["n"] == 6
    assert {"id", "image", "question", "answer", "qtype", "chance", "prediction", "correct"} <= set(
        samples[0]
    )
    summary = run_synthetic(tiny_world, tiny_model_dir, tmp_path, lambda: pipeline, limit=6, max_new_tokens=5)
    assert summary["metrics"] == scores  # the demo and `eval` agree


# --- cache, invalidation, resume, rescore -------------------------------------------------------


def test_cache_is_reused_and_invalidated_by_model_prompt_and_decoding(world_copy, tiny_model_dir, tmp_path):
    out = tmp_path / "res"
    first = ScriptedPipeline()
    run_synthetic(world_copy, tiny_model_dir, out, lambda: first)
    n = len(first.prompts)
    assert n == 16

    assert run_synthetic(world_copy, tiny_model_dir, out, never)["counts"]["cached_predictions"] == n

    p = ScriptedPipeline()
    run_synthetic(world_copy, tiny_model_dir, out, lambda: p, max_new_tokens=4)  # decoding changed
    assert len(p.prompts) == n

    records = json.loads((world_copy / "test.json").read_text(encoding="utf-8"))
    records[3]["conversations"][0]["value"] += "教えてください。"  # one prompt changed
    (world_copy / "test.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    p = ScriptedPipeline()
    summary = run_synthetic(world_copy, tiny_model_dir, out, lambda: p, max_new_tokens=4)
    assert p.prompts == ["<image>\n" + records[3]["conversations"][0]["value"].split("\n", 1)[1]]
    assert summary["counts"]["cached_predictions"] == n - 1

    changed = tmp_path / "model-b"
    shutil.copytree(tiny_model_dir, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte differs
    weights.write_bytes(bytes(data))
    p = ScriptedPipeline()
    run_synthetic(world_copy, changed, out, lambda: p, max_new_tokens=4)
    assert len(p.prompts) == n

    p = ScriptedPipeline()
    run_synthetic(world_copy, changed, out, lambda: p, max_new_tokens=4, use_cache=False)
    assert len(p.prompts) == n

    p = ScriptedPipeline()
    run_synthetic(world_copy, changed, out, lambda: p, max_new_tokens=4, template="plain")  # template
    assert len(p.prompts) == n


def test_cache_misses_when_an_images_bytes_change(world_copy, tiny_model_dir, tmp_path):
    out = tmp_path / "res"
    records = json.loads((world_copy / "test.json").read_text(encoding="utf-8"))
    image = tmp_path / "edited.png"
    shutil.copy(records[5]["image"], image)
    records[5]["image"] = str(image)  # same path from now on; only its bytes will change
    (world_copy / "test.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    run_synthetic(world_copy, tiny_model_dir, out, lambda: ScriptedPipeline())
    from PIL import Image

    with Image.open(image) as im:
        edited = im.convert("RGB")
    edited.putpixel((0, 0), tuple(255 - c for c in edited.getpixel((0, 0))))
    edited.save(image)
    p = ScriptedPipeline()
    summary = run_synthetic(world_copy, tiny_model_dir, out, lambda: p)
    assert len(p.prompts) == 1 and summary["counts"]["generated"] == 1


def test_resume_after_an_interrupted_write(world_copy, tiny_model_dir, tmp_path):
    run_synthetic(world_copy, tiny_model_dir, tmp_path, lambda: ScriptedPipeline())
    path = tmp_path / "synthetic" / "m" / "prediction.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20], encoding="utf-8")  # killed mid-line

    p = ScriptedPipeline()
    summary = run_synthetic(world_copy, tiny_model_dir, tmp_path, lambda: p)
    assert len(p.prompts) == 11 and summary["counts"]["cached_predictions"] == 5
    assert path.read_text(encoding="utf-8").splitlines(keepends=True) == lines


def test_rescore_needs_no_model_and_reproduces_the_summary(world_copy, tiny_model_dir, tmp_path):
    task = get_task("synthetic")
    samples = task.load(world_copy)
    answers = {s.images[0]: s.reference for s in samples[::2]}
    pipe = ScriptedPipeline(lambda request: answers.get(request.images[0], "x"))
    first = run_synthetic(world_copy, tiny_model_dir, tmp_path, lambda: pipe)
    (tmp_path / "synthetic" / "m" / "evaluation.jsonl").unlink()
    again = run_task(task, samples, EvalModel("m"), tmp_path, quiet(), rescore=True)
    assert again["metrics"] == first["metrics"] and first["metrics"]["exact_match"] == 0.5
    assert (
        again["settings"]["max_new_tokens"] == 16 and again["model_fingerprint"] == first["model_fingerprint"]
    )

    with pytest.raises(DataError, match="no saved predictions"):
        run_task(task, samples, EvalModel("other"), tmp_path, quiet(), rescore=True)
    lines = (tmp_path / "synthetic" / "m" / "prediction.jsonl").read_text().splitlines()
    (tmp_path / "synthetic" / "m" / "prediction.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(DataError, match="lacks 2 of 16 samples"):
        run_task(task, samples, EvalModel("m"), tmp_path, quiet(), rescore=True)


def test_empty_answers_are_scored_and_failed_samples_recorded(world_copy, tiny_model_dir, tmp_path):
    samples = get_task("synthetic").load(world_copy)
    bad = samples[2]
    pipe = ScriptedPipeline(lambda r: "", fail_on=bad.images[0])
    summary = run_synthetic(world_copy, tiny_model_dir, tmp_path, lambda: pipe, batch_size=4)
    evals = {e["question_id"]: e for e in read_jsonl(tmp_path / "synthetic" / "m" / "evaluation.jsonl")}
    assert len(evals) == 16 and all(e["exact-match"] == 0.0 and e["empty_prediction"] for e in evals.values())
    assert evals[bad.id]["generation_error"] == f"{bad.images[0]}: bad image"
    assert sum("generation_error" in e for e in evals.values()) == 1  # its batch-mates were retried alone
    assert summary["counts"]["generation_errors"] == 1 and summary["counts"]["empty_predictions"] == 16
    assert summary["metrics"]["n"] == 16  # nothing skipped

    fixed = ScriptedPipeline()
    run_synthetic(world_copy, tiny_model_dir, tmp_path, lambda: fixed, batch_size=4)
    assert len(fixed.prompts) == 1  # only the failed sample is generated again
    assert read_jsonl(tmp_path / "synthetic" / "m" / "prediction.jsonl")[2]["text"] == "3つです。"


# --- Heron-Bench and the judge ----------------------------------------------------------------------


def heron_run(tmp_path, tiny_model_dir, judge, pipe, **kw):
    data = write_heron_bench(tmp_path / "heron.parquet")
    return run_eval(
        [EvalModel("m", tiny_model_dir)],
        ["heron-bench"],
        tmp_path / "res",
        quiet(**kw),
        data={"heron-bench": str(data)},
        judge=judge,
        pipeline_factory=lambda model, settings: pipe,
    )[0]


def test_heron_judge_over_http_records_failures_and_reuses_verdicts(tmp_path, tiny_model_dir):
    with judge_server(heron_judge) as (url, bodies):
        judge = JudgeConfig(url=url, model="gpt-4o-2024-11-20", max_retries=1, backoff_s=0.01)
        summary = heron_run(tmp_path, tiny_model_dir, judge, ScriptedPipeline(lambda r: ""))
        # 3 good verdicts + the garbage one asked twice; every answer (all empty) was judged.
        assert len(bodies) == 5
        prompts = [b["messages"][-1]["content"] for b in bodies]
        for _, _, context, text, reference in HERON_ROWS:
            assert any(context in p and text in p and reference in p for p in prompts)
        assert all(b["model"] == "gpt-4o-2024-11-20" and b["temperature"] == 0 for b in bodies)

        m = summary["metrics"]
        assert m["conv"] == pytest.approx(50.0) and m["detail"] == pytest.approx(50.0)
        assert m["complex"] == pytest.approx(50.0) and m["overall"] == pytest.approx(50.0)
        assert m["judge_failures"] == 1 and m["conv_parse_errors"] == 1 and m["n"] == 4
        assert m["judge_model_versions"] == [JUDGE_VERSION]
        assert summary["settings"]["judge"]["model"] == "gpt-4o-2024-11-20"
        evals = {
            e["question_id"]: e
            for e in read_jsonl(tmp_path / "res" / "heron-bench" / "m" / "evaluation.jsonl")
        }
        assert evals["3"]["error"] == "parse" and evals["3"]["score"] == -1  # recorded, never 0 or 10
        assert evals["0"]["score"] == 4 and evals["0"]["score_gpt"] == 8 and evals["0"]["error"] is None

        bodies.clear()
        heron_run(tmp_path, tiny_model_dir, judge, ScriptedPipeline(lambda r: ""))
        assert len(bodies) == 2  # only the failed verdict is asked again (twice: garbage again)


def test_unreachable_or_absent_judge_is_reported_not_scored(tmp_path, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    judge = JudgeConfig(url=f"http://127.0.0.1:{port}", model="j", max_retries=1, backoff_s=0.01, timeout_s=2)
    summary = heron_run(tmp_path, tiny_model_dir, judge, ScriptedPipeline())
    evals = read_jsonl(tmp_path / "res" / "heron-bench" / "m" / "evaluation.jsonl")
    assert all(e["error"].startswith("connection") and e["score"] == -1 for e in evals)
    assert summary["metrics"]["overall"] is None and summary["metrics"]["judge_failures"] == 4

    summary = heron_run(tmp_path, tiny_model_dir, None, ScriptedPipeline())
    assert summary["metrics"]["overall"] is None and summary["metrics"]["not_judged"] == 4
    table = summary_tables([summary]).markdown
    assert "not judged" in table


# --- tables, names, settings ---------------------------------------------------------------------


def fake_summary(task: str, model: str, metrics: dict, **settings: Any) -> dict:
    return {
        "task": task,
        "model": model,
        "metrics": {"n": 10, **metrics},
        "counts": {"n": 10, "empty_predictions": 1, "generation_errors": 0},
        "settings": {
            "max_new_tokens": 256,
            "decoding": "greedy",
            "template": "llm-jp-v1",
            "judge": None,
            "dataset": "d",
            "packages": {"convllava-jp": "0.1.0", "transformers": "5.24.0", "torch": "2.14.1"},
            **settings,
        },
    }


def test_summary_table_puts_the_article_rows_beside_ours(tmp_path):
    judge = {"model": "gpt-4o-2024-11-20", "temperature": 0.0}
    summaries = [
        fake_summary("ja-vg-vqa-500", "mine", {"score": 10.5}),
        fake_summary(
            "heron-bench",
            "mine",
            {
                "detail": 40.0,
                "conv": 41.0,
                "complex": 42.0,
                "overall": 41.0,
                "judge_failures": 1,
                "judge_model_versions": ["gpt-4o-2024-11-20"],
            },
            judge=judge,
        ),
        fake_summary("synthetic", "other", {"exact_match": 0.925}, max_new_tokens=16),
    ]
    md_path, csv_path, tables = write_summary(tmp_path, summaries)
    md = tables.markdown
    assert md_path.read_text(encoding="utf-8") == md
    header = md.splitlines()[0]
    assert "JA-VG-VQA-500 ROUGE-L" in header and "Heron avg" in header and "synthetic EM %" in header
    mine = next(line for line in md.splitlines() if line.startswith("| mine | this run"))
    assert "| 10.50 |" in mine and "| 41.00 (1/10 unjudged) |" in mine
    assert "judge gpt-4o-2024-11-20 (gpt-4o-2024-11-20)" in mine and "max_new_tokens 256" in mine
    assert "| 92.50 |" in next(line for line in md.splitlines() if line.startswith("| other |"))
    ref = next(line for line in md.splitlines() if line.startswith("| ConvLLaVA-JP-1.3b-768 |"))
    assert ARTICLE_SOURCE in ref and "| 12.05 | 42.80 | 44.24 | 40.00 | 48.16 | 44.96 |" in ref
    assert "| heron-bench | mine | 10 | 256 | greedy | llm-jp-v1 | gpt-4o-2024-11-20" in md  # settings table
    assert "DESIGN" not in md  # no reference to documents outside the repository

    rows = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    assert rows[0][:2] == ["model", "source"] and len(rows) == 1 + 2 + len(PUBLISHED_ROWS)
    assert {r[1] for r in rows[1:]} == {"this run", ARTICLE_SOURCE, EVALMM_SOURCE}
    # eval-mm's leaderboard row: its cells where it publishes the same metric, empty elsewhere.
    nvila = dict(zip(rows[0], next(r for r in rows if r[0] == "turing-motors/Heron-NVILA-Lite-2B")))
    assert nvila["VG-VQA LLM (1-5)"] == "3.81" and nvila["Heron overall_rel"] == "63.22"
    assert nvila["JA-VG-VQA-500 ROUGE-L"] == "" and nvila["Heron avg"] == ""
    assert "max_new_tokens 256" in nvila["settings"] and "gpt-4o-2024-11-20" in nvila["settings"]
    stable = dict(zip(rows[0], next(r for r in rows if r[0] == "Japanese Stable VLM")))
    assert stable["JA-VG-VQA-500 ROUGE-L"] == "" and stable["Heron avg"] == "38.07"  # '-' in the article
    assert "ConvLLaVA-JP" not in summary_tables(summaries, include_article=False).markdown


def test_model_spec_names():
    assert EvalModel.parse("runs/stage3") == EvalModel("stage3", Path("runs/stage3"))
    assert EvalModel.parse("mine=runs/a/final") == EvalModel("mine", Path("runs/a/final"))
    with pytest.raises(ConfigError, match="batch_size"):
        EvalSettings(batch_size=0)
    with pytest.raises(ConfigError, match="not among the tasks"):
        run_eval([], ["synthetic"], "x", data={"jdocqa": "y"})
