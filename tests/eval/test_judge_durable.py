"""The judge keeps every paid verdict: per-item errors, Retry-After, Ctrl-C, a real kill, --judge-runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from convllava_jp.eval import judge_client
from convllava_jp.eval.judge import JudgeConfig, JudgeJob, JudgeRun
from convllava_jp.eval.judge_prompts import first_digit, heron_parse
from convllava_jp.io import read_jsonl

from .test_tasks import WILD_ROWS, write_ja_vlm_bench_in_the_wild

GOLDEN = json.loads((Path(__file__).parent / "golden" / "evalmm_golden.json").read_text(encoding="utf-8"))


@contextmanager
def fake_judge(reply) -> Iterator[tuple[str, dict]]:
    """A real HTTP judge on 127.0.0.1: `reply(content, state)` -> (status, body bytes|dict, headers)|None.

    None holds the request until `state["release"]` is set, then drops it unanswered.
    `state["answered"]` counts replies actually sent (what a paid API would bill).
    """
    state: dict[str, Any] = {
        "answered": 0,
        "seen": {},
        "release": threading.Event(),
        "lock": threading.Lock(),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # name fixed by http.server
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            with state["lock"]:
                out = reply(content, state)
            if out is None:
                state["release"].wait(30)
                self.close_connection = True
                return
            status, payload, headers = out
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            with state["lock"]:
                state["answered"] += 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        state["release"].set()
        server.shutdown()
        server.server_close()


def chat(content: str) -> dict:
    return {
        "model": "judge-v1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


def cfg(url: str, **kw: Any) -> JudgeConfig:
    kw.setdefault("max_retries", 1)
    kw.setdefault("backoff_s", 0.0)
    kw.setdefault("timeout_s", 10.0)
    return JudgeConfig(url, "judge", **kw)


def heron_job(qid: str, text: str) -> JudgeJob:
    return JudgeJob(qid, 0, "heron-judge", [{"role": "user", "content": text}], heron_parse)


def test_each_bad_reply_is_that_items_result_and_the_rest_are_judged(tmp_path):
    huge = "9" * 400
    replies = {
        "good": (200, chat('{"score_gpt": 8, "score": 6}'), {}),
        "huge": (200, chat(f'{{"score_gpt": {huge}, "score": {huge}}}'), {}),
        "bad-json": (200, chat('{"score_gpt": 8, "score": '), {}),
        "not-utf8": (200, b"\xff\xfe\x00garbage", {}),
        "server-error": (500, {"error": "boom"}, {}),
        "client-error": (400, {"error": "bad request"}, {}),
    }
    with fake_judge(lambda content, state: replies[content]) as (url, state):
        run = JudgeRun(cfg(url), tmp_path / "judge.jsonl")
        got = run.ask([heron_job(k, k) for k in replies])
    by_id = {v["question_id"]: v for v in got.values()}
    assert by_id["good"]["value"] == {"score_gpt": 8.0, "score": 6.0} and by_id["good"]["error"] is None
    for bad in ("huge", "bad-json", "not-utf8"):
        assert by_id[bad]["error"].startswith("parse"), bad
    assert by_id["server-error"]["error"].startswith("http 500")
    assert by_id["client-error"]["error"].startswith("http 400")
    logged = read_jsonl(tmp_path / "judge.jsonl")
    assert sorted(r["question_id"] for r in logged) == sorted(replies)  # every input and output saved
    assert all(r["messages"] and r["prompt_sha"] and r["judge_model"] == "judge" for r in logged)
    assert next(r for r in logged if r["question_id"] == "good")["raw"] == '{"score_gpt": 8, "score": 6}'


def test_retry_after_is_honoured_with_jitter(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(judge_client.time, "sleep", slept.append)
    answers = iter([(429, {"error": "slow down"}, {"Retry-After": "7"}), (200, chat("4"), {})])
    with fake_judge(lambda content, state: next(answers)) as (url, _):
        run = JudgeRun(cfg(url, backoff_s=0.5))
        got = run.ask([JudgeJob("q", 0, "llm-as-a-judge", [{"role": "user", "content": "x"}], first_digit)])
    assert next(iter(got.values()))["value"] == 4
    assert len(slept) == 1 and 7.0 <= slept[0] <= 7.0 * 1.25  # the server's wait, not the 0.5 s backoff


def test_no_key_to_plain_http_elsewhere(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    run = JudgeRun(cfg("http://judge.example.org:8000"))
    with pytest.raises(Exception, match="plain http"):
        run.ask([heron_job("a", "a")])


def test_ctrl_c_keeps_finished_verdicts_and_resume_asks_only_the_rest(tmp_path):
    calls = {"n": 0}

    def parse(text: str) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return first_digit(text)

    jobs = [
        JudgeJob(str(i), 0, "llm-as-a-judge", [{"role": "user", "content": str(i)}], parse) for i in range(6)
    ]
    with fake_judge(lambda content, state: (200, chat("5"), {})) as (url, state):
        run = JudgeRun(cfg(url, max_workers=1), tmp_path / "judge.jsonl")
        with pytest.raises(KeyboardInterrupt):
            run.ask(jobs)
        kept = {r["question_id"] for r in read_jsonl(tmp_path / "judge.jsonl")}
        assert {"0", "1"} <= kept and "2" not in kept  # answers in flight at Ctrl-C were logged too
        paid = state["answered"]
        got = JudgeRun(cfg(url, max_workers=1), tmp_path / "judge.jsonl").ask(jobs)
        assert len(got) == 6 and all(v["value"] == 5 for v in got.values())
        assert state["answered"] - paid == 6 - len(kept)  # logged verdicts were not asked again


# --- --judge-runs 3 through the CLI, killed and resumed -----------------------------------------------


def _write_predictions(out: Path) -> None:
    d = out / "ja-vlm-bench-in-the-wild" / "m"
    d.mkdir(parents=True)
    rows = [
        {"question_id": str(i), "text": a[:3] + "です", "answer": a} for i, (_, a) in enumerate(WILD_ROWS)
    ]
    (d / "prediction.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )


def _cli(url: str, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "convllava_jp.cli", "eval", "--rescore", "--model", "m", "--tasks",
            "ja-vlm-bench-in-the-wild", "--data", f"ja-vlm-bench-in-the-wild={data}", "--output", str(out),
            "--judge-url", url, "--judge-model", "judge", "--judge-runs", "3", "--judge-workers", "1",
            "--judge-retries", "0", "--no-progress", "--no-reference"]  # fmt: skip


def test_judge_runs_3_killed_then_resumed_pays_each_verdict_once(tmp_path):
    data = write_ja_vlm_bench_in_the_wild(tmp_path / "wild")
    out = tmp_path / "res"
    _write_predictions(out)
    log = out / "ja-vlm-bench-in-the-wild" / "m" / "judge.jsonl"
    hold = {"on": True}

    def reply(content: str, state: dict) -> Any:
        n = state["seen"].get(content, 0)
        if hold["on"] and state["answered"] >= 4:
            return None  # the 5th request hangs until the process is killed
        state["seen"][content] = n + 1
        return 200, chat(str(3 + n)), {}  # run r of every item scores 3 + r

    env = {**os.environ, "OPENAI_API_KEY": "", "OMP_NUM_THREADS": "1"}
    with fake_judge(reply) as (url, state):
        proc = subprocess.Popen(_cli(url, data, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while not (log.exists() and len(read_jsonl(log)) >= 4):
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode())
                threading.Event().wait(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert len(read_jsonl(log)) == 4 and state["answered"] == 4
        hold["on"] = False
        state["release"].set()
        done = subprocess.run(_cli(url, data, out), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert state["answered"] == 9  # 3 items x 3 runs, each paid once
    summary = json.loads((out / "ja-vlm-bench-in-the-wild" / "m" / "summary.json").read_text("utf-8"))
    m = summary["metrics"]
    assert m["llm_as_a_judge"] == pytest.approx(4.0)
    spread = m["llm_as_a_judge_runs"]
    assert spread["runs"] == [3.0, 4.0, 5.0] and spread["std"] == pytest.approx(1.0)
    judge = summary["settings"]["judge"]
    assert judge["runs"] == 3 and judge["metric"] == "llm-as-a-judge" and len(judge["prompt_sha"]) == 16
    assert len({r["key"] for r in read_jsonl(log)}) == 9
    assert "4.00 ±1.00 (3 judge runs)" in (out / "summary.md").read_text("utf-8")


def test_llm_as_a_judge_task_score_matches_the_golden_mean():
    cases = GOLDEN["llm_as_a_judge"]["cases"]
    from convllava_jp.eval.tasks import Sample, get_task

    replies = {f"Q{i}": c["reply"] for i, c in enumerate(cases)}

    def reply(content: str, state: dict) -> Any:
        qid = next(q for q in replies if f"Question: {q}\n" in content)
        return 200, chat(replies[qid]), {}

    task = get_task("ja-vg-vqa-500")
    samples = [Sample(str(i), f"Q{i}", "犬", [b"x"]) for i in range(len(cases))]
    preds = {str(i): c["pred"] for i, c in enumerate(cases)}
    with fake_judge(reply) as (url, state):
        records = task.score(samples, preds, judge=cfg(url))
        assert state["answered"] == len(cases) - 1  # the empty answer was not sent
    assert [r["llm-as-a-judge"] for r in records] == [c["expected"] for c in cases]
    assert task.aggregate(records)["llm_as_a_judge"] == pytest.approx(GOLDEN["llm_as_a_judge"]["mean"])


def test_the_judge_sees_the_question_as_written_the_model_without_image_tags(tmp_path):
    from convllava_jp.eval.tasks import get_task

    from .test_tasks import write_ja_vg_vqa_500

    task = get_task("ja-vg-vqa-500")
    samples = task.load(write_ja_vg_vqa_500(tmp_path / "vg"))
    tagged = next(s for s in samples if s.id == "301")
    assert tagged.prompt == "<image>\n人は何人いますか？"  # the model's copy: eval-mm's runner drops the tag
    asked: list[str] = []

    def reply(content: str, state: dict) -> Any:
        asked.append(content)
        return 200, chat("3"), {}

    with fake_judge(reply) as (url, _):
        task.score([tagged], {"301": "二人"}, judge=cfg(url))
    assert "Question: <image>人は何人いますか？\n" in asked[0]  # eval-mm's input_text, as written
