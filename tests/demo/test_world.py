"""The synthetic world: deterministic, held-out, truthful to its images, balanced, tokenizable.

The answer checks use an oracle written here from the Japanese text alone (its own word tables),
not the generator's functions, so a generator bug cannot check itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convllava_jp.demo import language, scenes
from convllava_jp.demo.tokenizer import TEMPLATE_TOKENS
from convllava_jp.demo.world import WorldInfo, generate_world, load_world_info
from convllava_jp.errors import ConfigError, DataError
from convllava_jp.model import templates

ADJECTIVES = {"赤い": "赤", "青い": "青", "緑の": "緑", "黄色い": "黄", "紫の": "紫"}
ADJ_OF = {colour: adjective for adjective, colour in ADJECTIVES.items()}
POSITIONS = ("左上", "右上", "左下", "右下")
SHAPE_WORDS = ("円", "四角", "三角", "星")
_ADJ = "|".join(ADJECTIVES)
_SHAPE = "|".join(SHAPE_WORDS)
_POS = "|".join(POSITIONS)
CHANCE = {"count": 1 / 4, "shape_of_colour": 1 / 4, "colour_at_position": 1 / 5, "yes_no": 1 / 2}
EOS = "<EOD|LLM-jp>"


def scene_triples(scene: dict) -> list[tuple[str, str, str]]:
    return [(s["position"], s["colour"], s["shape"]) for s in scene["shapes"]]


def parse_caption(text: str) -> tuple[list[tuple[str, str, str]], int | None]:
    """(position, colour, shape) in the order written, and the count if the caption states one.

    A colour-keyed caption ('画像には赤い円と青い四角があります。') has no positions: (None, colour, shape).
    Every caption opens with 画像には or 図形はNつで、, never with a word read off the image.
    """
    if m := re.fullmatch(rf"画像には((?:(?:{_ADJ})(?:{_SHAPE})と)*(?:{_ADJ})(?:{_SHAPE}))があります。", text):
        parts = m.group(1).split("と")
        triples = []
        for part in parts:
            p = re.fullmatch(rf"({_ADJ})({_SHAPE})", part)
            assert p, (part, text)
            triples.append((None, ADJECTIVES[p.group(1)], p.group(2)))
        return triples, None
    m = re.fullmatch(r"(?:画像には|図形は(\d)つで、)(.*)があります。", text)
    assert m, text
    parts = re.split("があり、|、", m.group(2))
    triples = []
    for part in parts:
        p = re.fullmatch(rf"({_POS})に({_ADJ})({_SHAPE})", part)
        assert p, (part, text)
        triples.append((p.group(1), ADJECTIVES[p.group(2)], p.group(3)))
    return triples, int(m.group(1)) if m.group(1) else None


def oracle(question: str, triples: list[tuple[str, str, str]]) -> tuple[str, str]:
    """(qtype, answer) from the question text and the scene's (position, colour, shape) list."""
    if question == "図形はいくつありますか？":
        return "count", f"{len(triples)}つです。"
    if m := re.fullmatch(rf"({_ADJ})図形はどんな形ですか？", question):
        (shape,) = [s for _, c, s in triples if c == ADJECTIVES[m.group(1)]]
        return "shape_of_colour", f"{m.group(1)}{shape}です。"
    if m := re.fullmatch(rf"({_POS})にある図形は何色ですか？", question):
        (colour,) = [c for p, c, _ in triples if p == m.group(1)]
        return "colour_at_position", f"{m.group(1)}に{ADJ_OF[colour]}図形があります。"
    if m := re.fullmatch(rf"({_ADJ})({_SHAPE})はありますか？", question):
        found = [s for _, c, s in triples if c == ADJECTIVES[m.group(1)]]
        if not found:
            return "yes_no", f"{m.group(1)}図形はありません。"
        verdict = "があります" if found == [m.group(2)] else "しかありません"
        return "yes_no", f"{m.group(1)}{found[0]}{verdict}。"
    if question == "画像を説明してください。":
        return "describe", ""
    raise AssertionError(f"unexpected question {question!r}")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldInfo:
    return generate_world(
        tmp_path_factory.mktemp("world"), n_train=240, n_test=120, seed=3, n_pretrain_text=400, progress=False
    )


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world.tokenizer)


# --------------------------------------------------------------------------- determinism, files


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    kwargs = dict(n_train=24, n_test=12, n_pretrain_text=60)
    generate_world(tmp_path / "a", seed=5, progress=True, **kwargs)
    generate_world(tmp_path / "b", seed=5, progress=False, **kwargs)
    generate_world(tmp_path / "c", seed=6, progress=False, **kwargs)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert len(a) > 36 + 4 and a == b
    assert "tokenizer/tokenizer.json" in a
    assert a["stage1.json"] != c["stage1.json"]
    assert a["images/train_000000.png"] != c["images/train_000000.png"]


def test_files_do_not_depend_on_how_many_processes_draw_them(tmp_path, monkeypatch):
    from convllava_jp.demo import world as world_module

    monkeypatch.setattr(world_module, "_CHUNK", 7)  # several chunks per split, a short last one
    kwargs = dict(n_train=30, n_test=17, n_pretrain_text=20, seed=2, progress=False)
    generate_world(tmp_path / "one", workers=1, **kwargs)
    generate_world(tmp_path / "three", workers=3, **kwargs)
    one, three = tree_digest(tmp_path / "one"), tree_digest(tmp_path / "three")
    assert one == three and len(one) > 30 + 17
    ids = [r["id"] for r in read_json(tmp_path / "three" / "stage3.json")]
    assert ids == [f"train_{i:06d}" for i in range(30)]
    assert [r["id"] for r in read_json(tmp_path / "three" / "test.json")] == [
        f"test_{i:06d}" for i in range(17)
    ]


def test_regenerating_replaces_an_earlier_world_and_refuses_other_directories(tmp_path):
    generate_world(tmp_path / "w", n_train=10, n_test=4, n_pretrain_text=10, progress=False)
    info = generate_world(tmp_path / "w", n_train=6, n_test=2, n_pretrain_text=10, progress=False)
    assert sorted(p.name for p in info.images.iterdir()) == [f"test_{i:06d}.png" for i in range(2)] + [
        f"train_{i:06d}.png" for i in range(6)
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        generate_world(tmp_path / "other", n_train=2, n_test=0, progress=False)
    with pytest.raises(ConfigError, match="n_train"):
        generate_world(tmp_path / "x", n_train=0, n_test=0, progress=False)


def test_world_info_and_chance_levels(world):
    info = load_world_info(world.root)
    assert info == world
    meta = read_json(world.root / "world.json")
    assert meta["seed"] == 3 and meta["n_train"] == 240 and meta["n_test"] == 120
    assert meta["question_types"] == list(CHANCE)
    assert meta["chance"] == pytest.approx(CHANCE) and world.chance == pytest.approx(CHANCE)
    test = read_json(world.test)
    assert [r["chance"] for r in test] == pytest.approx([CHANCE[r["qtype"]] for r in test])
    # 30 items of each type: mean chance (1/4 + 1/4 + 1/5 + 1/2) / 4
    assert world.test_chance == pytest.approx(np.mean([r["chance"] for r in test])) == pytest.approx(0.3)
    assert sorted(meta["image_sizes"]) == [[128, 128], [128, 192], [160, 160], [192, 128]]


def test_load_world_info_errors(tmp_path):
    with pytest.raises(DataError, match="world.json"):
        load_world_info(tmp_path)
    (tmp_path / "world.json").write_text("{ not json")
    with pytest.raises(DataError, match="line 1"):
        load_world_info(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(DataError, match="missing key"):
        load_world_info(tmp_path)


# --------------------------------------------------------------------------- images vs text


def test_held_out_images_are_disjoint_from_train(world):
    def pixel_hash(path):
        return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()

    train = {pixel_hash(world.root / r["image"]) for r in read_json(world.stage1)}
    test = [pixel_hash(world.root / r["image"]) for r in read_json(world.test)]
    assert len(train) == 240 and len(set(test)) == 120
    assert not train & set(test)
    stage3_images = {r["image"] for r in read_json(world.stage3)}
    assert stage3_images == {r["image"] for r in read_json(world.stage1)}
    assert not stage3_images & {r["image"] for r in read_json(world.test)}


def test_drawn_scenes_are_a_deterministic_stream_apart_from_the_world(world):
    def pixel_hash(image):
        return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()

    drawn = scenes.draw_scenes(world.seed, 0, 40, world.image_size)
    again = scenes.draw_scenes(world.seed, 30, 10, world.image_size)
    assert [pixel_hash(i) for i, _ in drawn[30:]] == [pixel_hash(i) for i, _ in again]
    assert [s for _, s in drawn[30:]] == [s for _, s in again]
    stored = {
        hashlib.sha256(np.asarray(Image.open(world.root / r["image"])).tobytes()).hexdigest()
        for r in read_json(world.stage1) + read_json(world.test)
    }
    assert not stored & {pixel_hash(i) for i, _ in drawn}
    for image, scene in drawn:
        assert image.size == (scene["width"], scene["height"]) and 1 <= len(scene["shapes"]) <= 4
    with pytest.raises(ConfigError, match="integers >= 0"):
        scenes.draw_scenes(0, -1, 3)


def test_yes_no_answers_name_what_the_image_has_before_the_verdict():
    scene = {"shapes": [{"colour": "赤", "shape": "三角"}, {"colour": "青", "shape": "円"}]}
    assert language.yes_no_answer(scene, "赤", yes=False) == "赤い三角しかありません。"
    assert language.yes_no_answer(scene, "青", yes=True) == "青い円があります。"
    assert language.yes_no_answer(scene, "緑", yes=False) == "緑の図形はありません。"
    with pytest.raises(ConfigError, match="cannot be yes"):
        language.yes_no_answer(scene, "緑", yes=True)


def test_images_show_exactly_the_scene(world):
    """Each shape's centre has its colour, empty quadrants are plain background, sizes match."""
    records = read_json(world.stage1)[:60] + read_json(world.test)[:60]
    sizes = Counter()
    for r in records:
        scene = r["scene"]
        pixels = np.asarray(Image.open(world.root / r["image"]).convert("RGB"), dtype=int)
        h, w, _ = pixels.shape
        assert (w, h) == (scene["width"], scene["height"])
        sizes[w, h] += 1
        occupied = set()
        for s in scene["shapes"]:
            cx, cy = s["center"]
            quadrant = POSITIONS[2 * int(cy >= h / 2) + int(cx >= w / 2)]
            assert quadrant == s["position"]
            # the whole shape fits in its quadrant, so padding to square keeps it there
            reach = 1.2 * s["radius"]  # a square's corner
            col, row = POSITIONS.index(s["position"]) % 2, POSITIONS.index(s["position"]) // 2
            x0, x1, y0, y1 = col * w / 2, (col + 1) * w / 2, row * h / 2, (row + 1) * h / 2
            assert x0 <= cx - reach and cx + reach <= x1 and y0 <= cy - reach and cy + reach <= y1
            centre = pixels[int(cy), int(cx)]
            assert np.abs(centre - s["rgb"]).max() <= 4, (r["id"], s)
            occupied.add(s["position"])
        for i, position in enumerate(POSITIONS):
            if position in occupied:
                continue
            col, row = i % 2, i // 2
            cell = pixels[row * h // 2 : (row + 1) * h // 2, col * w // 2 : (col + 1) * w // 2]
            assert np.abs(cell - scene["background"]).max() <= 4, (r["id"], position)
    assert len(sizes) == 4


def test_captions_name_every_shape_in_an_order_apart_from_the_grid(world):
    variants = Counter()
    first_cells = Counter()
    for r in read_json(world.stage1):
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>\n画像を説明してください。"}
        triples, count = parse_caption(gpt["value"])
        expected = scene_triples(r["scene"])
        assert expected == sorted(expected, key=lambda t: POSITIONS.index(t[0]))
        if triples[0][0] is None:  # colour-keyed: every shape, in the colours' fixed order
            by_colour = sorted(expected, key=lambda t: list(ADJECTIVES.values()).index(t[1]))
            assert triples == [(None, c, s) for _, c, s in by_colour]
            variants["by colour"] += 1
        else:
            assert sorted(triples) == sorted(expected) and len(triples) == len(expected)
            if len(triples) > 1:
                first_cells[triples[0][0]] += 1
        assert count in (None, len(expected))
        assert len({c for _, c, _ in expected}) == len(expected)  # colours distinct within an image
        variants[(gpt["value"][:2], "があり、" in gpt["value"])] += 1
    assert len(variants) >= 5 and variants["by colour"]  # the phrasing varies
    # the first shape named can be in any cell, not always the first filled one in grid order
    assert len(first_cells) == len(POSITIONS), first_cells
    assert max(first_cells.values()) < 0.7 * sum(first_cells.values()), first_cells


def test_stage3_answers_match_the_scene(world):
    qtypes = Counter()
    for r in read_json(world.stage3):
        conv = r["conversations"]
        assert 2 <= len(conv) <= 6 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        questions = [conv[0]["value"].removeprefix("<image>\n")] + [t["value"] for t in conv[2::2]]
        assert len(set(questions)) == len(questions)
        triples = scene_triples(r["scene"])
        named_colours = []
        answers = [t["value"] for t in conv[1::2]]
        assert len(r["qtypes"]) == len(questions)
        for i, (question, answer, qtype) in enumerate(zip(questions, answers, r["qtypes"])):
            kind, expected = oracle(question, triples)
            assert kind == qtype
            qtypes[kind] += 1
            if kind == "describe":
                assert i == len(questions) - 1  # last, so no later answer can be read off it
                described = parse_caption(answer)[0]
                if described[0][0] is None:
                    assert sorted(described) == sorted((None, c, s) for _, c, s in triples)
                else:
                    assert sorted(described) == sorted(triples)
            else:
                assert answer == expected, (r["id"], question)
            if m := re.match(_ADJ, question):
                named_colours.append(m.group(0))
        # no two turns ask about one colour (the first answer would give the second away)
        assert len(set(named_colours)) == len(named_colours), r["id"]
    assert set(qtypes) == {*CHANCE, "describe"}


def test_test_split_is_balanced_single_questions(world):
    test = read_json(world.test)
    by_type = defaultdict(Counter)
    for r in test:
        (human, gpt) = r["conversations"]
        question = human["value"].removeprefix("<image>\n")
        assert human["value"].startswith("<image>\n")
        kind, expected = oracle(question, scene_triples(r["scene"]))
        assert kind == r["qtype"] and gpt["value"] == r["answer"] == expected
        by_type[kind][r["label"]] += 1
    assert {k: sum(c.values()) for k, c in by_type.items()} == dict.fromkeys(CHANCE, 30)
    for qtype, counts in by_type.items():
        # exactly balanced: the majority-class baseline is at chance (up to rounding)
        assert len(counts) == round(1 / CHANCE[qtype])
        assert max(counts.values()) / 30 <= CHANCE[qtype] + 0.04, (qtype, counts)


def test_stage3_answers_are_balanced_and_not_guessable_from_the_question():
    """On many conversations: each type's answer classes are uniform, and knowing the question text
    (the best a model that ignores the image can use) predicts no better than chance."""
    answers = defaultdict(Counter)
    per_question = defaultdict(lambda: defaultdict(Counter))
    for i in range(6000):
        rng = np.random.default_rng([11, 0, i])
        scene = scenes.sample_scene(rng, 128)
        for qa in language.conversation(scene, rng, allow_describe=True):
            if qa.qtype != "describe":
                answers[qa.qtype][qa.label] += 1
                per_question[qa.qtype][qa.question][qa.label] += 1
    for qtype, chance in CHANCE.items():
        counts = answers[qtype]
        n = sum(counts.values())
        assert n > 2000 and len(counts) == round(1 / chance)
        shares = [v / n for v in counts.values()]
        assert max(shares) < chance + 0.03 and min(shares) > chance - 0.03, (qtype, counts)
        question_only = sum(max(c.values()) for c in per_question[qtype].values()) / n
        assert question_only < chance + 0.06, (qtype, question_only)


def test_pretrain_text_answers_follow_the_caption(world):
    lines = [json.loads(line) for line in world.pretrain_text.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 400 and all(set(x) == {"text"} for x in lines)
    chats = [x["text"] for x in lines if x["text"].startswith(templates.LLM_JP_SYSTEM_PROMPT)]
    captions = [x["text"] for x in lines if not x["text"].startswith(templates.LLM_JP_SYSTEM_PROMPT)]
    assert len(chats) == len(captions) == 200
    for text in captions:
        parse_caption(text)
    turn = re.compile(
        rf" {templates.USER_ROLE_JA}: (.*?) {templates.ASSISTANT_ROLE_JA}: (.*?){re.escape(EOS)}", re.S
    )
    for text in chats:
        pairs = turn.findall(text)
        assert 1 <= len(pairs) <= 3
        caption, first_question = pairs[0][0].split("\n")
        triples, _ = parse_caption(caption)
        questions = [first_question] + [q for q, _ in pairs[1:]]
        for question, (_, answer) in zip(questions, pairs):
            kind, expected = oracle(question, triples)
            assert kind != "describe" and answer == expected
        messages = [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][1]}]
        for q, a in pairs[1:]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert templates.render(messages, "llm-jp-v1", EOS) == text


# --------------------------------------------------------------------------- tokenizer


def world_strings(world) -> set[str]:
    strings = set()
    for path in (world.stage1, world.stage3, world.test):
        for r in read_json(path):
            strings.update(t["value"] for t in r["conversations"])
            strings.add(templates.render(r["conversations"], "llm-jp-v1", EOS))
    strings.update(json.loads(line)["text"] for line in world.pretrain_text.read_text().splitlines())
    return strings


def test_tokenizer_round_trips_every_world_string_without_fallback(world, tokenizer):
    byte_ids = {tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    for text in world_strings(world):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids and not byte_ids & set(ids), text
    # text outside the world falls back to bytes and still comes back exactly
    for text in ("Hello, 世界! ☃ 12", "  二重  空白\t"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    assert 300 <= len(tokenizer) <= 1100
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    specials = {"<unk>", "<pad>", EOS, "<image>"}
    assert specials <= set(vocab)
    learned = [
        t
        for t in vocab
        if t not in specials and t not in TEMPLATE_TOKENS and not re.fullmatch(r"<0x[0-9A-F]{2}>", t)
    ]
    assert learned and max(len(t) for t in learned) <= 3
    assert any(len(t) == 3 for t in learned)  # the cap is 3 characters, not 2
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (EOS, "<pad>", "<unk>")
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}) == 3
    assert tokenizer.bos_token is None


def test_template_text_is_one_token_each_and_decodes_exactly(tokenizer):
    """The llm-jp-v1 template's system prompt and role markers are one token each, plain text."""
    messages = [
        {"role": "user", "content": "<image>\n赤い円はありますか？"},
        {"role": "assistant", "content": "赤い円があります。"},
        {"role": "user", "content": "図形はいくつありますか？"},
    ]
    text = templates.render(messages, "llm-jp-v1", EOS, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == templates.LLM_JP_SYSTEM_PROMPT
    assert (
        pieces.count(f" {templates.USER_ROLE_JA}: ") == 2
        and pieces.count(f" {templates.ASSISTANT_ROLE_JA}: ") == 2
    )
    assert tokenizer.decode(ids) == text
    # not special: skipping special tokens keeps them (only <image> and EOS go)
    assert templates.LLM_JP_SYSTEM_PROMPT in tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) < 30


def test_world_words_are_whole_tokens(tokenizer):
    """Colours, shapes and positions (with their particle) are one token wherever they occur,
    never merged with a neighbour (BPE had made 黄色い星 into 黄色 + い星)."""
    cases = {
        "左上にある図形は何色ですか？": ["左上に"],
        "右下に緑の図形があります。": ["右下に", "緑の"],
        "黄色い図形はありません。": ["黄色い"],
        "左下に黄色い星、右上に紫の三角があります。": ["左下に", "黄色い", "星", "右上に", "紫の", "三角"],
        "青い四角はありません。": ["青い", "四角"],
        "赤い円です。": ["赤い", "円"],
    }
    for text, words in cases.items():
        tokens = tokenizer.tokenize(text)
        assert all(w in tokens for w in words), (text, tokens)
        assert "".join(tokens) == text


def test_image_and_eos_are_single_tokens(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer("<image>\n図形はいくつありますか？", add_special_tokens=False)["input_ids"]
    assert ids[0] == image_id and ids.count(image_id) == 1
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == image_id
    ids = tokenizer("3つです。" + EOS, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    # encoding adds nothing of its own (no BOS/EOS): the collator decides
    assert tokenizer("円")["input_ids"] == tokenizer("円", add_special_tokens=False)["input_ids"]


def test_chat_templates_match_templates_render(world, tokenizer, tmp_path):
    conversation = read_json(world.stage3)[0]["conversations"]
    messages = templates.normalize_messages(conversation)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == templates.render(
        messages, "llm-jp-v1", EOS
    )
    prompt = messages[:1]
    assert tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    ) == templates.render(prompt, "llm-jp-v1", EOS, add_generation_prompt=True)
    for name in templates.TEMPLATE_NAMES:
        assert tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=name
        ) == templates.render(messages, name, EOS)

    # the named templates survive another save/load round
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.apply_chat_template(messages, tokenize=False, chat_template="plain") == templates.render(
        messages, "plain", EOS
    )
    assert again("<image>円")["input_ids"] == tokenizer("<image>円")["input_ids"]
