"""The server app in process (fastapi's TestClient): what cannot be provoked from outside a real
server: a model that raises, a full house of requests being prepared, oversized text."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import threading

import pytest
from fastapi.testclient import TestClient

from convllava_jp.infer.batching import ContinuousBatcher
from convllava_jp.infer.server import ServerConfig, create_app

from ._support import MODEL_NAME

SECRET = "CUDA out of memory. Tried to allocate 12.34 GiB (secret detail)"


class RaisingModel:
    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        raise RuntimeError(SECRET)


def body(content="何色ですか？", **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def app_for(pipeline, **config) -> tuple[TestClient, ContinuousBatcher]:
    batcher = ContinuousBatcher(pipeline, max_batch_size=2, max_queue=1, batch_wait_s=0)
    app = create_app(batcher, ServerConfig(model_name=MODEL_NAME, **config))
    return TestClient(app), batcher


def test_a_5xx_says_internal_error_and_an_id_the_detail_goes_to_the_log(pipeline, caplog):
    broken = copy.copy(pipeline)
    broken.model = RaisingModel(pipeline.model)
    broken.lock = threading.Lock()
    client, _ = app_for(broken)
    with client, caplog.at_level(logging.ERROR):
        response = client.post("/v1/chat/completions", json=body())
        assert response.status_code == 500
        error = response.json()["error"]
        match = re.fullmatch(r"internal error \(id ([0-9a-f]+)\)", error["message"])
        assert match and error["type"] == "server_error", error
        assert "secret" not in response.text and "CUDA" not in response.text
        assert any(match.group(1) in r.getMessage() and "secret" in r.getMessage() for r in caplog.records)

        with client.stream("POST", "/v1/chat/completions", json=body(stream=True)) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        errors = [json.loads(line[6:])["error"] for line in lines[:-1] if '"error"' in line]
        assert len(errors) == 1 and errors[0]["message"].startswith("internal error (id ")
        assert all("secret" not in line for line in lines)


def test_text_longer_than_the_context_is_refused_before_tokenizing(pipeline):
    client, _ = app_for(pipeline)
    handler = client.app.state.handler
    calls = []
    handler.pipeline = copy.copy(pipeline)
    handler.pipeline.encode = lambda request: calls.append(request)  # must not be reached
    with client:
        response = client.post("/v1/chat/completions", json=body("あ" * (handler.max_text_chars + 1)))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_a_full_house_is_refused_before_the_body_is_read(pipeline):
    client, batcher = app_for(pipeline)
    handler = client.app.state.handler
    prepared = []
    real_prepare = handler.prepare
    handler.prepare = lambda raw: prepared.append(raw) or real_prepare(raw)
    with client:
        handler.preparing = batcher.capacity  # every place promised to requests being prepared
        response = client.post("/v1/chat/completions", json=body())
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_busy"
        assert response.headers["retry-after"] == "1"
        assert prepared == []
        handler.preparing = 0
        assert client.post("/v1/chat/completions", json=body()).status_code == 200
    assert len(prepared) == 1


def test_at_most_max_preparing_requests_are_prepared_at_once(pipeline):
    client, batcher = app_for(pipeline, max_preparing=2)
    handler = client.app.state.handler
    batcher.max_queue = 4  # places for exactly six: 2 running + 4 waiting
    inside, peak = 0, 0

    async def one(gate: asyncio.Event) -> None:
        nonlocal inside, peak
        async with handler.admit(), handler.preparation():
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    async def main() -> None:
        gate = asyncio.Event()
        tasks = [asyncio.create_task(one(gate)) for _ in range(6)]
        while handler.preparing < 6:
            await asyncio.sleep(0)
        assert inside == 2  # four wait for a preparation slot, still counted against capacity
        with pytest.raises(Exception, match="server busy"):
            async with handler.admit():
                pass
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert peak == 2 and handler.preparing == 0


def test_the_pixel_budget_is_per_request_too(pipeline, images):
    from ._support import data_url

    client, _ = app_for(pipeline, max_image_pixels=100_000, max_request_pixels=10_000)
    one = {"type": "image_url", "image_url": {"url": data_url(images[0])}}  # 96 x 64 = 6144 pixels
    text = {"type": "text", "text": "何色ですか？"}
    with client:
        assert client.post("/v1/chat/completions", json=body([text, one])).status_code == 200
        response = client.post("/v1/chat/completions", json=body([text, one, one]))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.0.content.2.image_url"


def test_loopback_names_and_the_exposed_server_warning(caplog):
    from convllava_jp.infer.server import is_loopback, warn_if_exposed

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "a.localhost"))
    assert not any(
        is_loopback(h) for h in ("0.0.0.0", "::", "192.168.0.2", "example.com", "127.0.0.1.nip.io")
    )
    with caplog.at_level(logging.WARNING):
        warn_if_exposed("127.0.0.1", None)
        warn_if_exposed("0.0.0.0", "key")
        assert not caplog.records
        warn_if_exposed("0.0.0.0", None)
    assert "NO API KEY" in caplog.text


def test_webui_takes_an_api_key_like_serve(monkeypatch):
    from convllava_jp.cli import build_parser
    from convllava_jp.cli.infer import _api_key

    parser = build_parser()
    args = parser.parse_args(["webui", "--model", "m", "--api-key", "k1", "--allow-host", "proxy.local"])
    assert _api_key(args) == "k1" and args.allow_host == ["proxy.local"]
    monkeypatch.setenv("CONVLLAVA_API_KEY", "k2")
    assert _api_key(parser.parse_args(["webui", "--model", "m"])) == "k2"
    assert _api_key(parser.parse_args(["serve", "--model", "m"])) == "k2"


def test_a_body_that_never_finishes_arriving_gets_408(pipeline):
    """A slow (slowloris) upload holds its place only until the request's deadline."""
    import time

    from convllava_jp.infer.openai_api import APIError

    client, _ = app_for(pipeline)
    handler = client.app.state.handler

    class Trickle:
        headers: dict = {}

        async def stream(self):
            yield b"{"
            await asyncio.Event().wait()  # the rest never comes

    with pytest.raises(APIError) as caught:
        asyncio.run(handler.read(Trickle(), deadline=time.monotonic() + 0.05))
    assert caught.value.status == 408


def test_the_batcher_sees_the_requests_being_prepared(pipeline):
    """What lets an idle batcher wait for a burst's stragglers (test_batching_gather.py)."""
    client, batcher = app_for(pipeline)
    handler = client.app.state.handler
    assert batcher.incoming() == 0
    handler.preparing = 3
    assert batcher.incoming() == 3
