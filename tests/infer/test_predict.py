"""The batch-prediction engine in process, with a scripted pipeline: resume, torn lines, failures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from convllava_jp.errors import DataError, ImageError
from convllava_jp.infer.predict import (
    content_id,
    done_ids,
    errors_path,
    predict_file,
    predict_to_file,
    read_records,
)
from convllava_jp.model.templates import normalize_messages


class Scripted:
    """Answers "answer to ID"; a batch holding the request "bad" fails; records batch sizes."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def generate(self, requests, config, batch_size=8):
        if "bad" in requests:
            raise ImageError("bad.png: not an image")
        self.batches.append(list(requests))
        return [
            SimpleNamespace(text=f"answer to {r}", finish_reason="stop", prompt_tokens=3, completion_tokens=2)
            for r in requests
        ]


def row(prediction):
    if prediction.error is not None:
        return None
    return {"id": prediction.id, "answer": prediction.result.text}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_resumes_after_a_torn_line_and_leaves_failures_for_a_rerun(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "answer": "old"}\n{"id": "b", "ans', encoding="utf-8")
    pipeline = Scripted()
    requests = [(i, i) for i in ("a", "b", "c", "bad", "d", "e")]
    new = predict_to_file(lambda: pipeline, requests, None, 2, out, row, show_progress=False)
    assert sorted(new) == ["b", "bad", "c", "d", "e"]
    assert isinstance(new["bad"].error, ImageError) and new["bad"].result is None
    assert lines(out) == [{"id": "a", "answer": "old"}] + [
        {"id": i, "answer": f"answer to {i}"} for i in ("b", "c", "d", "e")
    ]
    # [b, c] as one batch; [bad, d] failed and was retried one at a time; then [e].
    assert pipeline.batches == [["b", "c"], ["d"], ["e"]]

    def never():
        raise AssertionError("loaded a model although nothing was left to do")

    requests = [r for r in requests if r[0] != "bad"]
    assert predict_to_file(never, requests, None, 2, out, row, show_progress=False) == {}


def test_an_output_line_without_an_id_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"answer": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"out.jsonl:2: not an output line of predict"):
        done_ids(out)
    assert done_ids(tmp_path / "missing.jsonl") == set()


def test_records_split_on_newlines_only(tmp_path):
    inp = tmp_path / "in.jsonl"
    question = "一行目\u2028二行目\u0085三行目\u2029"
    inp.write_text(
        json.dumps({"question": question}, ensure_ascii=False)
        + "\n\n"
        + json.dumps({"id": 7, "question": "x"})
        + "\n",
        encoding="utf-8",
    )
    got = read_records(inp)
    assert [(r.id, r.line, r.record, r.problem) for r in got] == [
        (content_id({"question": question}), 1, {"question": question}, None),
        ("7", 3, {"id": 7, "question": "x"}, None),
    ]


def test_ids_come_from_the_record_or_its_content_never_the_line_number(tmp_path):
    inp = tmp_path / "in.jsonl"
    plain = [{"question": "a"}, {"question": "b"}, {"question": "a"}, {"question_id": 5, "question": "c"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in plain), encoding="utf-8")
    ids = [r.id for r in read_records(inp)]
    assert ids == [content_id(plain[0]), content_id(plain[1]), content_id(plain[0]) + "~2", "5"]
    # an edit above a record does not change its id
    inp.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "new"}, *plain]), encoding="utf-8")
    assert [r.id for r in read_records(inp)][1:] == ids
    # a repeated explicit id or an unusable id is a problem of that record, not of the file
    inp.write_text('{"id": 1, "question": "x"}\n{"id": 1, "question": "y"}\n{"id": [1]}\n', encoding="utf-8")
    problems = [r.problem for r in read_records(inp)]
    assert problems[0] is None and "appears twice (first on line 1)" in problems[1]
    assert "'id' must be a string or an integer" in problems[2]


class Echo:
    """A scripted pipeline that reads messages the way the real one does (normalize_messages)."""

    def __init__(self, answer: str = ""):
        self.answer = answer

    def generate(self, requests, config, batch_size=8):
        out = []
        for request in requests:
            messages = normalize_messages(request.messages)  # the real encode's first step
            text = messages[-1]["content"] + self.answer
            out.append(SimpleNamespace(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=1))
        return out


def test_an_answer_with_unicode_line_separators_survives_reruns(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 as they are; str.splitlines
    # would cut the output line there and the rerun would refuse the file.
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "question": "q"}\n{"id": "b", "question": "r"}\n', encoding="utf-8")
    pipeline = Echo(answer=" 一\u2028二\u2029三\u0085四\r五")
    assert predict_file(inp, out, lambda: pipeline, None, batch_size=1) == 0
    assert [row["answer"] for row in lines(out)] == ["q" + pipeline.answer, "r" + pipeline.answer]
    assert done_ids(out) == {"a", "b"}

    def never():
        raise AssertionError("loaded a model although nothing was left to do")

    assert predict_file(inp, out, never, None, batch_size=1) == 0


MALFORMED = [
    {"id": "m1", "messages": "こんにちは"},
    {"id": "m2", "messages": [1, 2]},
    {"id": "m3", "messages": {"role": "user", "content": "x"}},
    {"id": "m4", "messages": []},
    {"id": "m5", "messages": [{"role": ["user"], "content": "x"}]},
    {"id": "m6", "messages": [{"role": "user", "content": 5}]},
    {"id": "m7", "messages": [{"role": "robot", "content": "x"}]},
    {"id": "m8", "messages": [{"role": "user", "content": [7]}]},
    {"id": "m9", "question": 5},
    {"id": "m10", "question": "x", "images": ["a.png", 3]},
    [1, 2],
    "just a string",
    {"id": {"nested": 1}, "question": "x"},
    {"id": "ok1", "question": "dup"},
]


def test_malformed_records_go_to_the_errors_file_and_the_run_goes_on(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = [{"id": "ok1", "question": "one"}, {"messages": [{"role": "user", "content": "two"}]}]
    rows = [good[0], *MALFORMED, good[1]]
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    errors = errors_path(out)
    assert errors == tmp_path / "out.errors.jsonl"
    errors.write_text('{"id": "stale"}\n', encoding="utf-8")  # from an earlier run: replaced

    assert predict_file(inp, out, lambda: Echo(), None, batch_size=4) == len(MALFORMED)
    assert [(row["id"], row["answer"]) for row in lines(out)] == [
        ("ok1", "one"),
        (content_id(good[1]), "two"),
    ]
    listed = lines(errors)
    assert [row["line"] for row in listed] == list(range(2, 2 + len(MALFORMED)))
    assert [row["id"] for row in listed[:10]] == [f"m{i}" for i in range(1, 11)]
    assert "appears twice" in listed[-1]["error"] and listed[-1]["id"] == "ok1"
    assert all(row["error"] for row in listed)

    # fixed input: the rerun answers only what is left, and the errors file goes away
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
    assert predict_file(inp, out, lambda: Echo(), None, batch_size=4) == 0
    assert not errors.exists()


def test_a_generation_failure_is_listed_too(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "question": "q"}\n{"id": "bad", "question": "r"}\n', encoding="utf-8")

    class FailsOnR(Echo):
        def generate(self, requests, config, batch_size=8):
            if any(r.messages[-1]["content"] == "r" for r in requests):
                raise ImageError("r.png: not an image")
            return super().generate(requests, config, batch_size)

    assert predict_file(inp, out, FailsOnR, None, batch_size=2) == 1
    assert [row["id"] for row in lines(out)] == ["a"]
    assert lines(errors_path(out)) == [{"id": "bad", "line": 2, "error": "r.png: not an image"}]
