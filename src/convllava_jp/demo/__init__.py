"""The synthetic demo: a small world of coloured shapes with Japanese captions and questions,
trained through the real pipeline on CPU and scored on held-out images (`convllava-jp demo`).

scenes.py draws and renders scenes; language.py writes their captions, questions and answers;
tokenizer.py trains the world's tokenizer; world.py writes the world to disk; vision_pretrain.py
is the tiny tower's CLIP stand-in; evaluate.py scores a model on the held-out split; run.py runs
it all. Exports load lazily, so importing one module does not import torch or the trainer.
"""

from __future__ import annotations

import importlib

# The demo's defaults, shared by `run_demo` and the CLI (which reads them here, at parse time,
# without importing torch): world size and the vision tower's pretraining steps.
DEMO_TRAIN_IMAGES = 6000
DEMO_TEST_IMAGES = 400
DEMO_VISION_STEPS = 1300

_EXPORTS = {
    "WorldInfo": "world",
    "generate_world": "world",
    "load_world_info": "world",
    "draw_scenes": "scenes",
    "caption": "language",
    "train_tokenizer": "tokenizer",
    "pretrain_vision_on_world": "vision_pretrain",
    "evaluate_synthetic": "evaluate",
    "score_synthetic": "evaluate",
    "run_demo": "run",
    "print_demo_table": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
