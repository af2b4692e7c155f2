"""The one record reader: byte ranges and lines of JSON / JSONL records, errors with a kind, HF images."""

from __future__ import annotations

import json

import pytest

from convllava_jp.data.records import (
    RecordFileError,
    iter_json_array_spans,
    iter_jsonl_spans,
    undecoded_images,
)

RECORDS = [{"id": 1, "text": "日本語\u2028です"}, {"id": 2, "text": "two"}, {"id": 3, "text": "三"}]


def _reread(path, spans):
    data = path.read_bytes()
    return [(line, json.loads(data[start:end])) for start, end, line, _ in spans]


def test_jsonl_spans_reread_to_the_same_records(tmp_path):
    # Blank lines and CRLF are allowed; U+2028 inside a record does not split it (lines end at \n only).
    text = (
        json.dumps(RECORDS[0], ensure_ascii=False) + "\r\n\n" + "\n".join(json.dumps(r) for r in RECORDS[1:])
    )
    path = tmp_path / "r.jsonl"
    path.write_text(text, encoding="utf-8", newline="")
    spans = list(iter_jsonl_spans(path))
    assert [value for *_, value in spans] == RECORDS
    assert _reread(path, spans) == [(1, RECORDS[0]), (3, RECORDS[1]), (4, RECORDS[2])]
    assert [value for *_, value in iter_jsonl_spans(path, limit=2)] == RECORDS[:2]


def test_json_array_spans_reread_to_the_same_records(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS, ensure_ascii=False, indent=1).encode("utf-8"))
    spans = list(iter_json_array_spans(path))
    assert [value for *_, value in spans] == RECORDS
    reread = _reread(path, spans)
    assert [value for _, value in reread] == RECORDS
    assert [line for line, _ in reread] == [2, 6, 10]
    assert len(list(iter_json_array_spans(path, limit=1))) == 1
    (tmp_path / "empty.json").write_text(" [ ] \n", encoding="utf-8")
    assert list(iter_json_array_spans(tmp_path / "empty.json")) == []


@pytest.mark.parametrize(
    "name,content,kind,line",
    [
        ("a.jsonl", b'{"a": 1}\n{"a": \n', "json", 2),
        ("b.jsonl", b'{"a": 1}\n{"a": "\xff"}\n', "encoding", 2),
        ("c.json", b'[\n{"a": 1},\n{"a" 2}\n]', "json", 3),
        ("d.json", b'{"a": 1}', "structure", 1),
        ("e.json", b'[{"a": 1}]\nx', "json", 2),
        ("f.json", b'[{"a": 1}\n\n{"a": 2}]', "json", 3),
        ("g.json", b'[\n\n{"a": "\xff"}]', "encoding", 3),
    ],
)
def test_errors_name_the_line_and_their_kind(tmp_path, name, content, kind, line):
    path = tmp_path / name
    path.write_bytes(content)
    read = iter_jsonl_spans if name.endswith(".jsonl") else iter_json_array_spans
    with pytest.raises(RecordFileError) as err:
        list(read(path))
    assert (err.value.kind, err.value.line) == (kind, line)
    assert str(err.value).startswith(f"{path}, line {line}: ")
    assert (err.value.json_msg is not None) == (kind == "json")


def test_hf_image_columns_stay_encoded(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (4, 4), (200, 0, 0))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "pages": datasets.List(datasets.Image()),
            "name": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict({"image": [image], "pages": [[image, image]], "name": ["x"]}, features)
    row = undecoded_images(ds)[0]
    assert isinstance(row["image"]["bytes"], bytes)
    assert [isinstance(page["bytes"], bytes) for page in row["pages"]] == [True, True]
    assert row["name"] == "x"


def test_hf_image_columns_nested_in_structs_and_lists_stay_encoded():
    # datasets' own decoder opens cells with every Pillow plugin: no Image feature may keep decode=True.
    import datasets
    from PIL import Image

    image = Image.new("RGB", (4, 4), (200, 0, 0))
    features = datasets.Features(
        {
            "doc": {"scan": datasets.Image(), "title": datasets.Value("string")},
            "turns": datasets.List({"picture": datasets.Image(), "text": datasets.Value("string")}),
            "grid": datasets.List(datasets.List(datasets.Image())),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "doc": [{"scan": image, "title": "t"}],
            "turns": [[{"picture": image, "text": "a"}]],
            "grid": [[[image], [image, image]]],
        },
        features,
    )
    row = undecoded_images(ds)[0]
    assert isinstance(row["doc"]["scan"]["bytes"], bytes) and row["doc"]["title"] == "t"
    assert isinstance(row["turns"][0]["picture"]["bytes"], bytes)
    assert [isinstance(cell["bytes"], bytes) for line in row["grid"] for cell in line] == [True] * 3
