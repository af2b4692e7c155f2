"""eval-mm's newer Japanese tasks: fixtures in each published schema, scored to hand-derived golden values.

tests/eval/golden/evalmm_tasks_golden.json says where every number comes from.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from convllava_jp.errors import DataError
from convllava_jp.eval import text_metrics as tm
from convllava_jp.eval.choice_metrics import jmmmu_aggregate, jmmmu_score, parse_choice
from convllava_jp.eval.judge_prompts import grader_verdict
from convllava_jp.eval.tasks import get_task, task_names
from convllava_jp.eval.tasks.jawildtext import boxed_answer, kie_reference, ocr_reference

from .test_tasks import png

try:
    from datasets import List
except ImportError:  # pragma: no cover
    from datasets import Sequence as List

G = json.loads((Path(__file__).parent / "golden" / "evalmm_tasks_golden.json").read_text(encoding="utf-8"))
NEW = [
    "cvqa", "cc-ocr", "jic-vqa", "ja-multi-image-vqa", "jmmmu", "mecha-ja",
    "jawildtext-board-vqa", "jawildtext-handwriting-ocr", "jawildtext-receipt-kie",
]  # fmt: skip


def img(seed: int) -> dict:
    return {"bytes": png(seed), "path": None}


def test_every_new_task_is_registered_by_eval_mms_id():
    assert set(NEW) <= set(task_names())


# --- metric golden values ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", G["cc_ocr"]["cases"], ids=lambda c: c["pred"] or "empty")
def test_cc_ocr_f1_golden(case):
    assert tm.cc_ocr_f1(case["pred"], case["ref"]) == pytest.approx(case["expected"], abs=1e-6)


def test_cc_ocr_corpus_golden():
    counts = [tm.cc_ocr_counts(c["pred"], c["ref"]) for c in G["cc_ocr"]["cases"]]
    assert tm.cc_ocr_corpus(counts)["micro_f1_score"] == pytest.approx(
        G["cc_ocr"]["corpus"]["micro_f1_score"], abs=1e-6
    )


@pytest.mark.parametrize("case", G["cer_similarity"]["cases"], ids=lambda c: repr(c["pred"]))
def test_cer_similarity_golden(case):
    assert tm.cer_similarity(case["pred"], case["ref"]) == pytest.approx(case["expected"], abs=1e-9)


def test_receipt_kie_golden():
    g = G["receipt_kie"]
    got = tm.receipt_kie(g["pred"], kie_reference(g["fields"]))
    for key, value in g["expected"].items():
        actual = got["field_accuracy"][key] if key.startswith("field_") else got[key]
        assert actual == pytest.approx(value) if isinstance(value, float) else actual == value, key
    bad = tm.receipt_kie(g["unreadable"]["pred"], kie_reference(g["fields"]))
    assert bad["f1"] == 0.0 and bad["parse_error"] is True
    huge = tm.receipt_kie('{"total_amount": ' + "9" * 5000 + "}", kie_reference(g["fields"]))
    assert huge["parse_error"] is True  # an integer past Python's digit limit is unreadable, not a crash


@pytest.mark.parametrize("case", G["substring_match"]["cases"], ids=lambda c: c["pred"])
def test_substring_match_golden(case):
    assert tm.substring_match(case["pred"], case["ref"]) == case["expected"]


@pytest.mark.parametrize("case", G["multiple_choice"]["cases"], ids=lambda c: c["pred"])
def test_multiple_choice_parse_golden(case):
    assert parse_choice(case["pred"], G["multiple_choice"]["options"]) == case["expected"]


@pytest.mark.parametrize("case", G["jmmmu_open"]["cases"], ids=lambda c: c["pred"])
def test_jmmmu_open_golden(case):
    assert jmmmu_score(case["pred"], case["answer"], "open", "[]") == case["expected"]


def test_jmmmu_aggregate_golden():
    g = G["jmmmu_open"]["aggregate"]
    out = jmmmu_aggregate([(qid, float(s)) for qid, s in g["records"]])
    for key, value in g["expected"].items():
        assert out[key] == pytest.approx(value, abs=1e-9), key


def test_board_vqa_reading_golden():
    for text, expected in G["board_vqa"]["boxed"]:
        assert boxed_answer(text) == expected, text
    for text, expected in G["board_vqa"]["verdicts"]:
        assert grader_verdict(text) == expected, text


def test_handwriting_reference_golden():
    g = G["handwriting_reference"]
    assert ocr_reference(g["polygons"]) == g["expected"]


# --- fixtures in the published schemas, loaded and scored end to end ----------------------------------


def _score(task_name: str, path: Path, preds: dict[str, str]) -> tuple[list, dict]:
    task = get_task(task_name)
    samples = task.load(path)
    records = task.score(samples, {s.id: preds[s.id] for s in samples})
    return samples, task.aggregate(records)


def test_mecha_ja_fixture(tmp_path):
    g = G["mecha_aggregate"]
    opts = ["犬", "猫", "鳥", "魚"]
    answers = [1, 2, 0, 3]
    ds = Dataset.from_dict(
        {
            "question": [f"問{i}" for i in range(4)],
            "options": [opts] * 4,
            "answer": answers,
            "answer_type": [r["answer_type"] for r in g["rows"]],
            "image": [img(i) for i in range(4)],
            "background_text": [r["background"] for r in g["rows"]],
        },
        features=Features({"question": Value("string"), "options": List(Value("string")), "answer": Value("int64"),
                           "answer_type": Value("int64"), "image": Image(), "background_text": Value("string")}),
    )  # fmt: skip
    DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "mecha"))
    letters = "ABCD"
    preds = {str(i): (letters[answers[i]] if r["score"] else "わかりません") for i, r in enumerate(g["rows"])}
    samples, out = _score("mecha-ja", tmp_path / "mecha", preds)
    assert samples[0].question == "問0\nA. 犬\nB. 猫\nC. 鳥\nD. 魚\n\n" + (
        "与えられた選択肢の中から最も適切な回答のアルファベットを直接記入してください。"
    )
    assert [s.reference for s in samples] == ["B", "C", "A", "D"]
    for key, value in g["expected"].items():
        assert out[key] == pytest.approx(value), key


def test_cvqa_keeps_the_japanese_subset_and_numbers_it(tmp_path):
    subsets = ["('Japanese', 'Japan')", "('Spanish', 'Mexico')", "('Japanese', 'Japan')"]
    ds = Dataset.from_dict(
        {"image": [img(i) for i in range(3)], "ID": ["a", "b", "c"], "Subset": subsets, "Question": ["問0", "q1", "問2"],
         "Options": [["x", "y", "z", "w"]] * 3, "Label": [0, 1, 1], "Translated Question": ["", "", ""]},
        features=Features({"image": Image(), "ID": Value("string"), "Subset": Value("string"),
                           "Question": Value("string"), "Options": List(Value("string")), "Label": Value("int64"),
                           "Translated Question": Value("string")}),
    )  # fmt: skip
    ds.to_parquet(str(tmp_path / "cvqa.parquet"))
    samples, out = _score("cvqa", tmp_path / "cvqa.parquet", {"0": "The answer", "1": "C"})
    assert [s.id for s in samples] == ["0", "1"] and [s.reference for s in samples] == ["A", "B"]
    assert out["substring_match"] == 0.5  # 'a' in 'the answer' (eval-mm's leniency); 'b' not in 'c'


def test_cc_ocr_base64_images_and_japanese_rows(tmp_path):
    rows = [
        {"index": 0, "l1-category": "multi_lan_ocr", "l2-category": "Japanese", "question": "画像の文字を読んでください。",
         "answer": c["ref"], "image": base64.b64encode(png(i)).decode()}
        for i, c in enumerate(G["cc_ocr"]["cases"])
    ]  # fmt: skip
    rows.insert(1, {**rows[0], "l2-category": "Korean"})
    (tmp_path / "ccocr.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )
    preds = {str(i): c["pred"] for i, c in enumerate(G["cc_ocr"]["cases"])}
    samples, out = _score("cc-ocr", tmp_path / "ccocr.jsonl", preds)
    assert len(samples) == 4 and samples[0].images[0] == png(0)
    expected = sum(c["expected"] for c in G["cc_ocr"]["cases"]) / 4
    assert out["score"] == pytest.approx(expected, abs=1e-6)
    assert out["micro_f1_score"] == pytest.approx(G["cc_ocr"]["corpus"]["micro_f1_score"], abs=1e-6)


def test_jic_vqa_fixture_macro_average(tmp_path):
    g = G["jic_aggregate"]
    ds = Dataset.from_dict(
        {"question_id": ["q0", "q1", "q2"], "input_text": ["この花は？", "この花は？", "この料理は？"],
         "answer": ["桜", "梅", "寿司"], "image": [img(i) for i in range(3)], "domain": [d for d, _ in g["rows"]]},
        features=Features({"question_id": Value("string"), "input_text": Value("string"), "answer": Value("string"),
                           "image": Image(), "domain": Value("string")}),
    )  # fmt: skip
    ds.to_parquet(str(tmp_path / "jic_vqa.parquet"))
    _, out = _score("jic-vqa", tmp_path / "jic_vqa.parquet", {"q0": "桜です", "q1": "桃", "q2": "お寿司"})
    assert {k: out[k] for k in g["expected"]} == pytest.approx(g["expected"])


def test_ja_multi_image_vqa_fixture(tmp_path):
    ds = Dataset.from_dict(
        {"images": [[img(1), img(2)], [img(3)]], "question": ["<image> <image> 違いは？", "何ですか？"],
         "answer": ["色が違います。", "犬です。"], "page_urls": [["u"], ["u"]], "image_urls": [["u"], ["u"]]},
        features=Features({"images": List(Image()), "question": Value("string"), "answer": Value("string"),
                           "page_urls": List(Value("string")), "image_urls": List(Value("string"))}),
    )  # fmt: skip
    DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "mi"))
    samples, out = _score("ja-multi-image-vqa", tmp_path / "mi", {"0": "色が違います。", "1": ""})
    assert [len(s.images) for s in samples] == [2, 1] and samples[0].images[1] == png(2)
    assert samples[0].prompt == "<image>\n<image>\n違いは？"
    assert out["score"] == pytest.approx(50.0)


def test_jmmmu_fixture_images_the_prompt_names(tmp_path):
    rows = [
        {"id": "test_Math_1", "question": "<image1>の値は？", "options": "['1', '2', '3', '4']", "answer": "C",
         "question_type": "multiple-choice", "image_1": img(1), "image_2": img(2), "subfield": "Math"},
        {"id": "test_Design_1", "question": "<image 2>と<image 1>の色の数は？", "options": "[]", "answer": "3",
         "question_type": "open", "image_1": img(3), "image_2": img(4), "subfield": "Design"},
    ]  # fmt: skip
    ds = Dataset.from_list(rows, features=Features({
        "id": Value("string"), "question": Value("string"), "options": Value("string"), "answer": Value("string"),
        "question_type": Value("string"), "image_1": Image(), "image_2": Image(), "subfield": Value("string")}))  # fmt: skip
    ds.to_parquet(str(tmp_path / "jmmmu.parquet"))
    samples, out = _score(
        "jmmmu", tmp_path / "jmmmu.parquet", {"test_Math_1": "C", "test_Design_1": "答えは4"}
    )
    assert [len(s.images) for s in samples] == [1, 2] and samples[1].images == [png(3), png(4)]
    assert samples[0].question.startswith("の値は？\nA. 1\n")
    assert out["Overall"] == 0.5 and out["Math"] == 1.0 and out["Design"] == 0.0


def test_jawildtext_fixtures(tmp_path):
    hw = G["handwriting_reference"]
    (tmp_path / "hw.jsonl").write_text(
        json.dumps({"image": "a.png", "polygons": hw["polygons"]}, ensure_ascii=False) + "\n", "utf-8"
    )
    (tmp_path / "a.png").write_bytes(png(1))
    samples, out = _score("jawildtext-handwriting-ocr", tmp_path / "hw.jsonl", {"0": "上左\\n上右\\n下"})
    assert samples[0].reference == hw["expected"] and out["cer_similarity"] == 1.0
    kie = G["receipt_kie"]
    (tmp_path / "kie.jsonl").write_text(
        json.dumps({"image": "a.png", "fields": kie["fields"]}, ensure_ascii=False) + "\n", "utf-8"
    )
    _, out = _score("jawildtext-receipt-kie", tmp_path / "kie.jsonl", {"0": kie["pred"]})
    assert out["f1"] == pytest.approx(0.75) and out["parse_error_count"] == 0
    assert out["field_store_name"] == 1.0 and out["field_total_amount"] == 0.0
    (tmp_path / "board.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "何羽？", "answer": "2羽"}) + "\n"
    )
    samples = get_task("jawildtext-board-vqa").load(tmp_path / "board.jsonl")
    assert samples[0].question.startswith("何羽？\n画像を参照して") and "\\boxed{...}" in samples[0].question
    records = get_task("jawildtext-board-vqa").score(samples, {"0": "\\boxed{2羽}"})
    assert records[0]["error"].startswith("not judged")


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"question": "q", "options": "abcd", "answer": 0, "answer_type": 0,
                                                  "image": "a.png", "background_text": ""}) + "\n")  # fmt: skip
    with pytest.raises(DataError, match="options must be a non-empty list"):
        get_task("mecha-ja").load(tmp_path / "m.jsonl")
    (tmp_path / "j.jsonl").write_text(json.dumps({"id": "bad", "question": "<image 1>", "options": "[]", "answer": "1",
                                                  "question_type": "open"}) + "\n")  # fmt: skip
    with pytest.raises(DataError, match="row 0"):
        get_task("jmmmu").load(tmp_path / "j.jsonl")


def test_mecha_rotated_choices_as_eval_mm(tmp_path):
    rows = [{"question": "問", "options": ["犬", "猫", "鳥", "魚"], "answer": 1, "answer_type": 0, "image": "a.png",
             "background_text": ""}]  # fmt: skip
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", "utf-8")
    task = get_task("mecha-ja")
    task.rotate_choices = True
    samples = task.load(tmp_path / "m.jsonl")
    # rotation r shows options[r:] + options[:r]; the answer moves to (1 - r) % 4
    assert [s.id for s in samples] == ["0_rot0", "0_rot1", "0_rot2", "0_rot3"]
    assert [s.reference for s in samples] == ["B", "A", "D", "C"]
    assert "A. 猫\nB. 鳥\nC. 魚\nD. 犬" in samples[1].question
    records = task.score(samples, {"0_rot0": "B", "0_rot1": "A", "0_rot2": "A", "0_rot3": "C"})
    out = task.aggregate(records)
    assert out["overall"] == 0.75 and out["rot_2"]["overall"] == 0.0 and out["rot_0"]["Factoid"] == 1.0
