"""A server with one batch slot, no queue and a 2 s timeout: 503 when full, timeouts, freed slots."""

from __future__ import annotations

import time

import httpx
import pytest

from ._support import MODEL_NAME

# greedy: the tiny random model then never says EOS, so this runs for seconds
LONG = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "こんにちは"}],
    "max_tokens": 4000,
    "temperature": 0,
}
SHORT = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "こんにちは"}],
    "max_tokens": 4,
    "temperature": 0,
}


def post(server, body, timeout: float = 30) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def wait_idle(server, limit_s: float = 20) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {limit_s} s: {health}")


def test_full_queue_gets_503_and_a_closed_stream_frees_the_slot(busy_server):
    wait_idle(busy_server)
    with httpx.stream(
        "POST", busy_server.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if '"content":' in line and '"content":""' not in line.replace(" ", ""))
        # now the stream holds the only slot
        busy = post(busy_server, SHORT)
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"]["code"] == "server_busy"
        assert busy.headers.get("retry-after") == "1"
    # the client closed the stream: the slot is free long before 4000 tokens could be generated
    health = wait_idle(busy_server, limit_s=1.5)
    assert health["stats"]["cancelled"] >= 1
    response = post(busy_server, SHORT)
    assert response.status_code == 200, response.text


def test_a_client_that_gives_up_frees_its_slot(busy_server):
    """A plain (not streamed) request whose client leaves: freed before the server's 2 s timeout."""
    wait_idle(busy_server)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(busy_server, LONG, timeout=0.4)
    wait_idle(busy_server, limit_s=1.3)
    assert time.monotonic() - started < 1.9
    assert post(busy_server, SHORT).status_code == 200


def test_request_timeout_gives_504_and_the_server_goes_on(busy_server):
    wait_idle(busy_server)
    started = time.monotonic()
    response = post(busy_server, LONG)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"
    assert 1.5 < time.monotonic() - started < 10
    wait_idle(busy_server)

    with httpx.stream(
        "POST", busy_server.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"timeout"' in line for line in lines)
    assert lines[-1] == "data: [DONE]"
    wait_idle(busy_server)
    assert post(busy_server, SHORT).status_code == 200
