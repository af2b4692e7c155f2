"""Fixtures for the inference tests: a tiny random model directory, images, running servers.

The model is the `tiny` preset with random weights (seeded): answers are gibberish, but greedy
decoding makes them deterministic, which is all these tests compare. Its context is widened to
4096 positions and its EOS row zeroed (greedy never stops early), so that one long answer keeps
the server busy for seconds (queue-full, timeout).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from ._support import API_KEY, MODEL_NAME, RunningServer, build_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    # The tiny model's ops are microseconds long; on a shared 2-core machine a second intra-op
    # thread only adds spin-waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("infer") / MODEL_NAME)


@pytest.fixture(scope="session")
def pipeline(model_dir):
    from convllava_jp.infer.generation import VLMPipeline

    return VLMPipeline.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Four small PNGs of different sizes and colours."""
    root = tmp_path_factory.mktemp("images")
    specs = [
        ((96, 64), (220, 30, 30)),
        ((64, 128), (30, 80, 220)),
        ((150, 150), (30, 150, 50)),
        ((200, 90), (235, 190, 10)),
    ]
    for i, (size, colour) in enumerate(specs):
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        image.save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="session")
def images(image_dir) -> list[Path]:
    return sorted(image_dir.glob("img*.png"))


def _server_args(name: str, model_dir: Path, image_dir: Path) -> list[str]:
    model = ["--model", str(model_dir), "--model-name", MODEL_NAME]
    if name == "server":  # an API key, small limits, local files allowed under the image folder
        return [
            "serve",
            *model,
            *("--api-key", API_KEY, "--max-images", "2", "--max-image-pixels", "1000000"),
            *("--max-body-mb", "1", "--max-batch-size", "8", "--batch-wait-ms", "30"),
            *("--allow-local-files", str(image_dir)),
        ]
    if name == "busy_server":  # one slot, no queue, a 2 s timeout: 503, disconnects, timeouts
        return ["serve", *model, "--max-batch-size", "1", "--max-queue", "0", "--request-timeout", "2"]
    return ["webui", *model]


@pytest.fixture(scope="session", autouse=True)
def _servers(request, model_dir, image_dir, tmp_path_factory) -> Iterator[dict[str, RunningServer]]:
    """Launch the servers the collected tests use, all at once at the start of the session."""
    wanted = {"server", "busy_server", "webui"} & {
        name for item in request.session.items for name in getattr(item, "fixturenames", ())
    }
    if "webui" in wanted and importlib.util.find_spec("gradio") is None:
        wanted.discard("webui")
    logs = tmp_path_factory.mktemp("logs")
    # the web UI takes its key from the environment (what `serve` reads too); the page asks for it
    envs = {"webui": {"CONVLLAVA_API_KEY": API_KEY}}
    servers = {
        name: RunningServer(_server_args(name, model_dir, image_dir), logs / f"{name}.log", envs.get(name))
        for name in sorted(wanted)
    }
    yield servers
    for srv in servers.values():
        srv.stop()


@pytest.fixture(scope="session")
def server(_servers) -> RunningServer:
    return _servers["server"].wait_ready()


@pytest.fixture(scope="session")
def busy_server(_servers) -> RunningServer:
    return _servers["busy_server"].wait_ready()


@pytest.fixture(scope="session")
def webui(_servers) -> RunningServer:
    """`webui` (gradio page at /, the API under /v1)."""
    if "webui" not in _servers:
        pytest.skip("the web UI tests need gradio (extra 'webui')")
    return _servers["webui"].wait_ready()
