"""A synthetic visual world with Japanese text: the demo's stand-in for real datasets and weights.

`generate_world(out_dir, n_train, n_test, seed)` draws scenes of 1-4 coloured shapes, one per cell
of a 2x2 grid (左上/右上/左下/右下), and writes everything the three training stages and the held-out
evaluation need::

    images/train_000000.png ...  images/test_000000.png ...
    stage1.json          LLaVA captions: "<image>\\n画像を説明してください。" -> "画像には左上に赤い円、右下に青い四角があります。"
    stage3.json          LLaVA instructions, 1-3 turns per image (count / shape_of_colour /
                         colour_at_position / yes_no, and some describe turns answered by the caption)
    test.json            held-out images, one question each, with "qtype", "answer" and "chance"
    pretrain_text.jsonl  {"text": ...} lines to pretrain the tiny LLM on the world's Japanese:
                         captions, and chats whose scene is given as a caption instead of an image
    tokenizer/           a small char-level BPE tokenizer (tokens of at most 3 characters) with the
                         `llm-jp-v1` (default) and `plain` chat templates
    world.json           seed, counts, files, question types and the chance level of each

Every answer depends on the image only: the question names a colour, a position or a combination
whose answer is drawn independently of it, classes are balanced, and within one conversation no
earlier turn gives a later answer away. Everything is a pure function of the seed, so two runs
write byte-identical files. Records carry the drawn scene under "scene" so tests (and curious
users) can re-derive every answer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError, DataError
from . import templates

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS",
    "DESCRIBE_QUESTION",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "UNK_TOKEN",
    "Colour",
    "WorldInfo",
    "caption",
    "draw_scenes",
    "generate_world",
    "load_world_info",
    "train_tokenizer",
    "yes_no_answer",
]


@dataclass(frozen=True)
class Colour:
    name: str  # 赤
    adjective: str  # 赤い (before a noun: 赤い円)
    rgb: tuple[int, int, int]


POSITIONS = ("左上", "右上", "左下", "右下")  # grid order: row-major
COLOURS = (
    Colour("赤", "赤い", (215, 35, 35)),
    Colour("青", "青い", (35, 80, 225)),
    Colour("緑", "緑の", (30, 150, 50)),
    Colour("黄", "黄色い", (235, 190, 10)),
    Colour("紫", "紫の", (135, 50, 175)),
)
SHAPES = ("円", "四角", "三角", "星")
SIZES = ("large", "small")
QUESTION_TYPES = ("count", "shape_of_colour", "colour_at_position", "yes_no")
MAX_SHAPES = len(POSITIONS)

IMAGE_TOKEN = templates.IMAGE_TOKEN
EOS_TOKEN = "<EOD|LLM-jp>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (UNK_TOKEN, PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
DESCRIBE_QUESTION = "画像を説明してください。"

# Chance level of each question type: one over its number of possible answers (yes_no: of its
# verdict; its answer also names the shape of the asked colour, so guessing scores below this).
CHANCE = MappingProxyType(
    {
        "count": 1 / MAX_SHAPES,
        "shape_of_colour": 1 / len(SHAPES),
        "colour_at_position": 1 / len(COLOURS),
        "yes_no": 1 / 2,
    }
)

# Image sizes as multiples of `image_size` (width, height). The grid is the image's quadrants, so
# "pad" preprocessing (centre on a square, then resize) keeps every shape in its quadrant.
_ASPECTS = ((1.0, 1.0), (1.25, 1.25), (1.5, 1.0), (1.0, 1.5))
_RADIUS = MappingProxyType(
    {"large": 0.175, "small": 0.125}
)  # of the short side; the largest still fits its cell
_EXTENT = 1.21  # a shape's farthest point from its centre, in radii (a square's corners)
_DESCRIBE_RATE = 0.25  # share of stage-3 conversations that end with a describe turn
_NOISE = 4  # +- grey levels of pixel noise
_VERSION = 4
_MAX_TOKEN_CHARS = 3  # longest learned token; uncapped BPE turns answers into single tokens

# Independent random streams: each image / record draws from default_rng([seed, stream, index]).
_TRAIN_STREAM, _TEST_STREAM, _PRETRAIN_STREAM, _TEST_PLAN_STREAM, _EXTRA_STREAM = range(5)

_COLOUR_BY_NAME = MappingProxyType({c.name: c for c in COLOURS})
_FILES = MappingProxyType(
    {
        "images": "images",
        "stage1": "stage1.json",
        "stage3": "stage3.json",
        "test": "test.json",
        "pretrain_text": "pretrain_text.jsonl",
        "tokenizer": "tokenizer",
    }
)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Shape:
    position: str
    colour: str
    shape: str
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    tint: tuple[int, int, int]  # small per-shape offset from the colour's base RGB

    @property
    def rgb(self) -> tuple[int, int, int]:
        base = _COLOUR_BY_NAME[self.colour].rgb
        return tuple(int(min(255, max(0, b + t))) for b, t in zip(base, self.tint))

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "center": list(self.center),
            "radius": self.radius,
            "angle": self.angle,
            "rgb": list(self.rgb),
        }


@dataclass(frozen=True)
class _Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[_Shape, ...]  # in grid order

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "shapes": [s.to_dict() for s in self.shapes],
        }


def _sample_scene(rng: np.random.Generator, image_size: int, n_shapes: int | None = None) -> _Scene:
    aw, ah = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    width, height = round(image_size * aw), round(image_size * ah)
    short = min(width, height)
    if n_shapes is None:
        n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), n_shapes, replace=False))
    colours = [COLOURS[int(i)].name for i in rng.choice(len(COLOURS), n_shapes, replace=False)]
    grey = int(rng.integers(222, 250))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-6, 7, 3), 0, 255))
    shapes = []
    for cell, colour in zip(cells, colours):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = round(short * _RADIUS[size] * float(rng.uniform(0.9, 1.1)), 2)
        row, col = divmod(cell, 2)
        cell_w, cell_h = width / 2, height / 2
        # Jitter the centre, keeping the whole shape (plus 2 px) inside its cell.
        slack_x = max(0.0, cell_w / 2 - radius * _EXTENT - 2)
        slack_y = max(0.0, cell_h / 2 - radius * _EXTENT - 2)
        cx = (col + 0.5) * cell_w + float(rng.uniform(-slack_x, slack_x))
        cy = (row + 0.5) * cell_h + float(rng.uniform(-slack_y, slack_y))
        angle = round(float(rng.uniform(-15, 15)), 1)
        tint = tuple(int(v) for v in rng.integers(-12, 13, 3))
        shapes.append(
            _Shape(POSITIONS[cell], colour, shape, size, (round(cx, 1), round(cy, 1)), radius, angle, tint)
        )
    return _Scene(width, height, background, tuple(shapes))


def draw_scenes(seed: int, start: int, n: int, image_size: int = 128) -> list[tuple[Image.Image, dict]]:
    """`n` more scenes of the world (image, scene dict), numbered from `start`: an endless stream.

    Drawn like the training images but from a stream of their own, so they never repeat a
    training or test image; the same (seed, index) always gives the same scene. The demo's
    vision pretraining reads from it: with a fresh batch every step the tower cannot memorise
    its images (1000 steps on the 8000 stored ones: 65% held-out cell shape accuracy; 3000
    steps on fresh scenes: 97-100%).
    """
    if not isinstance(n, int) or n < 0 or not isinstance(start, int) or start < 0:
        raise ConfigError(f"start and n must be integers >= 0, got start={start!r}, n={n!r}")
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, _EXTRA_STREAM, i])
        scene = _sample_scene(rng, image_size)
        out.append((_render(scene, rng), scene.to_dict()))
    return out


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "四角":
        corners = [(45 + 90 * k, 0.85 * math.sqrt(2) * r) for k in range(4)]
    elif shape == "三角":
        corners = [(-90 + 120 * k, 1.1 * r) for k in range(3)]
    else:  # 星: five outer tips and five inner corners
        corners = [(-90 + 36 * k, 1.12 * r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    a = math.radians(angle)
    return [
        (cx + d * math.cos(math.radians(t) + a), cy + d * math.sin(math.radians(t) + a)) for t, d in corners
    ]


def _render(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        cx, cy = s.center
        if s.shape == "円":
            draw.ellipse((cx - s.radius, cy - s.radius, cx + s.radius, cy + s.radius), fill=s.rgb)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, s.radius, s.angle), fill=s.rgb)
    pixels = np.asarray(image, dtype=np.int16)
    # Brightness noise (one value per pixel for all channels): as good a nuisance as colour noise
    # and half the PNG size and encoding time.
    noise = rng.integers(-_NOISE, _NOISE + 1, (*pixels.shape[:2], 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- text


CAPTION_VARIANTS = 5


def _shape_dicts(scene: _Scene | dict) -> list[dict]:
    """The shapes of a scene, or of a record's "scene" dict, as dicts."""
    return scene["shapes"] if isinstance(scene, dict) else [s.to_dict() for s in scene.shapes]


def caption(scene: _Scene | dict, variant: int = 0) -> str:
    """A scene (a record's "scene" dict) in one Japanese sentence.

    `variant` picks the phrasing. 0-3 name the shapes by position: 0
    '画像には左上に赤い円、右下に青い四角があります。', 1 '画像には左上に赤い円があり、右下に…',
    2 '図形は2つで、左上に赤い円、右下に…', 3 '図形は2つで、左上に赤い円があり、右下に…'. 4 names them
    by colour, in the colours' fixed order, without positions: '画像には赤い円と青い四角があります。'.
    In 0-3 a colour follows its position word, which teaches the LLM which image token a position
    names; in 4 a shape follows its colour word, which teaches it to find the token of a colour.

    Every caption opens with a fixed phrase, never with a word read off the image, so the only
    answers that open with a position or a colour word are the ones that restate it from the
    question. (Some runs answered '右下にある図形は何色ですか？' by naming another shape's position,
    as a caption opening would; this opening alone did not stop that - the LLM's init scale did,
    `model.presets` tiny - but it leaves each answer's first word one source.)

    Neither order follows the grid: 0-3 list the shapes in an order fixed by their colours and
    shapes (a hash, so the same scene always reads the same). In grid order, "the n-th shape
    named is the n-th filled cell" answered captions as well as reading the cells, and one demo
    run learned that shortcut: colour_at_position 57%, naming the first-listed shape's colour.
    With this order the same seed scored 100%.
    """
    if variant not in range(CAPTION_VARIANTS):
        raise ConfigError(f"caption variant must be one of 0-{CAPTION_VARIANTS - 1}, got {variant!r}")
    shapes = _shape_dicts(scene)
    if variant == 4:
        by_colour = sorted(shapes, key=lambda s: list(_COLOUR_BY_NAME).index(s["colour"]))
        return (
            "画像には"
            + "と".join(f"{_COLOUR_BY_NAME[s['colour']].adjective}{s['shape']}" for s in by_colour)
            + "があります。"
        )
    listed = sorted(shapes, key=lambda s: zlib.crc32(f"{variant}{s['colour']}{s['shape']}".encode()))
    parts = [f"{s['position']}に{_COLOUR_BY_NAME[s['colour']].adjective}{s['shape']}" for s in listed]
    opening = "画像には" if variant < 2 else f"図形は{len(parts)}つで、"
    joiner = "、" if variant % 2 == 0 else "があり、"
    return opening + joiner.join(parts) + "があります。"


@dataclass(frozen=True)
class _QA:
    qtype: str
    question: str
    answer: str
    label: str  # the class: "3", "円", "赤", "はい"/"いいえ"; the caption for describe
    colour: str | None = None  # the colour the question names, to keep later turns from leaking


def yes_no_answer(scene: _Scene | dict, colour: str, yes: bool) -> str:
    """The answer to '赤い円はありますか？', naming the shape the image has in that colour.

    '赤い円があります。' (yes), '赤い三角しかありません。' (no: the colour has another shape),
    '赤い図形はありません。' (no: no shape of that colour). The shape after the colour is always
    the one read off the image, as in captions and shape_of_colour answers, and the verdict is
    the very next token (が / しか), where the shape just read can be compared with the asked
    one. A verdict up front ('はい、あります。') needs the reading and the comparison in one
    token: the demo's 2-layer LLM stayed at chance on it (46-54% over three runs). Named first,
    the shape is read right (yes and colour-absent answers 94-100%); the comparison is learned
    late in stage 3 (in four of five demo runs: docs/training.md), and only when the LLM's text
    warm-up ran at a low learning rate.
    """
    shapes = _shape_dicts(scene)
    adjective = _COLOUR_BY_NAME[colour].adjective
    found = [s["shape"] for s in shapes if s["colour"] == colour]
    if yes:
        if not found:
            raise ConfigError(f"no {colour} shape in the scene: the answer cannot be yes")
        return f"{adjective}{found[0]}があります。"
    if not found:
        return f"{adjective}図形はありません。"
    return f"{adjective}{found[0]}しかありません。"


def _ask(
    qtype: str,
    scene: _Scene,
    rng: np.random.Generator,
    used_colours: frozenset[str] = frozenset(),
    target: int | str | bool | None = None,
) -> _QA | None:
    """One question about `scene`; None when none fits (all candidate colours already used).

    `used_colours`: colours an earlier turn asked about with shape_of_colour or yes_no; asking
    about them again could be answered from that turn instead of the image.

    Answers restate what the question names right before the word read off the image
    ('左上に赤い図形があります。', '赤い円です。'), as a Japanese answer often does. For a small LLM this
    splits the lookup in two steps it learns fast: copy the named word from the question, then
    read the image token that word points at (a text-only toy: at chance after 1000 steps when
    the answer word comes straight after the prompt, 100% by step 200 with the restated word).
    """
    shapes = scene.shapes
    if qtype == "count":
        n = len(shapes)
        return _QA(qtype, "図形はいくつありますか？", f"{n}つです。", str(n))
    if qtype == "shape_of_colour":
        candidates = [s for s in shapes if s.colour not in used_colours]
        if not candidates:
            return None
        s = candidates[int(rng.integers(len(candidates)))]
        adjective = _COLOUR_BY_NAME[s.colour].adjective
        return _QA(
            qtype, f"{adjective}図形はどんな形ですか？", f"{adjective}{s.shape}です。", s.shape, s.colour
        )
    if qtype == "colour_at_position":
        s = shapes[int(rng.integers(len(shapes)))]
        # '右上に赤い図形があります。', not '右上は赤色です。': the colour follows the same token
        # (右上に) as in every caption, so answering reuses what captions teach; with its own
        # token (右上は) the reading was learned in one demo run and not in another (100% / 51%).
        answer = f"{s.position}に{_COLOUR_BY_NAME[s.colour].adjective}図形があります。"
        return _QA(qtype, f"{s.position}にある図形は何色ですか？", answer, s.colour)
    if qtype == "yes_no":
        present = {(s.colour, s.shape) for s in shapes}
        yes_pool = sorted(c for c in present if c[0] not in used_colours)
        no_pool = [
            (c.name, shape)
            for c in COLOURS
            for shape in SHAPES
            if (c.name, shape) not in present and c.name not in used_colours
        ]
        if target is None:
            # Only ask when both answers are possible, so dropping a question never tilts yes/no.
            if not yes_pool or not no_pool:
                return None
            yes = bool(rng.random() < 0.5)
        else:
            yes = bool(target)
        if not yes:
            # Half the 'no' questions are near misses (a colour or a shape that is in the image) so
            # the model must bind colour to shape; by symmetry every combination stays 50/50 yes/no.
            colours_in = {c for c, _ in present}
            shapes_in = {sh for _, sh in present}
            near = [(c, sh) for c, sh in no_pool if c in colours_in or sh in shapes_in]
            if near and rng.random() < 0.5:
                no_pool = near
        pool = yes_pool if yes else no_pool
        if not pool:
            return None
        colour, shape = pool[int(rng.integers(len(pool)))]
        question = f"{_COLOUR_BY_NAME[colour].adjective}{shape}はありますか？"
        return _QA(qtype, question, yes_no_answer(scene, colour, yes), "はい" if yes else "いいえ", colour)
    if qtype == "describe":
        text = caption(scene, int(rng.integers(CAPTION_VARIANTS)))
        return _QA(qtype, DESCRIBE_QUESTION, text, text)
    raise ConfigError(f"unknown question type {qtype!r}; choose from {', '.join(QUESTION_TYPES)}, describe")


def _conversation(scene: _Scene, rng: np.random.Generator, allow_describe: bool) -> list[_QA]:
    """1-3 turns about one scene, each of a different question type; a describe turn comes last.

    The question types are drawn before looking at the scene, so how often a type is asked does
    not depend on the scene and its answers stay balanced (count: as often "1つ" as "4つ").
    """
    n_turns = int(rng.integers(1, 4))
    describe = allow_describe and bool(rng.random() < _DESCRIBE_RATE)
    qtypes = [QUESTION_TYPES[int(k)] for k in rng.permutation(len(QUESTION_TYPES))[: n_turns - describe]]
    turns: list[_QA] = []
    used: set[str] = set()
    for qtype in qtypes:
        qa = _ask(qtype, scene, rng, frozenset(used))
        if qa is None:  # its colours are all taken by an earlier turn (see `_ask`)
            continue
        if qa.colour is not None:
            used.add(qa.colour)
        turns.append(qa)
    if describe:
        turns.append(_ask("describe", scene, rng))
    return turns


def _llava_conversation(turns: Sequence[_QA]) -> list[dict]:
    out = []
    for i, qa in enumerate(turns):
        prefix = IMAGE_TOKEN + "\n" if i == 0 else ""
        out.append({"from": "human", "value": prefix + qa.question})
        out.append({"from": "gpt", "value": qa.answer})
    return out


def _condition_on_target(
    scene: _Scene, qtype: str, target: str, rng: np.random.Generator
) -> tuple[_Scene, int]:
    """Give a random shape k the answer `target`; returns (edited scene, k) to ask about shape k.

    This draws from the scene distribution conditioned on the answer, so a test set stratified
    over answers has the same scenes as an unconditioned one, only exactly balanced.
    """
    shapes = list(scene.shapes)
    k = int(rng.integers(len(shapes)))
    if qtype == "shape_of_colour":
        shapes[k] = replace(shapes[k], shape=target)
    elif qtype == "colour_at_position":
        # Colours stay distinct: if another shape has the target colour, the two swap colours.
        for j, s in enumerate(shapes):
            if j != k and s.colour == target:
                shapes[j] = replace(s, colour=shapes[k].colour)
        shapes[k] = replace(shapes[k], colour=target)
    return replace(scene, shapes=tuple(shapes)), k


def _test_plan(seed: int, n_test: int) -> list[tuple[str, object]]:
    """(qtype, target answer) for each test item: question types in turn, answers balanced."""
    rng = np.random.default_rng([seed, _TEST_PLAN_STREAM])
    classes = {
        "count": list(range(1, MAX_SHAPES + 1)),
        "shape_of_colour": list(SHAPES),
        "colour_at_position": [c.name for c in COLOURS],
        "yes_no": [True, False],
    }
    targets = {}
    for q, cls in classes.items():
        n = len(range(QUESTION_TYPES.index(q), n_test, len(QUESTION_TYPES)))
        t = [cls[i % len(cls)] for i in range(n)]
        targets[q] = [t[int(i)] for i in rng.permutation(n)]
    plan = []
    for i in range(n_test):
        q = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        plan.append((q, targets[q][i // len(QUESTION_TYPES)]))
    return plan


def _test_question(scene: _Scene, qtype: str, target, rng: np.random.Generator) -> tuple[_Scene, _QA]:
    if qtype == "count":
        return scene, _ask(qtype, scene, rng)
    if qtype == "yes_no":
        return scene, _ask(qtype, scene, rng, target=target)
    scene, k = _condition_on_target(scene, qtype, target, rng)
    # Ask about shape k: a one-shape view of the scene makes `_ask` choose it.
    qa = _ask(qtype, replace(scene, shapes=(scene.shapes[k],)), rng)
    return scene, qa


# --------------------------------------------------------------------------- tokenizer


def _lexicon_pattern() -> str:
    """Regex alternation of the world's content words, longest first.

    Without it BPE merges across word boundaries by frequency: "黄色い星" became 黄色 + い星, so
    the shape 星 was a different token after each colour, and 左上 was split as 左 + 上に. Whole
    words give every colour, shape and position one token wherever it occurs. A position keeps
    its particle (左上に, 左上は: one token), so in "左上に赤い円" the token
    right before a colour names the grid cell it is read from: the tiny LLM then binds a word to
    an image token in one attention hop (see the answers in `_ask`).
    """
    words = {p + particle for p in POSITIONS for particle in ("", "に", "は", "の")}
    words |= {c.adjective for c in COLOURS} | set(SHAPES)
    return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train the world's tokenizer and wrap it as a transformers fast tokenizer.

    Char-level BPE with tokens of at most 3 characters (uncapped BPE merges whole answers into
    single tokens, which turns the task into classification), byte fallback (256 `<0xNN>` tokens
    on top of `vocab_size`) so any text encodes, no normalizer and a fuse decoder so decoding gives
    back the exact text. Special tokens: `<unk>`, `<pad>`, `<EOD|LLM-jp>` (eos), `<image>`.
    Chat templates: `llm-jp-v1` (default) and `plain`.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    # The world's words are pieces of their own (as a morphological pre-tokenizer would cut
    # them), and so are whitespace, digits and punctuation; BPE merges within the rest. Split
    # keeps every character, so decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(_lexicon_pattern() + r"|\s|\d|[、。，．？！：「」（）:,.!?()]"), behavior="isolated"
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # tokenizers stops one short of this (a value of 3 yields tokens of at most 2 characters).
        max_token_length=_MAX_TOKEN_CHARS + 1,
        show_progress=False,
        initial_alphabet=list("0123456789"),
    )
    specials = [*SPECIAL_TOKENS]

    def strip_specials(items: Iterable[str]):
        for text in items:
            for token in specials:
                text = text.replace(token, "\n")
            yield text

    tokenizer.train_from_iterator(strip_specials(texts), trainer)

    # BpeTrainer has no byte-fallback alphabet: insert <0x00>..<0xFF> right after the special
    # tokens (as llama-style tokenizers do) and renumber the rest; merges refer to strings.
    data = json.loads(tokenizer.to_str())
    learned = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    n_special = len(SPECIAL_TOKENS)
    if [t for t, _ in learned[:n_special]] != specials:
        raise RuntimeError("tokenizers placed the special tokens unexpectedly; cannot add byte tokens")
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in learned[n_special:]]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    tokenizer = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))

    chat_templates = {"default": templates.JINJA_TEMPLATES["llm-jp-v1"], **templates.JINJA_TEMPLATES}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=chat_templates,
        clean_up_tokenization_spaces=False,
    )


def _fixed_texts() -> list[str]:
    """Every word of the world, so the tokenizer covers even ones a small world never draws."""
    texts = [templates.LLM_JP_SYSTEM_PROMPT, templates.USER_ROLE_JA, templates.ASSISTANT_ROLE_JA]
    texts += [f" {templates.USER_ROLE_JA}: ", f" {templates.ASSISTANT_ROLE_JA}: ", "0123456789"]
    texts += [DESCRIBE_QUESTION, "図形はいくつありますか？"]
    texts += [f"{n}つです。" for n in range(10)] + [f"{p}にある図形は何色ですか？" for p in POSITIONS]
    for c in COLOURS:
        texts += [f"{c.adjective}図形はどんな形ですか？"]
        texts += [f"{p}に{c.adjective}図形があります。" for p in POSITIONS]
        for s in SHAPES:
            texts += [f"{c.adjective}{s}はありますか？", f"{c.adjective}{s}です。"]
            texts += [f"{c.adjective}{s}があります。", f"{c.adjective}{s}しかありません。"]
        texts += [f"{c.adjective}図形はありません。"]
    return texts


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class WorldInfo:
    """Where a generated world's files are, and the chance level of each question type."""

    root: Path
    seed: int
    image_size: int
    n_train: int
    n_test: int
    images: Path
    stage1: Path
    stage3: Path
    test: Path
    pretrain_text: Path
    tokenizer: Path
    chance: dict[str, float]
    test_chance: float  # mean chance over the test items: what guessing would score


def _write_json(path: Path, records: list[dict]) -> None:
    # A JSON list with one record a line: readable, diffable, and written by json's C encoder
    # (indent= would switch to the pure-Python one, 10x slower).
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


class _PngWriter:
    """Encodes PNGs on worker threads (PIL releases the GIL while compressing, the slow part)."""

    def __init__(self, workers: int = 2, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def save(self, image: Image.Image, path: Path) -> None:
        if len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        # Low compression: the noise makes PNGs barely compressible and level 1 is ~3x faster.
        self._pending.append(
            self._pool.submit(image.save, path, format="PNG", optimize=False, compress_level=1)
        )

    def close(self) -> None:
        while self._pending:
            self._pending.popleft().result()  # re-raises a failed write (disk full, permissions)
        self._pool.shutdown()


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give generate_world a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise ConfigError(
            f"{out} is not empty and holds no world.json; choose an empty or new directory "
            "(a world is only regenerated over an earlier world)"
        )
    # Regenerating over an earlier world: drop its images and tokenizer so nothing stale remains.
    for name in ("images", "tokenizer"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / "images").mkdir(parents=True, exist_ok=True)


def _train_split(
    out: Path, n: int, seed: int, image_size: int, writer: _PngWriter, bar: tqdm
) -> tuple[list[dict], list[dict]]:
    """Draw and save the training images; return their stage-1 and stage-3 records."""
    stage1, stage3 = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, _TRAIN_STREAM, i])
        scene = _sample_scene(rng, image_size)
        name = f"train_{i:06d}"
        writer.save(_render(scene, rng), out / "images" / f"{name}.png")
        scene_dict = scene.to_dict()
        image = f"images/{name}.png"
        describe = _ask("describe", scene, rng)
        stage1.append(
            {
                "id": name,
                "image": image,
                "conversations": _llava_conversation([describe]),
                "scene": scene_dict,
            }
        )
        turns = _conversation(scene, rng, allow_describe=True)
        stage3.append(
            {
                "id": name,
                "image": image,
                "conversations": _llava_conversation(turns),
                "qtypes": [t.qtype for t in turns],
                "scene": scene_dict,
            }
        )
        bar.update()
    return stage1, stage3


def _test_split(out: Path, n: int, seed: int, image_size: int, writer: _PngWriter, bar: tqdm) -> list[dict]:
    """Draw and save the held-out images (own random stream); one balanced question each."""
    test = []
    for i, (qtype, target) in enumerate(_test_plan(seed, n)):
        rng = np.random.default_rng([seed, _TEST_STREAM, i])
        scene = _sample_scene(rng, image_size, n_shapes=target if qtype == "count" else None)
        scene, qa = _test_question(scene, qtype, target, rng)
        name = f"test_{i:06d}"
        writer.save(_render(scene, rng), out / "images" / f"{name}.png")
        test.append(
            {
                "id": name,
                "image": f"images/{name}.png",
                "conversations": _llava_conversation([qa]),
                "qtype": qtype,
                "answer": qa.answer,
                "label": qa.label,
                "chance": CHANCE[qtype],
                "scene": scene.to_dict(),
            }
        )
        bar.update()
    return test


def _pretrain_texts(n: int, seed: int, image_size: int) -> list[str]:
    """Text-only lines about scenes that have no image: captions, and chats about a caption."""
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, _PRETRAIN_STREAM, i])
        scene = _sample_scene(rng, image_size)
        cap = caption(scene, int(rng.integers(4)))  # variants 0-3: they say where each shape is
        if i % 2 == 0:
            texts.append(cap)
            continue
        # The caption stands where a VLM's prompt holds <image>: the LLM learns to answer from a
        # description of the scene before stage 1 puts an image's tokens in its place.
        messages = []
        for j, qa in enumerate(_conversation(scene, rng, allow_describe=False)):
            question = f"{cap}\n{qa.question}" if j == 0 else qa.question
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": qa.answer}]
        texts.append(templates.render(messages, "llm-jp-v1", EOS_TOKEN))
    return texts


def generate_world(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 128,
    progress: bool = True,
    n_pretrain_text: int = 4000,
    vocab_size: int = 768,
) -> WorldInfo:
    """Write the synthetic world (images, stage1/stage3/test JSON, pretraining text, tokenizer).

    `image_size` is the side of the smallest (square) images; others are 1.25x square and 1.5:1 /
    1:1.5. Test images come from their own random stream and never repeat a training image.
    `n_pretrain_text` lines of text-only data (half captions, half chats about a captioned scene);
    `vocab_size` excludes the 256 byte-fallback tokens. Same arguments -> byte-identical files.
    """
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 0),
        ("n_pretrain_text", n_pretrain_text, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image_size must be an integer >= 32 (pixels), got {image_size!r}")
    out = Path(out_dir)
    _prepare_out_dir(out)
    start = time.perf_counter()

    bar = tqdm(total=n_train + n_test, desc="synthetic world", unit="img", disable=not progress)
    writer = _PngWriter()
    try:
        stage1, stage3 = _train_split(out, n_train, seed, image_size, writer, bar)
        test = _test_split(out, n_test, seed, image_size, writer, bar)
    finally:
        writer.close()
        bar.close()
    pretrain = _pretrain_texts(n_pretrain_text, seed, image_size)

    _write_json(out / _FILES["stage1"], stage1)
    _write_json(out / _FILES["stage3"], stage3)
    _write_json(out / _FILES["test"], test)
    with open(out / _FILES["pretrain_text"], "w", encoding="utf-8") as f:
        for text in pretrain:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    def world_texts():
        yield from _fixed_texts()
        yield from pretrain
        for record in (*stage1, *stage3, *test):
            conv = record["conversations"]
            yield templates.render(conv, "plain", EOS_TOKEN)
            yield templates.render(conv, "llm-jp-v1", EOS_TOKEN)

    tokenizer = train_tokenizer(world_texts(), vocab_size=vocab_size)
    tokenizer.save_pretrained(out / _FILES["tokenizer"])

    test_chance = float(np.mean([r["chance"] for r in test])) if test else 0.0
    world = {
        "version": _VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "n_pretrain_text": n_pretrain_text,
        "image_sizes": sorted({(round(image_size * w), round(image_size * h)) for w, h in _ASPECTS}),
        "files": dict(_FILES),
        "positions": list(POSITIONS),
        "colours": [c.name for c in COLOURS],
        "shapes": list(SHAPES),
        "question_types": list(QUESTION_TYPES),
        "chance": dict(CHANCE),
        "test_chance": test_chance,
        "test_counts": {q: sum(r["qtype"] == q for r in test) for q in QUESTION_TYPES},
        "vocab_size": len(tokenizer),
    }
    (out / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "synthetic world: %d train + %d test images, %d text lines, vocab %d, test chance %.3f -> %s (%.1f s)",
        n_train,
        n_test,
        n_pretrain_text,
        len(tokenizer),
        test_chance,
        out,
        time.perf_counter() - start,
    )
    return load_world_info(out)


def load_world_info(world_dir: str | Path) -> WorldInfo:
    """Read `world.json` of a generated world; DataError if it is missing, malformed or incomplete."""
    root = Path(world_dir)
    path = root / "world.json"
    if not path.is_file():
        raise DataError(f"{path} not found: generate the synthetic world there first (generate_world)")
    try:
        world = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}; regenerate the world") from e
    required = ("seed", "image_size", "n_train", "n_test", "files", "chance", "test_chance")
    missing = [k for k in required if k not in world]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; regenerate the world")
    files = world["files"]
    paths = {}
    for key in _FILES:
        if key not in files:
            raise DataError(f"{path}: files.{key} is missing; regenerate the world")
        paths[key] = root / files[key]
        if not paths[key].exists():
            raise DataError(f"{paths[key]} listed in {path} does not exist; regenerate the world")
    return WorldInfo(
        root=root,
        seed=int(world["seed"]),
        image_size=int(world["image_size"]),
        n_train=int(world["n_train"]),
        n_test=int(world["n_test"]),
        chance={k: float(v) for k, v in world["chance"].items()},
        test_chance=float(world["test_chance"]),
        **paths,
    )
