"""The synthetic world on disk: the demo's stand-in for real datasets and weights.

`generate_world(out_dir, n_train, n_test, seed)` draws scenes (`scenes`), asks about them
(`language`) and writes everything the training stages and the held-out evaluation need::

    images/train_000000.png ...  images/test_000000.png ...
    stage1.json          LLaVA captions: "<image>\\n画像を説明してください。" -> "画像には左上に赤い円、右下に青い四角があります。"
    stage3.json          LLaVA instructions, 1-3 turns per image (count / shape_of_colour /
                         colour_at_position / yes_no, and some describe turns answered by the caption)
    test.json            held-out images, one question each, with "qtype", "answer" and "chance"
    pretrain_text.jsonl  {"text": ...} lines to pretrain the tiny LLM on the world's Japanese:
                         captions, and chats whose scene is given as a caption instead of an image
    tokenizer/           the world's tokenizer (`tokenizer.train_tokenizer`)
    world.json           seed, counts, files, question types and the chance level of each

Everything is a pure function of the seed, so two runs write byte-identical files. Records carry
the drawn scene under "scene" so tests (and curious users) can re-derive every answer.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..io import jsonl_text, write_json_atomic
from ..model import templates
from .language import (
    CHANCE,
    QUESTION_TYPES,
    ask,
    caption,
    conversation,
    held_out_plan,
    held_out_question,
    llava_conversation,
)
from .scenes import (
    ASPECTS,
    COLOURS,
    POSITIONS,
    PRETRAIN_STREAM,
    SHAPES,
    TEST_STREAM,
    TRAIN_STREAM,
    render,
    sample_scene,
)
from .tokenizer import EOS_TOKEN, train_tokenizer, world_vocabulary_texts

logger = logging.getLogger(__name__)

__all__ = ["WorldInfo", "generate_world", "load_world_info"]

_VERSION = 4
_CHUNK = 250  # images per job of the drawing processes
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


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


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


def _save_png(image: Image.Image, path: Path) -> None:
    # Low compression: the noise makes PNGs barely compressible and level 1 is ~3x faster.
    image.save(path, format="PNG", optimize=False, compress_level=1)


def _train_chunk(
    out: Path, seed: int, image_size: int, start: int, stop: int
) -> tuple[list[dict], list[dict]]:
    """Draw and save training images start..stop-1; return their stage-1 and stage-3 records."""
    stage1, stage3 = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, TRAIN_STREAM, i])
        scene = sample_scene(rng, image_size)
        name = f"train_{i:06d}"
        _save_png(render(scene, rng), out / "images" / f"{name}.png")
        scene_dict = scene.to_dict()
        image = f"images/{name}.png"
        describe = ask("describe", scene, rng)
        stage1.append(
            {
                "id": name,
                "image": image,
                "conversations": llava_conversation([describe]),
                "scene": scene_dict,
            }
        )
        turns = conversation(scene, rng, allow_describe=True)
        stage3.append(
            {
                "id": name,
                "image": image,
                "conversations": llava_conversation(turns),
                "qtypes": [t.qtype for t in turns],
                "scene": scene_dict,
            }
        )
    return stage1, stage3


def _test_chunk(out: Path, seed: int, image_size: int, plan: list[tuple[int, str, object]]) -> list[dict]:
    """Draw and save the held-out images of `plan` ((index, qtype, target) each); one question each."""
    test = []
    for i, qtype, target in plan:
        rng = np.random.default_rng([seed, TEST_STREAM, i])
        scene = sample_scene(rng, image_size, n_shapes=target if qtype == "count" else None)
        scene, qa = held_out_question(scene, qtype, target, rng)
        name = f"test_{i:06d}"
        _save_png(render(scene, rng), out / "images" / f"{name}.png")
        test.append(
            {
                "id": name,
                "image": f"images/{name}.png",
                "conversations": llava_conversation([qa]),
                "qtype": qtype,
                "answer": qa.answer,
                "label": qa.label,
                "chance": CHANCE[qtype],
                "scene": scene.to_dict(),
            }
        )
    return test


def _image_pool(workers: int) -> Executor:
    """Processes that draw and save images (forked: they inherit this module, no imports to wait
    for); threads where fork is not available."""
    if "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(max_workers=workers)


def _draw_images(
    out: Path, n_train: int, n_test: int, seed: int, image_size: int, bar: tqdm, workers: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """Both splits' images, drawn and saved in chunks by `workers` processes; returns their records
    (stage1, stage3, test) in index order. Each image has its own random stream, so the files do
    not depend on how the work is split."""
    plan = [(i, q, t) for i, (q, t) in enumerate(held_out_plan(seed, n_test))]
    jobs = [
        (_train_chunk, (out, seed, image_size, a, min(a + _CHUNK, n_train)))
        for a in range(0, n_train, _CHUNK)
    ]
    jobs += [(_test_chunk, (out, seed, image_size, plan[a : a + _CHUNK])) for a in range(0, n_test, _CHUNK)]
    sizes = [min(_CHUNK, n_train - a) for a in range(0, n_train, _CHUNK)]
    sizes += [min(_CHUNK, n_test - a) for a in range(0, n_test, _CHUNK)]
    if workers <= 1:
        results = []
        for (fn, args), size in zip(jobs, sizes):
            results.append(fn(*args))
            bar.update(size)
    else:
        with _image_pool(workers) as pool:
            futures = [pool.submit(fn, *args) for fn, args in jobs]
            done_sizes = dict(zip(futures, sizes))
            for future in as_completed(futures):
                future.result()  # re-raises a failed chunk (disk full, permissions) at once
                bar.update(done_sizes[future])
            results = [f.result() for f in futures]
    n_train_jobs = len(range(0, n_train, _CHUNK))
    stage1 = [r for part in results[:n_train_jobs] for r in part[0]]
    stage3 = [r for part in results[:n_train_jobs] for r in part[1]]
    test = [r for part in results[n_train_jobs:] for r in part]
    return stage1, stage3, test


def _pretrain_texts(n: int, seed: int, image_size: int) -> list[str]:
    """Text-only lines about scenes that have no image: captions, and chats about a caption."""
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, PRETRAIN_STREAM, i])
        scene = sample_scene(rng, image_size)
        cap = caption(scene, int(rng.integers(4)))  # variants 0-3: they say where each shape is
        if i % 2 == 0:
            texts.append(cap)
            continue
        # The caption stands where a VLM's prompt holds <image>: the LLM learns to answer from a
        # description of the scene before stage 1 puts an image's tokens in its place.
        messages = []
        for j, qa in enumerate(conversation(scene, rng, allow_describe=False)):
            question = f"{cap}\n{qa.question}" if j == 0 else qa.question
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": qa.answer}]
        texts.append(templates.render(messages, "llm-jp-v1", EOS_TOKEN))
    return texts


def _check_arguments(n_train: int, n_test: int, n_pretrain_text: int, image_size: int) -> None:
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 0),
        ("n_pretrain_text", n_pretrain_text, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image_size must be an integer >= 32 (pixels), got {image_size!r}")


def _world_summary(seed: int, image_size: int, n_train: int, n_pretrain_text: int, test: list[dict]) -> dict:
    """The contents of world.json (without vocab_size, which the tokenizer adds)."""
    return {
        "version": _VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": len(test),
        "n_pretrain_text": n_pretrain_text,
        "image_sizes": sorted({(round(image_size * w), round(image_size * h)) for w, h in ASPECTS}),
        "files": dict(_FILES),
        "positions": list(POSITIONS),
        "colours": [c.name for c in COLOURS],
        "shapes": list(SHAPES),
        "question_types": list(QUESTION_TYPES),
        "chance": dict(CHANCE),
        "test_chance": float(np.mean([r["chance"] for r in test])) if test else 0.0,
        "test_counts": {q: sum(r["qtype"] == q for r in test) for q in QUESTION_TYPES},
    }


def generate_world(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 128,
    progress: bool = True,
    n_pretrain_text: int = 4000,
    vocab_size: int = 768,
    workers: int | None = None,
) -> WorldInfo:
    """Write the synthetic world (images, stage1/stage3/test JSON, pretraining text, tokenizer).

    `image_size` is the side of the smallest (square) images; others are 1.25x square and 1.5:1 /
    1:1.5. Test images come from their own random stream and never repeat a training image.
    `n_pretrain_text` lines of text-only data (half captions, half chats about a captioned scene);
    `vocab_size` excludes the 256 byte-fallback tokens. `workers` processes draw the images (default:
    one per available core, at most 4). Same arguments -> byte-identical files, whatever `workers`.
    """
    _check_arguments(n_train, n_test, n_pretrain_text, image_size)
    if workers is None:
        workers = min(4, _available_cores())
    out = Path(out_dir)
    _prepare_out_dir(out)
    start = time.perf_counter()

    bar = tqdm(total=n_train + n_test, desc="synthetic world", unit="img", disable=not progress)
    try:
        stage1, stage3, test = _draw_images(out, n_train, n_test, seed, image_size, bar, workers)
    finally:
        bar.close()
    pretrain = _pretrain_texts(n_pretrain_text, seed, image_size)

    _write_json(out / _FILES["stage1"], stage1)
    _write_json(out / _FILES["stage3"], stage3)
    _write_json(out / _FILES["test"], test)
    (out / _FILES["pretrain_text"]).write_text(jsonl_text({"text": t} for t in pretrain), encoding="utf-8")

    def world_texts():
        yield from world_vocabulary_texts()
        yield from pretrain
        for record in (*stage1, *stage3, *test):
            conv = record["conversations"]
            yield templates.render(conv, "plain", EOS_TOKEN)
            yield templates.render(conv, "llm-jp-v1", EOS_TOKEN)

    tokenizer = train_tokenizer(world_texts(), vocab_size=vocab_size)
    tokenizer.save_pretrained(out / _FILES["tokenizer"])

    world = {**_world_summary(seed, image_size, n_train, n_pretrain_text, test), "vocab_size": len(tokenizer)}
    write_json_atomic(out / "world.json", world)  # written last, after every file it lists
    logger.info(
        "synthetic world: %d train + %d test images, %d text lines, vocab %d, test chance %.3f -> %s (%.1f s)",
        n_train,
        n_test,
        n_pretrain_text,
        len(tokenizer),
        world["test_chance"],
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
