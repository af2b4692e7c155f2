"""`chat` and `predict` as real subprocesses: answers equal the Python API's, a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from convllava_jp import cli
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest
from convllava_jp.io import text_lines

from ._support import command, subprocess_env

QUESTIONS = ["画像を説明してください。", "何色ですか？", "左上には何がありますか？", "円はいくつありますか？"]
TOKENS = 24


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args, "--num-threads", "1", "--device", "cpu"),
        input=stdin,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )


def test_help_lists_the_commands_and_their_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("chat", "predict", "serve", "webui"):
        assert name in text
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--allow-local-files",
        "--api-key",
        "--max-batch-size",
        "--max-image-pixels",
        "--request-timeout",
    ):
        assert option in text


def write_questions(path: Path, images: list[Path], n: int) -> list[dict]:
    records = [
        {
            "id": f"q{i}",
            "image": images[i % len(images)].name,
            "question": QUESTIONS[i % len(QUESTIONS)] * (1 + i % 2),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def expected_answers(pipeline, records: list[dict], image_dir: Path) -> dict[str, str]:
    requests = [
        GenerationRequest(pipeline.question_messages(r["question"], 1), [image_dir / r["image"]])
        for r in records
    ]
    results = pipeline.generate(requests, GenerationConfig(max_new_tokens=TOKENS), batch_size=8)
    return {r["id"]: res.text for r, res in zip(records, results)}


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in text_lines(path.read_text(encoding="utf-8"))]


def test_predict_resumes_after_a_real_kill(model_dir, pipeline, images, tmp_path):
    # Record q5's image is a named pipe: opening it blocks until someone writes to it, so the run
    # stops exactly in the batch [q4, q5] after writing q0..q3, and is killed there (no timing race).
    for image in images:
        (tmp_path / image.name).write_bytes(image.read_bytes())
    inp = tmp_path / "questions_kill.jsonl"
    records = write_questions(inp, images, 12)
    gate = tmp_path / "gate.png"
    os.mkfifo(gate)
    records[5]["image"] = gate.name
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    args = ["predict", "--model", str(model_dir), "--input", str(inp), "--output", str(out)]
    args += ["--batch-size", "2", "--max-new-tokens", str(TOKENS), "--num-threads", "1", "--device", "cpu"]
    proc = subprocess.Popen(
        command(*args), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_lines(out, 4, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    written = read_output(out)
    assert [r["id"] for r in written] == ["q0", "q1", "q2", "q3"]

    gate.unlink()
    gate.write_bytes(images[1].read_bytes())
    second = run(*args[:-4])
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    final = read_output(out)
    assert [r["id"] for r in final] == [r["id"] for r in records]  # each once, in order
    assert final[: len(written)] == written  # nothing written before the kill was redone
    want = expected_answers(pipeline, records, tmp_path)
    assert {r["id"]: r["answer"] for r in final} == want
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == TOKENS for r in final)

    assert cli.main(args) == 0  # all done: nothing to do, file unchanged
    assert read_output(out) == final


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, limit_s: float = 120) -> None:
    """Until `path` has `n` complete lines (the limit only turns a hang into a failure)."""
    deadline = time.monotonic() + limit_s
    while not (path.exists() and path.read_text(encoding="utf-8").count("\n") >= n):
        if proc.poll() is not None:
            pytest.fail(f"predict ended (rc {proc.returncode}) early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"predict wrote fewer than {n} lines in {limit_s} s")
        time.sleep(0.02)


def test_predict_cuts_a_torn_line_and_reports_bad_records(model_dir, pipeline, images, tmp_path, caplog):
    image_dir = images[0].parent
    inp = tmp_path / "questions.jsonl"
    records = write_questions(inp, images, 6)
    for image in images:
        (tmp_path / image.name).write_bytes(image.read_bytes())
    records[3]["image"] = "missing.png"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    want = expected_answers(pipeline, [r for r in records if r["id"] != "q3"], image_dir)
    out = tmp_path / "answers.jsonl"
    first = {
        "id": "q0",
        "answer": want["q0"],
        "finish_reason": "length",
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }
    out.write_text(json.dumps(first, ensure_ascii=False) + '\n{"id": "q1", "answ', encoding="utf-8")

    argv = ["predict", "--model", str(model_dir), "--input", str(inp), "--output", str(out)]
    assert cli.main([*argv, "--max-new-tokens", str(TOKENS), "--device", "cpu"]) == 1
    assert "missing.png" in caplog.text and "record q3" in caplog.text
    (listed,) = [
        json.loads(line) for line in text_lines((tmp_path / "answers.errors.jsonl").read_text("utf-8"))
    ]
    assert listed["id"] == "q3" and listed["line"] == 4 and "missing.png" in listed["error"]
    final = read_output(out)
    assert [r["id"] for r in final] == ["q0", "q1", "q2", "q4", "q5"]
    assert final[0] == first
    assert {r["id"]: r["answer"] for r in final} == want


def test_predict_rejects_a_broken_input_file(model_dir, tmp_path, capsys):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"id": 1, "question": "x"}\nnot json\n', encoding="utf-8")
    argv = ["predict", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main(argv) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_chat_repl_multi_turn_image_switch_and_reset(model_dir, pipeline, images, tmp_path):
    q1, q2, q3, q4 = QUESTIONS
    kw = {"max_new_tokens": 12}
    a1 = pipeline.chat(images[0], q1, **kw)
    a2 = pipeline.chat(images[0], q2, history=[(q1, a1)], **kw)
    a3 = pipeline.chat(images[1], q3, **kw)
    a4 = pipeline.chat(images[1], q4, history=[(q3, a3)], **kw)
    script = "\n".join(
        [
            q1,
            q2,
            f"/image {images[1]}",
            q3,
            "/reset",
            q3,
            f"/image {tmp_path / 'missing.png'}",
            q4,
            "/quit",
            "never asked",
        ]
    )
    result = run(
        "chat",
        "--model",
        str(model_dir),
        "--image",
        str(images[0]),
        "--max-new-tokens",
        "12",
        stdin=script + "\n",
    )
    assert result.returncode == 0, result.stderr
    # after /reset the same question gets the first answer again. The random model's answers may
    # hold line breaks ("\r" too, which text-mode pipes turn into "\n"): found in order, whole.
    pos = 0
    for answer in [a1, a2, a3, a3, a4]:
        needle = "AI> " + answer.replace("\r\n", "\n").replace("\r", "\n")
        found = result.stdout.find(needle, pos)
        assert found >= 0, (needle, result.stdout[pos:])
        pos = found + len(needle)
    assert sum(line.startswith("AI> ") for line in result.stdout.split("\n")) == 5
    assert "missing.png" in result.stdout  # a bad /image is reported, the chat goes on
