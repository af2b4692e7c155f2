"""A server with one batch slot, no queue and a 2 s timeout: 503 when full, timeouts, freed slots.

No assertion here depends on how fast the machine is: slots freed early are shown by the server's
counters (cancelled, not completed; far fewer tokens generated than asked for), not by a clock.
"""

from __future__ import annotations

import time

import httpx
import pytest

from ._support import API_KEY, MODEL_NAME

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
        before = busy_server.health()["stats"]
    # the client closed the stream: its row left the batch long before its 4000 tokens
    after = wait_idle(busy_server, limit_s=60)["stats"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"] and after["timed_out"] == before["timed_out"]
    assert after["tokens"] - before["tokens"] < 4000
    response = post(busy_server, SHORT)
    assert response.status_code == 200, response.text


def test_a_client_that_gives_up_frees_its_slot(server):
    """A plain (not streamed) request whose client leaves is cancelled: on a server whose own
    timeout is minutes away, nothing else could free its slot before its 4000 tokens."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    wait_idle(server)
    before = server.health()["stats"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=LONG, headers=headers, timeout=0.4)
    after = wait_idle(server, limit_s=60)["stats"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"] and after["timed_out"] == before["timed_out"]
    assert after["tokens"] - before["tokens"] < 4000
    response = httpx.post(server.url + "/v1/chat/completions", json=SHORT, headers=headers, timeout=60)
    assert response.status_code == 200


def test_request_timeout_gives_504_and_the_server_goes_on(busy_server):
    wait_idle(busy_server)
    started = time.monotonic()
    response = post(busy_server, LONG)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"
    assert time.monotonic() - started >= 2.0  # never early (the server's clock starts after ours)
    wait_idle(busy_server)

    with httpx.stream(
        "POST", busy_server.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"timeout"' in line for line in lines)
    assert lines[-1] == "data: [DONE]"
    wait_idle(busy_server)
    assert post(busy_server, SHORT).status_code == 200


def test_an_eps_image_is_refused_by_name_and_never_decoded(busy_server):
    # A real EPS with a small BoundingBox passes the pixel check; decoding it would run Ghostscript.
    import base64

    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
        b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    )
    url = "data:image/png;base64," + base64.b64encode(eps).decode()  # the MIME type claims PNG
    content = [{"type": "text", "text": "何ですか"}, {"type": "image_url", "image_url": {"url": url}}]
    wait_idle(busy_server)
    reply = post(busy_server, {**SHORT, "messages": [{"role": "user", "content": content}]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_image" and "EPS is not an accepted image format" in error["message"]
    assert wait_idle(busy_server)["running"] == 0
