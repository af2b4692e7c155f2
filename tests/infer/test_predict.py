"""The batch-prediction engine in process, with a scripted pipeline: resume, torn lines, failures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from convllava_jp.errors import DataError, ImageError
from convllava_jp.infer.predict import done_ids, predict_to_file, read_records


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
    question = "一行目\u2028二行目\u0085三行目"
    inp.write_text(
        json.dumps({"question": question}, ensure_ascii=False)
        + "\n\n"
        + json.dumps({"id": 7, "question": "x"})
        + "\n",
        encoding="utf-8",
    )
    assert read_records(inp) == [("1", {"question": question}), ("7", {"id": 7, "question": "x"})]
    inp.write_text('{"id": 1}\n{"id": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="appears twice"):
        read_records(inp)
