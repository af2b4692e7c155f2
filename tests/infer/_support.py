"""Helpers of the inference tests: the tiny model, image payloads, server subprocesses, a model hook."""

from __future__ import annotations

import base64
import copy
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from convllava_jp.infer.generation import GenerationRequest

SRC = Path(__file__).resolve().parents[2] / "src"
API_KEY = "test-key"
MODEL_NAME = "tiny-test"
CONTEXT = 4096


def build_tiny_model(out_dir: Path) -> Path:
    """Write a random `tiny` ConvLLaVA-JP model directory (seeded, 128 px, 4 image tokens)."""
    from transformers import AutoConfig

    from convllava_jp.demo.tokenizer import train_tokenizer
    from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, get_preset
    from convllava_jp.model.image_processing import ConvLlavaImageProcessor
    from convllava_jp.model.model_dir import save_model_dir
    from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token
    from convllava_jp.model.templates import LLM_JP_SYSTEM_PROMPT

    texts = [
        LLM_JP_SYSTEM_PROMPT,
        "ユーザー: 画像を説明してください。 システム: 左上に赤い円、右下に青い四角があります。",
        "何色ですか？ 円はいくつありますか？ はい、あります。いいえ、ありません。",
    ] * 8
    tokenizer = train_tokenizer(texts, vocab_size=320)
    image_token_id = add_image_token(tokenizer)
    preset = get_preset("tiny")
    text = {**preset.text, "vocab_size": len(tokenizer), "n_positions": CONTEXT}
    config = build_config(preset, text_config=AutoConfig.for_model(**text), image_token_id=image_token_id)
    torch.manual_seed(0)
    model = ConvLlavaForConditionalGeneration(config).eval()
    # A zero EOS row gives EOS logit 0, below the largest of the ~360 random logits at every step:
    # greedy answers always run to max_tokens, so one long request keeps a server busy for seconds.
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
    processor = ConvLlavaProcessor(ConvLlavaImageProcessor(image_size=128, mode="pad"), tokenizer)
    return save_model_dir(model, processor, out_dir)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_bytes(size: tuple[int, int], colour=(120, 60, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1"
    )
    return env


def command(*args: str) -> list[str]:
    """argv running one of the infer subcommands in a fresh interpreter."""
    return [sys.executable, "-m", "convllava_jp.cli", *args]


class RunningServer:
    """A server subprocess on a loopback port; `url` is its base URL.

    Launched at construction; `wait_ready()` blocks until /health answers (so several servers
    can boot in parallel while other tests run).
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._ready = False
        self.proc = subprocess.Popen(
            command(*args, "--port", str(self.port), "--num-threads", "1", "--device", "cpu"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**subprocess_env(), **(env or {})},
        )

    def wait_ready(self, timeout: float = 120.0) -> RunningServer:
        deadline = time.monotonic() + timeout
        while not self._ready and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self._ready = httpx.get(self.url + "/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.1)
        if not self._ready:
            raise RuntimeError(f"server not ready within {timeout} s:\n{self.log()}")
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def health(self) -> dict:
        response = httpx.get(self.url + "/health", timeout=5.0)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


class HookedModel:
    """Delegates to the model; `hook(kwargs)` runs before each call (it may block or raise)."""

    def __init__(self, model, hook):
        self._model = model
        self._hook = hook

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        self._hook(kwargs)
        return self._model(**kwargs)


def hooked(pipeline, hook):
    pipe = copy.copy(pipeline)
    pipe.model = HookedModel(pipeline.model, hook)
    pipe.lock = threading.Lock()
    return pipe


def encode(pipeline, images, questions):
    return [
        pipeline.encode(GenerationRequest(pipeline.question_messages(q, 1), [images[i % len(images)]]))
        for i, q in enumerate(questions)
    ]


def is_prefill(kwargs) -> bool:
    return kwargs.get("cache") is None
