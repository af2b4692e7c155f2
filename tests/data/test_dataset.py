"""The training data pipeline: records -> samples, skips, fail-fast errors, collator, sampler."""

from __future__ import annotations

import ast
import importlib
import io
import json
import logging
import pickle
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from convllava_jp.data import dataset as ds_mod
from convllava_jp.data.collate import DataCollator
from convllava_jp.data.constants import IGNORE_INDEX
from convllava_jp.data.dataset import ConversationDataset, japanese_fraction
from convllava_jp.data.records import DataSource
from convllava_jp.data.sampler import ModalityLengthGroupedSampler
from convllava_jp.data.skips import SkippedRecord, SkipTracker
from convllava_jp.errors import DataError
from convllava_jp.model.image_processing import ConvLlavaImageProcessor
from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token
from convllava_jp.model.templates import ASSISTANT_ROLE_JA, LLM_JP_SYSTEM_PROMPT, USER_ROLE_JA

EOS = "<EOD|LLM-jp>"
LOGGER = "convllava_jp.data"  # the dataset and the skip tracker log under it
TOKENS_PER_IMAGE = 4  # 128 px, stride 64 -> 2 x 2

# --- a tiny character-level tokenizer and processor ------------------------------------------------


def _make_tokenizer() -> PreTrainedTokenizerFast:
    chars = set(string.printable) | set(LLM_JP_SYSTEM_PROMPT + USER_ROLE_JA + ASSISTANT_ROLE_JA)
    chars |= {chr(c) for c in range(0x3041, 0x3097)} | {chr(c) for c in range(0x30A1, 0x30FB)}
    chars |= set("赤青緑黄紫円四角三星形色何左右上下説明画像数図")
    vocab = {"<unk>": 0, "<pad>": 1, EOS: 2}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token="<pad>", unk_token="<unk>"
    )
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _make_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer) -> ConvLlavaProcessor:
    return ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="pad"), tokenizer)


@pytest.fixture(scope="module")
def aspect_processor(tokenizer) -> ConvLlavaProcessor:
    return ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="keep-aspect"), tokenizer)


# --- fixture files ---------------------------------------------------------------------------------


def _png(path: Path, size=(96, 96), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _conv(*texts: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _dataset(path, processor, template="llm-jp-v1", max_length=256, **source_kwargs) -> ConversationDataset:
    return ConversationDataset(DataSource(path, **source_kwargs), processor, template, max_length)


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- label masking per template ---------------------------------------------------------------------


def test_plain_template_supervises_only_caption_and_eos(tmp_path, processor, tokenizer):
    _png(tmp_path / "img" / "a.png")
    path = _write_jsonl(
        tmp_path / "cap.jsonl",
        [{"id": "c1", "image": "img/a.png", "conversations": _conv("<image>\n説明して", "赤い円です。")}],
    )
    sample = _dataset(path, processor, template="plain")[0]
    image_id = processor.image_token_id
    # plain: the image placeholders, "\n", then the caption + EOS; the instruction is dropped.
    assert sample["input_ids"] == [image_id] * TOKENS_PER_IMAGE + _ids(tokenizer, "\n赤い円です。" + EOS)
    assert sample["labels"] == [IGNORE_INDEX] * (TOKENS_PER_IMAGE + 1) + _ids(tokenizer, "赤い円です。" + EOS)
    assert len(sample["pixel_values"]) == 1 and sample["pixel_values"][0].shape == (3, 128, 128)


def test_llm_jp_v1_multi_turn_supervises_only_replies(tmp_path, processor, tokenizer):
    turns = _conv("図形はいくつ?", "3つです。", "何色?", "赤色です。")
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"id": 7, "conversations": turns}])
    sample = _dataset(path, processor)[0]
    assert tokenizer.decode(sample["input_ids"]) == processor.render(turns, "llm-jp-v1")
    assert _supervised_runs(sample["labels"]) == [
        _ids(tokenizer, "3つです。" + EOS),
        _ids(tokenizer, "赤色です。" + EOS),
    ]
    assert sample["pixel_values"] == []
    # where supervised, the label is the token itself (the model shifts)
    assert all(lab == i for lab, i in zip(sample["labels"], sample["input_ids"]) if lab != IGNORE_INDEX)


def test_image_tag_is_prepended_when_missing(tmp_path, processor):
    _png(tmp_path / "a.png")
    records = [
        {"image": "a.png", "conversations": _conv("これは何?", "円です。")},
        {"image": "a.png", "conversations": _conv("<image>\nこれは何?", "円です。")},
        {"image": ["a.png", "a.png"], "conversations": _conv("これは何?", "円です。")},
        {"image": ["a.png", "a.png"], "conversations": _conv("<image>\n<image>\nこれは何?", "円です。")},
    ]
    dataset = _dataset(_write_jsonl(tmp_path / "d.jsonl", records), processor)
    assert dataset[0]["input_ids"] == dataset[1]["input_ids"]
    assert dataset[2]["input_ids"] == dataset[3]["input_ids"]
    assert dataset[2]["input_ids"].count(processor.image_token_id) == 2 * TOKENS_PER_IMAGE


# --- truncation ---------------------------------------------------------------------------------------


def test_truncation_never_splits_image_placeholders(tmp_path, processor):
    _png(tmp_path / "a.png")
    rng = random.Random(0)
    kana = "あいうえおかきくけこさしすせそ"
    records = []
    for _ in range(40):
        before = "".join(rng.choices(kana, k=rng.randint(0, 40)))
        reply = "".join(rng.choices(kana, k=rng.randint(1, 60)))
        records.append({"image": "a.png", "conversations": _conv(before + "<image>" + "説明して", reply)})
    max_length = 100
    dataset = _dataset(_write_jsonl(tmp_path / "t.jsonl", records), processor, max_length=max_length)
    pixel = processor.preprocess_images([tmp_path / "a.png"])
    image_id = processor.image_token_id
    outcomes = set()
    for i, record in enumerate(records):
        full = processor.encode_conversation(
            record["conversations"], pixel_values=pixel, template="llm-jp-v1"
        )
        sample = dataset[i]
        if len(full.input_ids) <= max_length:
            outcome = "fits"
            assert sample["input_ids"] == full.input_ids and sample["labels"] == full.labels
        elif image_id in full.input_ids[max_length:]:
            outcome = "skipped"
            assert isinstance(sample, SkippedRecord)
            assert sample.reason == "too long: image tokens beyond max_length"
        elif all(label == IGNORE_INDEX for label in full.labels[:max_length]):
            outcome = "no labels"
            assert isinstance(sample, SkippedRecord) and sample.reason.startswith("too long")
        else:
            outcome = "cut"
            assert sample["input_ids"] == full.input_ids[:max_length]
            assert sample["labels"] == full.labels[:max_length]
        if not isinstance(sample, SkippedRecord):
            assert len(sample["input_ids"]) <= max_length
            assert sample["input_ids"].count(image_id) == TOKENS_PER_IMAGE
        outcomes.add(outcome)
    assert {"fits", "skipped", "cut"} <= outcomes


def test_truncation_that_leaves_no_reply_is_skipped(tmp_path, processor):
    records = [{"conversations": _conv("あ" * 120, "はい。")}]
    sample = _dataset(_write_jsonl(tmp_path / "t.jsonl", records), processor, max_length=150)[0]
    assert isinstance(sample, SkippedRecord)
    assert sample.reason == "too long: no supervised tokens within max_length"


# --- broken records: skipped, counted, written down ----------------------------------------------


def _bad_records_file(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A JSONL with one record of each broken kind; returns it and {line: expected reason}."""
    _png(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "text.png").write_text("this is not an image\n")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    (tmp_path / "img" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    lines = [
        {"id": "good", "image": "img/ok.png", "conversations": _conv("<image>\n何?", "円です。")},
        {"id": "missing", "image": "img/nope.png", "conversations": _conv("<image>\n何?", "円です。")},
        {"id": "textfile", "image": "img/text.png", "conversations": _conv("<image>\n何?", "円です。")},
        None,  # a blank line: does not count, but line numbers still do
        {"id": "truncated", "image": "img/truncated.png", "conversations": _conv("<image>\n何?", "円です。")},
        {"id": "empty", "conversations": []},
        {"id": "role", "conversations": [{"from": "bot", "value": "やあ"}, {"from": "gpt", "value": "はい"}]},
        {"id": "long", "image": "img/ok.png", "conversations": _conv("あ" * 300 + "<image>", "円です。")},
        {"id": "tags", "conversations": _conv("<image>\n何?", "円です。")},
        {"id": "twotags", "image": "img/ok.png", "conversations": _conv("<image><image>\n何?", "円です。")},
        {"id": "good-text", "conversations": _conv("こんにちは", "こんにちは。")},
        {"id": "noreply", "conversations": _conv("こんにちは")},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "".join("\n" if r is None else json.dumps(r, ensure_ascii=False) + "\n" for r in lines),
        encoding="utf-8",
    )
    expected = {
        2: "missing image",
        3: "bad image",
        5: "bad image",
        6: "empty conversation",
        7: "wrong role",
        8: "too long: image tokens beyond max_length",
        9: "image tag mismatch",
        10: "image tag mismatch",
        12: "no supervised tokens",
    }
    return path, expected


def test_every_bad_record_kind_is_skipped_and_logged_with_file_and_line(tmp_path, processor, caplog):
    path, expected = _bad_records_file(tmp_path)
    dataset = _dataset(path, processor, max_length=200)
    assert len(dataset) == 11
    loader = DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=DataCollator(processor.tokenizer.pad_token_id)
    )
    tracker = SkipTracker(tmp_path / "run", total_records=len(dataset), max_bad_fraction=1.0)
    good = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for batch in loader:  # batches come from worker processes: skips travel in the batch
            tracker.update(batch["skipped"])
            good += batch["input_ids"].shape[0]
    assert good == 2
    written = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {w["line"]: w["reason"] for w in written} == expected
    assert all(w["file"] == str(path) for w in written)
    assert {w["id"] for w in written} >= {"missing", "textfile", "truncated", "long", "tags"}
    details = {w["id"]: w["detail"] for w in written}
    assert "nope.png" in details["missing"] and "text.png" in details["textfile"]
    assert "truncated" in details["truncated"]
    assert tracker.summary() == {
        "missing image": 1,
        "bad image": 2,
        "empty conversation": 1,
        "wrong role": 1,
        "too long: image tokens beyond max_length": 1,
        "image tag mismatch": 2,
        "no supervised tokens": 1,
    }
    assert sum("line 7" in r.getMessage() and "wrong role" in r.getMessage() for r in caplog.records) == 1


def test_image_paths_that_leave_the_image_root_are_skipped_unless_the_source_allows_them(tmp_path, processor):
    root = tmp_path / "data"
    _png(root / "img" / "ok.png")
    secret = _png(tmp_path / "private" / "face.png", colour=(1, 2, 3))
    (root / "linked").symlink_to(tmp_path / "private", target_is_directory=True)  # the owner's layout
    (root / "img" / "figure.png").write_bytes(  # an EPS under a .png name
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
    )
    conv = _conv("<image>\n何?", "円です。")
    two = _conv("<image><image>\n何?", "円です。")
    images = {
        "inside": "img/ok.png",
        "dotdot": "../private/face.png",
        "absolute": str(secret),
        "dotdot-back-in": "img/../img/ok.png",
        "symlink": "linked/face.png",
        "second-of-two": ["img/ok.png", "../private/face.png"],
        "eps": "img/figure.png",
    }
    path = _write_jsonl(
        root / "train.jsonl",
        [
            {"id": rid, "image": image, "conversations": two if isinstance(image, list) else conv}
            for rid, image in images.items()
        ],
    )

    def outcome(**source_kwargs) -> dict[str, str]:
        dataset = _dataset(path, processor, **source_kwargs)
        items = [dataset[i] for i in range(len(dataset))]
        return {
            rid: item.reason if isinstance(item, SkippedRecord) else "ok" for rid, item in zip(images, items)
        }

    outside = "image path outside the image root"
    assert outcome() == {
        "inside": "ok",
        "dotdot": outside,
        "absolute": outside,
        "dotdot-back-in": outside,
        "symlink": "ok",
        "second-of-two": outside,
        "eps": "bad image",
    }
    skipped = _dataset(path, processor)[1]
    assert "../private/face.png" in skipped.detail and "allow_outside_root" in skipped.detail
    assert "EPS is not an accepted image format" in _dataset(path, processor)[6].detail
    allowed = outcome(allow_outside_root=True)
    assert allowed == {rid: "bad image" if rid == "eps" else "ok" for rid in images}


# --- fail fast on the wrong format ---------------------------------------------------------------


def test_malformed_jsonl_fails_fast_with_line_number(tmp_path, processor):
    good = json.dumps({"conversations": _conv("問", "答え")}, ensure_ascii=False)
    path = tmp_path / "broken.jsonl"
    path.write_text(f'{good}\n{good}\n{{"conversations": [}}\n{good}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3: malformed JSON"):
        _dataset(path, processor)


def test_jsonl_line_that_is_not_a_record_fails_fast(tmp_path, processor):
    good = json.dumps({"conversations": _conv("問", "答え")}, ensure_ascii=False)
    path = tmp_path / "list.jsonl"
    path.write_text(f"{good}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        _dataset(path, processor)


def test_json_array_element_without_conversations_fails_fast_with_line(tmp_path, processor):
    path = tmp_path / "arr.json"
    path.write_text(
        '[\n  {"id": "a", "conversations": [{"from": "human", "value": "問"}, {"from": "gpt", "value": "答"}]},\n'
        '  {"id": "b",\n   "caption": "no conversations here"}\n]\n',
        encoding="utf-8",
    )
    with pytest.raises(
        DataError, match=r"arr\.json, line 3: a LLaVA record needs a 'conversations' list.*caption, id"
    ):
        _dataset(path, processor)


def test_text_records_are_language_model_data(tmp_path, processor):
    """`{"text": ...}` lines (LLM pretraining text) are supervised whole, with EOS, and mix with chats."""
    path = tmp_path / "lm.jsonl"
    path.write_text(
        '{"text": "左上に赤い円があります。"}\n'
        '{"conversations": [{"from": "human", "value": "問"}, {"from": "gpt", "value": "答"}]}\n',
        encoding="utf-8",
    )
    ds = _dataset(path, processor)
    sample = ds[0]
    tok = processor.tokenizer
    assert sample["input_ids"] == tok.encode("左上に赤い円があります。", add_special_tokens=False) + [
        tok.eos_token_id
    ]
    assert sample["labels"] == sample["input_ids"] and sample["pixel_values"] == []
    assert ds.lengths[0] < 0  # text-only modality
    assert isinstance(ds[1], dict)


def test_malformed_json_array_reports_line(tmp_path, processor):
    path = tmp_path / "arr.json"
    path.write_text('[\n{"conversations": []}\n{"conversations": []}\n]', encoding="utf-8")  # missing comma
    with pytest.raises(DataError, match=r"line 3: malformed JSON"):
        _dataset(path, processor)


def test_missing_file_and_unknown_text_field_fail_fast(tmp_path, processor):
    with pytest.raises(DataError, match="no such file"):
        _dataset(tmp_path / "nope.jsonl", processor)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": _conv("問", "答え")}])
    with pytest.raises(DataError, match=r"no record has a 'value_ja' field.*from, value"):
        _dataset(path, processor, text_field="value_ja")


# --- text_field and the language check ----------------------------------------------------------


def test_text_field_selects_the_japanese_text_and_english_warns(tmp_path, processor, tokenizer, caplog):
    records = [
        {
            "id": str(k),
            "conversations": [
                {"from": "human", "value": "What shape is it?", "value_ja": "何の形?"},
                {"from": "gpt", "value": "It is a red circle.", "value_ja": "赤い円です。"},
            ],
        }
        for k in range(5)
    ]
    path = _write_jsonl(tmp_path / "pretrain_ja.jsonl", records)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        english = _dataset(path, processor, template="plain")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pretrain_ja.jsonl" in warnings[0] and "text_field='value'" in warnings[0]
    assert "value_ja" in warnings[0]  # the hint names the field that holds the Japanese
    assert _supervised_runs(english[0]["labels"]) == [_ids(tokenizer, "It is a red circle." + EOS)]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        japanese = _dataset(path, processor, template="plain", text_field="value_ja")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert _supervised_runs(japanese[0]["labels"]) == [_ids(tokenizer, "赤い円です。" + EOS)]


def test_japanese_fraction():
    assert japanese_fraction("赤い円です。") == 1.0
    assert japanese_fraction("It is red.") == 0.0
    assert japanese_fraction("AB円だ") == 0.5
    assert japanese_fraction("123 。") is None


# --- formats agree -------------------------------------------------------------------------------


def _format_records(tmp_path: Path) -> list[dict]:
    _png(tmp_path / "images" / "r.png", (96, 64), (220, 20, 20))
    _png(tmp_path / "images" / "b.png", (64, 96), (20, 20, 220))
    return [
        {"id": "0", "image": "images/r.png", "conversations": _conv("<image>\n何色?", "赤色です。")},
        {
            "id": "1",
            "image": None,
            "conversations": _conv("こんにちは", "こんにちは。", "図形は?", "円です。"),
        },
        {"id": "2", "image": "images/b.png", "conversations": _conv("何色?\n<image>", "青色です。")},
    ]


def _assert_same_samples(a: ConversationDataset, b: ConversationDataset) -> None:
    assert len(a) == len(b) and a.lengths == b.lengths
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"]
        assert len(x["pixel_values"]) == len(y["pixel_values"])
        assert all(torch.equal(p, q) for p, q in zip(x["pixel_values"], y["pixel_values"]))


def test_json_jsonl_hf_and_parquet_give_the_same_samples(tmp_path, processor, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    records = _format_records(tmp_path)
    reference = _dataset(_write_jsonl(tmp_path / "d.jsonl", records), processor)
    assert [type(reference[i]) for i in range(3)] == [dict, dict, dict]
    # the JSON array without the null image key, as LLaVA files store text-only records
    plain = [{k: v for k, v in r.items() if v is not None} for r in records]
    _assert_same_samples(reference, _dataset(_write_json(tmp_path / "d.json", plain), processor))

    hf = datasets.Dataset.from_list(records)
    hf.save_to_disk(str(tmp_path / "d_hf"))
    _assert_same_samples(reference, _dataset(tmp_path / "d_hf", processor))
    hf.to_parquet(str(tmp_path / "d.parquet"))
    _assert_same_samples(reference, _dataset(tmp_path / "d.parquet", processor))

    # a dataset with embedded image bytes (datasets.Image), as published on the hub
    embedded = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in records],
            "image": [
                None if r["image"] is None else {"bytes": (tmp_path / r["image"]).read_bytes(), "path": None}
                for r in records
            ],
            "conversations": [r["conversations"] for r in records],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": datasets.List(
                    {"from": datasets.Value("string"), "value": datasets.Value("string")}
                ),
            }
        ),
    )
    embedded.save_to_disk(str(tmp_path / "d_embedded"))
    _assert_same_samples(
        reference, _dataset(tmp_path / "d_embedded", processor, image_root=tmp_path / "nowhere")
    )


def test_hf_dataset_without_conversations_fails_fast(tmp_path, processor):
    import datasets

    datasets.Dataset.from_list([{"id": "a", "text": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(
        DataError, match=r"bad: a LLaVA dataset needs a 'conversations' column \(columns: id, text\)"
    ):
        _dataset(tmp_path / "bad", processor)


def test_lengths_max_samples_and_repeat(tmp_path, processor):
    records = _format_records(tmp_path)
    first = _write_jsonl(tmp_path / "a.jsonl", records)
    second = _write_json(tmp_path / "b.json", records[1:])
    dataset = ConversationDataset(
        [DataSource(first, max_samples=2), DataSource(second, repeat=3)], processor, "llm-jp-v1", 256
    )
    assert len(dataset) == 2 + 2 * 3
    lengths = dataset.lengths
    text_chars = [sum(len(t["value"]) for t in r["conversations"]) for r in records]
    assert lengths[:2] == [text_chars[0] + TOKENS_PER_IMAGE, -text_chars[1]]
    assert lengths[2:] == [-text_chars[1], text_chars[2] + TOKENS_PER_IMAGE] * 3
    assert (
        dataset[2]["input_ids"]
        == dataset[4]["input_ids"]
        == dataset[6]["input_ids"]
        == dataset[1]["input_ids"]
    )
    assert dataset[-1]["input_ids"] == dataset[3]["input_ids"]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_holds_no_parsed_records(tmp_path, processor):
    rng = random.Random(0)
    kana = "あいうえおかきくけこさしすせそたちつてと"
    n = 10_000
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            reply = "".join(rng.choices(kana, k=120))
            f.write(
                json.dumps({"id": k, "conversations": _conv("説明して", reply)}, ensure_ascii=False) + "\n"
            )
    dataset = _dataset(path, processor)
    overhead = len(pickle.dumps(dataset)) - len(pickle.dumps(processor))
    # ~26 bytes a record of offsets and lengths; the records themselves are ~400 bytes each.
    assert overhead < 32 * n
    assert overhead < path.stat().st_size / 10
    assert len(dataset.lengths) == n
    assert dataset[n - 1]["input_ids"]  # and the last record is still reachable


# --- collator ------------------------------------------------------------------------------------


def test_collator_mixed_batch_shapes(tmp_path, aspect_processor):
    _png(tmp_path / "square.png", (128, 128))
    _png(tmp_path / "wide.png", (128, 64))
    _png(tmp_path / "tall.png", (64, 128))
    records = [
        {"conversations": _conv("こんにちは", "こんにちは。")},
        {"image": "square.png", "conversations": _conv("<image>\n何?", "円です。")},
        {"image": ["wide.png", "tall.png"], "conversations": _conv("<image><image>\n違いは?", "向きです。")},
    ]
    dataset = _dataset(_write_jsonl(tmp_path / "m.jsonl", records), aspect_processor)
    samples = [dataset[i] for i in range(3)]
    pad_id = aspect_processor.tokenizer.pad_token_id
    skipped = SkippedRecord("m.jsonl", 9, None, "missing image")
    batch = DataCollator(pad_id)(samples + [skipped])
    lengths = [len(s["input_ids"]) for s in samples]
    assert (
        batch["input_ids"].shape
        == batch["labels"].shape
        == batch["attention_mask"].shape
        == (3, max(lengths))
    )
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, sample in enumerate(samples):
        assert batch["input_ids"][row, : lengths[row]].tolist() == sample["input_ids"]
        assert (batch["input_ids"][row, lengths[row] :] == pad_id).all()
        assert (batch["labels"][row, lengths[row] :] == IGNORE_INDEX).all()
    assert isinstance(batch["pixel_values"], list)
    assert [tuple(p.shape) for p in batch["pixel_values"]] == [(3, 128, 128), (3, 64, 128), (3, 128, 64)]
    assert batch["input_ids"][2].tolist().count(aspect_processor.image_token_id) == 2 + 2
    assert batch["skipped"] == [skipped]

    left = DataCollator(pad_id, padding_side="left")(samples)
    assert left["input_ids"][0, -lengths[0] :].tolist() == samples[0]["input_ids"]
    assert (left["labels"][0, : -lengths[0]] == IGNORE_INDEX).all()

    one_size = DataCollator(pad_id)([samples[1], samples[0], samples[1]])
    assert one_size["pixel_values"].shape == (2, 3, 128, 128)
    assert "pixel_values" not in DataCollator(pad_id)([samples[0]])
    empty = DataCollator(pad_id)([skipped, skipped])
    assert empty["input_ids"].shape == empty["labels"].shape == (0, 0)
    assert empty["skipped"] == [skipped, skipped] and "pixel_values" not in empty


# --- sampler -------------------------------------------------------------------------------------


def test_sampler_groups_a_real_dataset(tmp_path, processor):
    records = _format_records(tmp_path)
    dataset = _dataset(_write_jsonl(tmp_path / "d.jsonl", records * 5), processor)
    order = list(ModalityLengthGroupedSampler(dataset.lengths, 2, seed=0))
    for start in range(0, len(order), 2):
        kinds = {len(dataset[i]["pixel_values"]) > 0 for i in order[start : start + 2]}
        assert len(kinds) == 1


def test_each_piece_has_one_home_and_data_never_imports_model():
    homes = {
        "ConversationDataset": "dataset",
        "DataCollator": "collate",
        "pad_sequences": "collate",
        "stack_images": "collate",
        "SkipTracker": "skips",
        "SkippedRecord": "skips",
        "DataSource": "records",
        "ModalityLengthGroupedSampler": "sampler",
    }
    for name, module in homes.items():
        home = f"convllava_jp.data.{module}"
        assert getattr(importlib.import_module(home), name).__module__ == home
    assert set(ds_mod.__all__) >= {"ConversationDataset", "japanese_fraction"}
    for path in Path(ds_mod.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hints_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in hints_only:
                continue
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.startswith(("..model", "convllava_jp.model")), f"{path.name}: {target}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("convllava_jp.model") for a in node.names), path.name
