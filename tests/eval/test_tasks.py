"""Tasks against local fixtures written in each benchmark's schema, and metric parity with llm-jp-eval-mm.

The `write_*` helpers build tiny datasets with the hub's column names, nesting, image features and
splits (as llm-jp-eval-mm reads them); test_runner and test_eval_cli reuse them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from convllava_jp.errors import ConfigError, DataError
from convllava_jp.eval import get_metric, rouge_l_ja
from convllava_jp.eval.metrics import jdocqa_score
from convllava_jp.eval.tasks import TASKS, get_task, open_rows, task_names
from convllava_jp.eval.tasks.heron_bench import REFERENCE_MODEL

try:  # datasets >= 4; older versions only have Sequence (a list of structs reads as a dict of lists)
    from datasets import List
except ImportError:  # pragma: no cover
    from datasets import Sequence as List

# --- fixture writers (each benchmark's hub schema) ------------------------------------------------


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small deterministic PNG (a colour block and a bar), distinct per seed."""
    rng = random.Random(seed)
    image = PILImage.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    bar = PILImage.new("RGB", (size[0] // 3, size[1]), tuple(rng.randrange(256) for _ in range(3)))
    image.paste(bar, (rng.randrange(size[0] // 2), 0))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _img(seed: int) -> dict:
    return {"bytes": png(seed), "path": None}


VG_FEATURES = Features(
    {
        "image_id": Value("int64"),
        "url": Value("string"),
        "width": Value("int64"),
        "height": Value("int64"),
        "coco_id": Value("float64"),
        "flickr_id": Value("float64"),
        "qas": List(
            {
                "a_objects": List(Value("null")),
                "answer": Value("string"),
                "q_objects": List(Value("null")),
                "qa_id": Value("int64"),
                "question": Value("string"),
            }
        ),
        "image": Image(),
    }
)

VG_TEST = [  # (image_id, [(qa_id, question, answer)])
    (1, [(101, "写真には何がありますか？", "赤い車があります。"), (102, "車は何色ですか？", "赤色です。")]),
    (2, [(201, "空はどんな様子ですか？", "晴れています。")]),
    (3, [(301, "<image>人は何人いますか？", "二人です。"), (302, "何をしていますか？", "歩いています。")]),
]


def _vg_split(rows: list, seed: int) -> Dataset:
    data: dict[str, list] = {k: [] for k in VG_FEATURES}
    for i, (image_id, qas) in enumerate(rows):
        data["image_id"].append(image_id)
        data["url"].append(f"https://example.org/{image_id}.jpg")
        data["width"].append(48)
        data["height"].append(40)
        data["coco_id"].append(None)
        data["flickr_id"].append(float(image_id))
        data["qas"].append(
            [
                {"a_objects": [], "answer": a, "q_objects": [], "qa_id": qa_id, "question": q}
                for qa_id, q, a in qas
            ]
        )
        data["image"].append(_img(seed + i))
    return Dataset.from_dict(data, features=VG_FEATURES)


def write_ja_vg_vqa_500(out: Path) -> Path:
    """SakanaAI/JA-VG-VQA-500 as `save_to_disk` of its DatasetDict (test + train splits)."""
    DatasetDict(
        {
            "test": _vg_split(VG_TEST, seed=10),
            "train": _vg_split([(9, [(901, "訓練用の質問", "訓練用の答え")])], seed=90),
        }
    ).save_to_disk(str(out))
    return out


WILD_FEATURES = Features(
    {
        "page_url": Value("string"),
        "image_url": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answer": Value("string"),
    }
)
WILD_ROWS = [
    ("この看板には何と書いてありますか？", "「営業中」と書いてあります。"),
    ("写真の季節はいつですか？", "桜が咲いているので春です。"),
    ("何の料理ですか？", "ラーメンです。"),
]


def wild_dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "page_url": [f"https://example.org/p{i}" for i in range(len(WILD_ROWS))],
            "image_url": [f"https://example.org/i{i}.jpg" for i in range(len(WILD_ROWS))],
            "image": [_img(20 + i) for i in range(len(WILD_ROWS))],
            "question": [q for q, _ in WILD_ROWS],
            "answer": [a for _, a in WILD_ROWS],
        },
        features=WILD_FEATURES,
    )


def write_ja_vlm_bench_in_the_wild(out: Path) -> Path:
    """SakanaAI/JA-VLM-Bench-In-the-Wild in the hub repo's layout: data/test-00000-of-00001.parquet."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    wild_dataset().to_parquet(str(out / "data" / "test-00000-of-00001.parquet"))
    return out


HERON_MODELS = (
    "claude-3-opus-20240229",
    "gemini-1.0-pro-vision-latest",
    REFERENCE_MODEL,
    "gpt-4-vision-preview",
)
HERON_FEATURES = Features(
    {
        "question_id": Value("int64"),
        "image_category": Value("string"),
        "image": Image(),
        "category": Value("string"),
        "context": Value("string"),
        "text": Value("string"),
        "answer": {m: Value("string") for m in HERON_MODELS},
    }
)
HERON_ROWS = [  # (question_id, category, context, text, reference)
    (0, "conv", "浅草寺の雷門の写真。大きな赤い提灯がある。", "提灯は何色ですか？", "赤色です。"),
    (
        1,
        "detail",
        "浅草寺の雷門の写真。大きな赤い提灯がある。",
        "写真を詳しく説明してください。",
        "雷門と提灯です。",
    ),
    (2, "complex", "富士山と新幹線の写真。", "この場所はどこだと思いますか？", "静岡県の富士山の近くです。"),
    (3, "conv", "富士山と新幹線の写真。", "電車の名前は？", "新幹線です。"),
]


def heron_dataset(rows: list = HERON_ROWS) -> Dataset:
    return Dataset.from_dict(
        {
            "question_id": [r[0] for r in rows],
            "image_category": ["landmark"] * len(rows),
            "image": [_img(30 + r[0] // 2) for r in rows],
            "category": [r[1] for r in rows],
            "context": [r[2] for r in rows],
            "text": [r[3] for r in rows],
            "answer": [
                {m: (r[4] if m == REFERENCE_MODEL else f"{m}の回答") for m in HERON_MODELS} for r in rows
            ],
        },
        features=HERON_FEATURES,
    )


def write_heron_bench(out: Path, rows: list = HERON_ROWS) -> Path:
    """Silviase/Japanese-Heron-Bench (its only split, train) as one parquet file."""
    heron_dataset(rows).to_parquet(str(out))
    return out


JDOCQA_FEATURES = Features(
    {
        "question_id": Value("int64"),
        "pdf_category": Value("string"),
        "pdf_name": Value("string"),
        "question_number": Value("string"),
        "question_page_number": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "answer_type": Value("int64"),
        "original_question": Value("string"),
        "original_answer": Value("string"),
        "text_from_pdf": Value("string"),
        "image_0": Image(),
        "image_1": Image(),
        "image_2": Image(),
        "image_3": Image(),
    }
)
JDOCQA_ROWS = [  # (question_id, question, answer, answer_type, n_pages)
    (0, "この資料は令和何年のものですか？", "令和3年", 1, 1),
    (1, "申請は必要ですか？", "はい", 0, 2),
    (2, "参加者は何人ですか？", "120人", 2, 4),
    (3, "この制度の目的を説明してください。", "地域の産業を支援することです。", 3, 3),
]


def jdocqa_dataset() -> Dataset:
    data: dict[str, list] = {k: [] for k in JDOCQA_FEATURES}
    for qid, q, a, kind, pages in JDOCQA_ROWS:
        data["question_id"].append(qid)
        data["pdf_category"].append("pamphlet")
        data["pdf_name"].append(f"doc{qid}.pdf")
        data["question_number"].append(str(qid))
        data["question_page_number"].append(",".join(str(p + 1) for p in range(pages)))
        data["question"].append(q)
        data["answer"].append(a)
        data["answer_type"].append(kind)
        data["original_question"].append(q)
        data["original_answer"].append(a)
        data["text_from_pdf"].append("本文")
        for p in range(4):
            data[f"image_{p}"].append(_img(40 + 4 * qid + p) if p < pages else None)
    return Dataset.from_dict(data, features=JDOCQA_FEATURES)


def write_jdocqa(out: Path) -> Path:
    """speed/JDocQA as `save_to_disk` of its DatasetDict (split test); empty image_k cells are None."""
    DatasetDict({"test": jdocqa_dataset()}).save_to_disk(str(out))
    return out


def write_all(root: Path, world: Path) -> dict[str, Path]:
    """Every task's fixture under `root`: {task: path for --data}."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "ja-vg-vqa-500": write_ja_vg_vqa_500(root / "ja-vg-vqa-500"),
        "ja-vlm-bench-in-the-wild": write_ja_vlm_bench_in_the_wild(root / "ja-vlm-bench-in-the-wild"),
        "heron-bench": write_heron_bench(root / "heron-bench.parquet"),
        "jdocqa": write_jdocqa(root / "jdocqa"),
        "synthetic": world,
    }


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_world) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("benchmarks"), tiny_world)


def decoded(image) -> PILImage.Image:
    return PILImage.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB")


# --- loading and prompts ----------------------------------------------------------------------


def test_registry_order_aliases_and_errors():
    assert task_names()[:5] == [
        "ja-vg-vqa-500",
        "ja-vlm-bench-in-the-wild",
        "heron-bench",
        "jdocqa",
        "synthetic",
    ]
    assert get_task("japanese-heron-bench").name == "heron-bench"  # llm-jp-eval-mm's id
    with pytest.raises(ConfigError, match="known tasks: ja-vg-vqa-500"):
        get_task("mmmu")


def test_ja_vg_vqa_500_flattens_qas_of_the_test_split(fixtures):
    samples = get_task("ja-vg-vqa-500").load(fixtures["ja-vg-vqa-500"])
    assert [s.id for s in samples] == ["101", "102", "201", "301", "302"]  # train split's 901 not there
    assert samples[0].question == "写真には何がありますか？" and samples[0].reference == "赤い車があります。"
    assert samples[3].question == "人は何人いますか？"  # '<image>' removed as llm-jp-eval-mm does
    assert samples[0].prompt == "<image>\n写真には何がありますか？"
    assert samples[0].images[0] is samples[1].images[0]  # one image shared by its questions
    assert decoded(samples[0].images[0]).getpixel((0, 0)) == decoded(png(10)).getpixel((0, 0))
    assert decoded(samples[2].images[0]).tobytes() == decoded(png(11)).tobytes()
    assert samples[0].fields == {"image_id": 1}


def test_wild_ids_are_row_numbers(fixtures):
    samples = get_task("ja-vlm-bench-in-the-wild").load(fixtures["ja-vlm-bench-in-the-wild"])
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert [(s.question, s.reference) for s in samples] == WILD_ROWS
    assert all(len(s.images) == 1 for s in samples)


def test_heron_prompt_is_the_text_and_context_goes_to_the_judge(fixtures):
    samples = get_task("heron-bench").load(fixtures["heron-bench"])
    assert [s.id for s in samples] == ["0", "1", "2", "3"]
    s = samples[0]
    assert s.prompt == "<image>\n提灯は何色ですか？"
    assert "雷門" not in s.prompt  # the context is not shown to the model
    assert s.reference == "赤色です。"  # answer["gpt-4-0125-preview"]
    assert s.fields == {"category": "conv", "context": HERON_ROWS[0][2]}


def test_jdocqa_takes_up_to_four_pages(fixtures):
    samples = get_task("jdocqa").load(fixtures["jdocqa"])
    assert [len(s.images) for s in samples] == [1, 2, 4, 3]
    assert samples[2].prompt.startswith("<image>\n" * 4) and samples[2].prompt.endswith(
        "参加者は何人ですか？"
    )
    assert [s.fields["answer_type"] for s in samples] == [1, 0, 2, 3]
    assert decoded(samples[2].images[3]).tobytes() == decoded(png(40 + 8 + 3)).tobytes()  # page order kept


def test_synthetic_reads_the_world(tiny_world):
    samples = get_task("synthetic").load(tiny_world, limit=5)
    records = json.loads((tiny_world / "test.json").read_text(encoding="utf-8"))[:5]
    assert [s.id for s in samples] == [r["id"] for r in records]
    assert [s.prompt for s in samples] == [r["conversations"][0]["value"] for r in records]  # as trained
    assert [s.reference for s in samples] == [r["answer"] for r in records]
    assert Path(samples[0].images[0]).is_file()
    assert get_task("synthetic").load(tiny_world / "test.json", limit=5)[0].id == samples[0].id


def test_the_same_data_in_every_local_format(tmp_path):
    """save_to_disk (Dataset), hub folder, one parquet, JSON with image paths, JSONL: same samples."""
    ds = wild_dataset()
    ds.save_to_disk(str(tmp_path / "disk"))
    write_ja_vlm_bench_in_the_wild(tmp_path / "hub")
    ds.to_parquet(str(tmp_path / "one.parquet"))
    (tmp_path / "images").mkdir()
    rows = []
    for i, (q, a) in enumerate(WILD_ROWS):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(20 + i))
        rows.append(
            {"page_url": "u", "image_url": "u", "image": f"images/{i}.png", "question": q, "answer": a}
        )
    (tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    task = get_task("ja-vlm-bench-in-the-wild")
    views = {}
    for name in ("disk", "hub", "one.parquet", "rows.json", "rows.jsonl"):
        samples = task.load(tmp_path / name)
        views[name] = [(s.id, s.question, s.reference, decoded(s.images[0]).tobytes()) for s in samples]
    first = views.pop("disk")
    assert len(first) == 3
    for name, view in views.items():
        assert view == first, name


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "make", "drop"),
    [
        ("ja-vg-vqa-500", lambda: _vg_split(VG_TEST, 10), "qas"),
        ("ja-vlm-bench-in-the-wild", wild_dataset, "question"),
        ("heron-bench", heron_dataset, "context"),
        ("jdocqa", jdocqa_dataset, "answer_type"),
    ],
)
def test_wrong_schema_names_the_missing_column(tmp_path, task, make, drop):
    path = tmp_path / "bad.parquet"
    make().remove_columns(drop).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"missing column\(s\) '{drop}'") as err:
        get_task(task).load(path)
    assert str(path) in str(err.value)


def test_wrong_nesting_is_named(tmp_path):
    rows = [{"image_id": 1, "image": "a.png", "qas": [{"qa_id": 1, "question": "q"}]}]
    (tmp_path / "vg.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"qas\[0\] lacks \['answer'\]"):
        get_task("ja-vg-vqa-500").load(tmp_path / "vg.json")

    rows = [
        {"question_id": 1, "image": "a.png", "category": "conv", "context": "c", "text": "t", "answer": "x"}
    ]
    (tmp_path / "heron.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match="gpt-4-0125-preview"):
        get_task("heron-bench").load(tmp_path / "heron.json")


def test_missing_split_path_and_format_errors(tmp_path, fixtures):
    with pytest.raises(DataError, match="does not exist"):
        get_task("jdocqa").load(tmp_path / "nope")
    DatasetDict({"train": jdocqa_dataset(), "validation": jdocqa_dataset()}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        get_task("jdocqa").load(tmp_path / "dd")
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown dataset format"):
        get_task("jdocqa").load(tmp_path / "x.csv")
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        get_task("jdocqa").load(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="synthetic=DIR"):
        get_task("synthetic").load(None)


def test_duplicate_ids_are_refused(tmp_path):
    rows = [{"question": "q", "answer": "a", "image": "a.png"}] * 2
    rows = [{**r, "question_id": 7, "answer_type": 0, "image_0": "a.png"} for r in rows]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match="'7' occurs twice"):
        get_task("jdocqa").load(tmp_path / "d.json")


def test_hub_unreachable_says_use_data(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"SakanaAI/JA-VG-VQA-500.*--data TASK=PATH"):
        open_rows(None, "SakanaAI/JA-VG-VQA-500", "test")


# --- scoring per task ----------------------------------------------------------------------------


def test_every_task_names_a_metric_it_can_use():
    for name, cls in TASKS.items():
        task = cls()
        if not task.needs_judge:
            assert get_metric(task.metric).name == task.metric, name


def test_rouge_tasks_score_every_sample_and_average(fixtures):
    task = get_task("ja-vlm-bench-in-the-wild")
    samples = task.load(fixtures["ja-vlm-bench-in-the-wild"])
    preds = {"0": "「営業中」と書いてあります。", "1": "", "2": "ラーメンだと思います。"}
    records = task.score(samples, preds)
    scores = [r["rouge-l-ja"] for r in records]
    assert scores[0] == pytest.approx(100.0) and scores[1] == 0.0  # the empty answer is scored, not skipped
    assert scores[2] == pytest.approx(rouge_l_ja("ラーメンだと思います。", "ラーメンです。"))
    assert task.aggregate(records) == {"score": pytest.approx(sum(scores) / 3), "n": 3}


def test_jdocqa_aggregate_as_llm_jp_eval_mm(fixtures):
    task = get_task("jdocqa")
    samples = task.load(fixtures["jdocqa"])
    preds = {"0": "令和3年です。", "1": "いいえ", "2": "１２０人", "3": "地域の産業を支援するためです。"}
    records = task.score(samples, preds)
    got = [r["jdocqa"] for r in records]
    assert got[:3] == [1.0, 0.0, 1.0]  # containment after normalisation; full-width digits fold
    assert 0.0 < got[3] < 1.0
    out = task.aggregate(records)
    assert out["factoid_exact"] == 1.0 and out["yesno_exact"] == 0.0 and out["numerical_exact"] == 1.0
    assert out["open-ended_bleu"] == pytest.approx(got[3])
    assert out["overall"] == pytest.approx(sum(got) / 4) and out["n"] == 4


def test_synthetic_aggregate_per_question_type(tiny_world):
    task = get_task("synthetic")
    samples = task.load(tiny_world)
    preds = {s.id: (s.reference if s.fields["qtype"] == "count" else "") for s in samples}
    out = task.aggregate(task.score(samples, preds))
    assert out["per_type"]["count"]["exact_match"] == 1.0
    assert all(v["exact_match"] == 0.0 for k, v in out["per_type"].items() if k != "count")
    n_count = out["per_type"]["count"]["n"]
    assert out["exact_match"] == pytest.approx(n_count / len(samples))
    assert 0 < out["chance"] < 1 and out["n"] == len(samples)


# --- parity with llm-jp-eval-mm: golden values derived by hand from its scorers ------------------
# tests/eval/golden/evalmm_golden.json says where each number comes from and how it was derived.

GOLDEN = json.loads((Path(__file__).parent / "golden" / "evalmm_golden.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", GOLDEN["rouge_l"]["cases"], ids=lambda c: c["pred"] or "empty")
def test_rouge_l_ja_golden(case):
    from convllava_jp.eval.metrics import tokenize_ja

    if "pred_tokens" in case:
        assert tokenize_ja(case["pred"]) == case["pred_tokens"]
    if "ref_tokens" in case:
        assert tokenize_ja(case["ref"]) == case["ref_tokens"]
    assert rouge_l_ja(case["pred"], case["ref"]) == pytest.approx(case["expected"], abs=1e-9)


def test_rouge_task_mean_golden():
    cases = GOLDEN["rouge_l"]["cases"]
    task = get_task("ja-vlm-bench-in-the-wild")
    records = [
        {"question_id": str(i), "rouge-l-ja": rouge_l_ja(c["pred"], c["ref"])} for i, c in enumerate(cases)
    ]
    assert task.aggregate(records)["score"] == pytest.approx(
        GOLDEN["rouge_l"]["task_mean"]["expected"], abs=1e-9
    )


@pytest.mark.parametrize("case", GOLDEN["jdocqa"]["cases"], ids=lambda c: c["why"][:30])
def test_jdocqa_score_golden(case):
    got = jdocqa_score(case["pred"], case["ref"], case["answer_type"])
    assert got == pytest.approx(case["expected"], abs=1e-12)


def test_heron_overall_rel_golden():
    from convllava_jp.eval.metrics import heron_aggregate

    g = GOLDEN["heron_bench"]
    out = heron_aggregate(g["records"])
    for key, value in g["expected"].items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    assert "complex_rel" not in out
    assert out["overall"] == pytest.approx(g["ours_without_failures"]["overall"], abs=1e-9)


def test_llm_as_a_judge_reading_golden():
    from convllava_jp.eval.judge_prompts import first_digit

    cases = GOLDEN["llm_as_a_judge"]["cases"]
    for c in cases:
        if c["reply"] is not None:
            assert first_digit(c["reply"]) == c["expected"], c


# --- loader fixes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "code"),
    [("yes/no", 0), ("Yes/No", 0), ("yesno", 0), ("factoid", 1), ("numerical", 2), ("open-ended", 3),
     ("Open ended", 3), ("2", 2), (3, 3)],
)  # fmt: skip
def test_jdocqa_answer_type_label_names(tmp_path, label, code):
    rows = [{"question_id": 1, "question": "q", "answer": "a", "answer_type": label, "image_0": "a.png"}]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    assert get_task("jdocqa").load(tmp_path / "d.json")[0].fields["answer_type"] == code


@pytest.mark.parametrize("label", ["maybe", 7, True, "", None, "12"])
def test_jdocqa_unknown_answer_type_is_named(tmp_path, label):
    rows = [{"question_id": 1, "question": "q", "answer": "a", "answer_type": label, "image_0": "a.png"}]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match="answer_type"):
        get_task("jdocqa").load(tmp_path / "d.json")


def test_a_copy_without_the_tasks_split_is_refused_unless_allowed(tmp_path):
    DatasetDict({"train": jdocqa_dataset()}).save_to_disk(str(tmp_path / "train-only"))
    task = get_task("jdocqa")
    with pytest.raises(DataError, match=r"no split 'test', only 'train'.*--allow-other-split"):
        task.load(tmp_path / "train-only")
    samples = task.load(tmp_path / "train-only", allow_other_split=True)
    assert len(samples) == 4 and task.source_split == "train" and "[train]" in task.source_origin
    ok = get_task("jdocqa")
    DatasetDict({"test": jdocqa_dataset()}).save_to_disk(str(tmp_path / "test"))
    ok.load(tmp_path / "test")
    assert ok.source_split == "test"
