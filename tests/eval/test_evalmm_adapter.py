"""The eval-mm adapter: loaded the way eval-mm's CLI loads adapters, against a stand-in `BaseVLM`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from convllava_jp.eval.evalmm_adapter import adapter_dir, to_generation_config, to_prompt

STAND_IN = """
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class GenerationConfig:  # eval-mm's fields and defaults
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    do_sample: bool = False
    use_cache: bool = True


class BaseVLM(ABC):
    @abstractmethod
    def __init__(self): ...

    @abstractmethod
    def generate(self, images, text, gen_kwargs=GenerationConfig()): ...

    @abstractmethod
    def batch_generate(self, images_list, text_list, gen_kwargs=GenerationConfig()): ...
"""

DRIVER = """
import importlib, json, sys
from PIL import Image
sys.path.insert(0, sys.argv[1])  # what eval-mm's --adapter_dir does
from eval_mm.models.base_vlm import BaseVLM, GenerationConfig
model_table = importlib.import_module("model_table")
model = model_table.get_class_from_model_id(sys.argv[2])(sys.argv[2])
assert isinstance(model, BaseVLM)
img = Image.new("RGB", (40, 30), (200, 30, 30))
cfg = GenerationConfig(max_new_tokens=5)
one = model.generate([img], "この画像は何色ですか？", cfg)
many = model.batch_generate([[img], [img, img]], ["この画像は何色ですか？", "<image>と<image>の違いは？"], cfg)
from convllava_jp.infer.generation import GenerationConfig as G, GenerationRequest, VLMPipeline
pipe = VLMPipeline.from_pretrained(sys.argv[2], device="cpu")
ref = pipe.generate([GenerationRequest([{"role": "user", "content": "<image>\\nこの画像は何色ですか？"}], [img])],
                    G(max_new_tokens=5))[0].text
print(json.dumps({"one": one, "many": many, "ref": ref}, ensure_ascii=False))
"""


def test_adapter_runs_a_tiny_model_through_the_stand_in_base_class(tmp_path, tiny_model_dir):
    pkg = tmp_path / "stand_in" / "eval_mm" / "models"
    pkg.mkdir(parents=True)
    for d in (pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "base_vlm.py").write_text(textwrap.dedent(STAND_IN))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'stand_in'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CONVLLAVA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, adapter_dir(), str(tiny_model_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["one"] == out["ref"] == out["many"][0]  # eval-mm's text, re-laid as trained; batching agrees
    assert len(out["many"]) == 2 and isinstance(out["many"][1], str)


def test_prompt_layout_and_generation_settings():
    assert to_prompt("何色？", 1) == "<image>\n何色？"
    assert (
        to_prompt("<image>と<image>の違いは？", 2) == "<image>と<image>の違いは？"
    )  # tags kept when they match
    assert to_prompt("<image>図を見て", 2) == "<image>\n<image>\n図を見て"
    assert to_prompt("こんにちは", 0) == "こんにちは"
    greedy = to_generation_config({"max_new_tokens": 7, "temperature": 0.7, "do_sample": False})
    assert (greedy.max_new_tokens, greedy.temperature) == (7, 0.0)
    sampled = to_generation_config({"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "do_sample": True})
    assert (sampled.temperature, sampled.top_p) == (0.7, 0.9)
    assert to_generation_config(None).max_new_tokens == 1024
    assert Path(adapter_dir(), "model_table.py").is_file()
