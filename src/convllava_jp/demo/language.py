"""The synthetic world's Japanese: captions, questions and answers about a scene.

Every answer depends on the image only: the question names a colour, a position or a combination
whose answer is drawn independently of it, classes are balanced, and within one conversation no
earlier turn gives a later answer away. The phrasings are chosen so a tiny LLM can learn them;
docs/training.md ("What decides whether the tiny model learns") has the measurements behind them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from ..errors import ConfigError
from ..model import templates
from .scenes import COLOUR_BY_NAME, COLOURS, MAX_SHAPES, SHAPES, TEST_PLAN_STREAM, Scene, shape_dicts

QUESTION_TYPES = ("count", "shape_of_colour", "colour_at_position", "yes_no")
DESCRIBE_QUESTION = "画像を説明してください。"
CAPTION_VARIANTS = 5
_DESCRIBE_RATE = 0.25  # share of stage-3 conversations that end with a describe turn

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


def caption(scene: Scene | dict, variant: int = 0) -> str:
    """A scene (a record's "scene" dict) in one Japanese sentence.

    `variant` picks the phrasing. 0-3 name the shapes by position: 0
    '画像には左上に赤い円、右下に青い四角があります。', 1 '画像には左上に赤い円があり、右下に…',
    2 '図形は2つで、左上に赤い円、右下に…', 3 '図形は2つで、左上に赤い円があり、右下に…'. 4 names them
    by colour, in the colours' fixed order, without positions: '画像には赤い円と青い四角があります。'.
    In 0-3 a colour follows its position word, which teaches the LLM which image token a position
    names; in 4 a shape follows its colour word, which teaches it to find the token of a colour.

    Every caption opens with a fixed phrase, never with a word read off the image, so the only
    answers that open with a position or a colour word are the ones that restate the question.
    0-3 list the shapes in an order fixed by their colours and shapes (a hash, so the same scene
    always reads the same), not in grid order, which a model can follow instead of the image.
    """
    if variant not in range(CAPTION_VARIANTS):
        raise ConfigError(f"caption variant must be one of 0-{CAPTION_VARIANTS - 1}, got {variant!r}")
    shapes = shape_dicts(scene)
    if variant == 4:
        by_colour = sorted(shapes, key=lambda s: list(COLOUR_BY_NAME).index(s["colour"]))
        return (
            "画像には"
            + "と".join(f"{COLOUR_BY_NAME[s['colour']].adjective}{s['shape']}" for s in by_colour)
            + "があります。"
        )
    listed = sorted(shapes, key=lambda s: zlib.crc32(f"{variant}{s['colour']}{s['shape']}".encode()))
    parts = [f"{s['position']}に{COLOUR_BY_NAME[s['colour']].adjective}{s['shape']}" for s in listed]
    opening = "画像には" if variant < 2 else f"図形は{len(parts)}つで、"
    joiner = "、" if variant % 2 == 0 else "があり、"
    return opening + joiner.join(parts) + "があります。"


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str
    label: str  # the class: "3", "円", "赤", "はい"/"いいえ"; the caption for describe
    colour: str | None = None  # the colour the question names, to keep later turns from leaking


def yes_no_answer(scene: Scene | dict, colour: str, yes: bool) -> str:
    """The answer to '赤い円はありますか？', naming the shape the image has in that colour.

    '赤い円があります。' (yes), '赤い三角しかありません。' (no: the colour has another shape),
    '赤い図形はありません。' (no: no shape of that colour). The shape after the colour is always
    the one read off the image, as in captions and shape_of_colour answers, and the verdict is
    the very next token (が / しか), where the shape just read can be compared with the asked
    one: a verdict up front ('はい、あります。') would need the reading and the comparison in one
    token.
    """
    shapes = shape_dicts(scene)
    adjective = COLOUR_BY_NAME[colour].adjective
    found = [s["shape"] for s in shapes if s["colour"] == colour]
    if yes:
        if not found:
            raise ConfigError(f"no {colour} shape in the scene: the answer cannot be yes")
        return f"{adjective}{found[0]}があります。"
    if not found:
        return f"{adjective}図形はありません。"
    return f"{adjective}{found[0]}しかありません。"


def _ask_yes_no(
    scene: Scene, rng: np.random.Generator, used_colours: frozenset[str], target: bool | None
) -> QA | None:
    shapes = scene.shapes
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
    question = f"{COLOUR_BY_NAME[colour].adjective}{shape}はありますか？"
    return QA("yes_no", question, yes_no_answer(scene, colour, yes), "はい" if yes else "いいえ", colour)


def ask(
    qtype: str,
    scene: Scene,
    rng: np.random.Generator,
    used_colours: frozenset[str] = frozenset(),
    target: int | str | bool | None = None,
) -> QA | None:
    """One question about `scene`; None when none fits (all candidate colours already used).

    `used_colours`: colours an earlier turn asked about with shape_of_colour or yes_no; asking
    about them again could be answered from that turn instead of the image.

    Answers restate what the question names right before the word read off the image
    ('左上に赤い図形があります。', '赤い円です。'), as a Japanese answer often does. For a small LLM this
    splits the lookup in two steps it learns fast: copy the named word from the question, then
    read the image token that word points at.
    """
    shapes = scene.shapes
    if qtype == "count":
        n = len(shapes)
        return QA(qtype, "図形はいくつありますか？", f"{n}つです。", str(n))
    if qtype == "shape_of_colour":
        candidates = [s for s in shapes if s.colour not in used_colours]
        if not candidates:
            return None
        s = candidates[int(rng.integers(len(candidates)))]
        adjective = COLOUR_BY_NAME[s.colour].adjective
        return QA(
            qtype, f"{adjective}図形はどんな形ですか？", f"{adjective}{s.shape}です。", s.shape, s.colour
        )
    if qtype == "colour_at_position":
        s = shapes[int(rng.integers(len(shapes)))]
        # '右上に赤い図形があります。', not '右上は赤色です。': the colour follows the same token
        # (右上に) as in every caption, so answering reuses what captions teach.
        answer = f"{s.position}に{COLOUR_BY_NAME[s.colour].adjective}図形があります。"
        return QA(qtype, f"{s.position}にある図形は何色ですか？", answer, s.colour)
    if qtype == "yes_no":
        return _ask_yes_no(scene, rng, used_colours, target)
    if qtype == "describe":
        text = caption(scene, int(rng.integers(CAPTION_VARIANTS)))
        return QA(qtype, DESCRIBE_QUESTION, text, text)
    raise ConfigError(f"unknown question type {qtype!r}; choose from {', '.join(QUESTION_TYPES)}, describe")


def conversation(scene: Scene, rng: np.random.Generator, allow_describe: bool) -> list[QA]:
    """1-3 turns about one scene, each of a different question type; a describe turn comes last.

    The question types are drawn before looking at the scene, so how often a type is asked does
    not depend on the scene and its answers stay balanced (count: as often "1つ" as "4つ").
    """
    n_turns = int(rng.integers(1, 4))
    describe = allow_describe and bool(rng.random() < _DESCRIBE_RATE)
    qtypes = [QUESTION_TYPES[int(k)] for k in rng.permutation(len(QUESTION_TYPES))[: n_turns - describe]]
    turns: list[QA] = []
    used: set[str] = set()
    for qtype in qtypes:
        qa = ask(qtype, scene, rng, frozenset(used))
        if qa is None:  # its colours are all taken by an earlier turn (see `ask`)
            continue
        if qa.colour is not None:
            used.add(qa.colour)
        turns.append(qa)
    if describe:
        turns.append(ask("describe", scene, rng))
    return turns


def llava_conversation(turns: Sequence[QA]) -> list[dict]:
    """The turns as LLaVA records' "conversations", the image placeholder before the first question."""
    out = []
    for i, qa in enumerate(turns):
        prefix = templates.IMAGE_TOKEN + "\n" if i == 0 else ""
        out.append({"from": "human", "value": prefix + qa.question})
        out.append({"from": "gpt", "value": qa.answer})
    return out


def _condition_on_target(
    scene: Scene, qtype: str, target: str, rng: np.random.Generator
) -> tuple[Scene, int]:
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


def held_out_plan(seed: int, n_test: int) -> list[tuple[str, object]]:
    """(qtype, target answer) for each test item: question types in turn, answers balanced."""
    rng = np.random.default_rng([seed, TEST_PLAN_STREAM])
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


def held_out_question(scene: Scene, qtype: str, target, rng: np.random.Generator) -> tuple[Scene, QA]:
    """The scene edited to have answer `target` (where the question type allows), and the question."""
    if qtype == "count":
        return scene, ask(qtype, scene, rng)
    if qtype == "yes_no":
        return scene, ask(qtype, scene, rng, target=target)
    scene, k = _condition_on_target(scene, qtype, target, rng)
    # Ask about shape k: a one-shape view of the scene makes `ask` choose it.
    qa = ask(qtype, replace(scene, shapes=(scene.shapes[k],)), rng)
    return scene, qa
