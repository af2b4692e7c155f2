"""The OpenAI-compatible server, as a real subprocess on a loopback port, driven over HTTP."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib

import httpx
import openai
import pytest

from convllava_jp.infer.generation import GenerationConfig, GenerationRequest

from ._support import API_KEY, MODEL_NAME, data_url, png_bytes

QUESTION = "画像を説明してください。"


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def user_message(question: str, *urls: str) -> dict:
    parts: list[dict] = [{"type": "text", "text": question}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": parts}


def post(server, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        headers["Content-Type"] = "application/json"
        return httpx.post(
            server.url + "/v1/chat/completions", content=body, headers=headers, timeout=60, **kwargs
        )
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def good_body(image, **extra) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": [user_message(QUESTION, data_url(image))],
        "max_tokens": 8,
        **extra,
    }


def expected(pipeline, image, question=QUESTION, max_new_tokens=8, **kwargs):
    request = GenerationRequest(pipeline.question_messages(question, 1), [image])
    return pipeline.generate([request], GenerationConfig(max_new_tokens=max_new_tokens, **kwargs))[0]


def assert_still_serving(server, image, pipeline) -> None:
    response = post(server, good_body(image, temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected(pipeline, image).text


def test_health_models_and_api_key(server):
    assert server.health()["status"] == "ok"
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert (
        httpx.get(
            server.url + "/v1/models/" + MODEL_NAME, headers={"Authorization": f"Bearer {API_KEY}"}
        ).status_code
        == 200
    )
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(server.url + "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_gets_the_python_api_answer(server, pipeline, images):
    want = expected(pipeline, images[0], max_new_tokens=24)
    response = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[user_message(QUESTION, data_url(images[0]))],
        max_tokens=24,
        temperature=0,
    )
    assert response.choices[0].message.content == want.text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == want.finish_reason
    assert response.usage.prompt_tokens == want.prompt_tokens
    assert response.usage.completion_tokens == want.completion_tokens
    assert response.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    assert response.model == MODEL_NAME and response.id.startswith("chatcmpl-")


def test_multi_turn_system_and_string_content(server, pipeline, images):
    first = expected(pipeline, images[1]).text
    messages = [
        {"role": "system", "content": "あなたは画像を説明するアシスタントです。"},
        user_message(QUESTION, data_url(images[1])),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "何色ですか？"},
    ]
    want = pipeline.generate(
        [
            GenerationRequest(
                [
                    {"role": "system", "content": messages[0]["content"]},
                    {"role": "user", "content": "<image>\n" + QUESTION},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "何色ですか？"},
                ],
                [images[1]],
            )
        ],
        GenerationConfig(max_new_tokens=10),
    )[0]
    response = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0
    )
    assert response.choices[0].message.content == want.text


def test_streaming_chunks_concatenate_to_the_answer(server, pipeline, images):
    want = expected(pipeline, images[2], max_new_tokens=32)
    stream = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[user_message(QUESTION, data_url(images[2]))],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens

    # on the wire: SSE `data:` lines ending with [DONE]
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=good_body(images[2], stream=True, temperature=0, max_tokens=32),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == want.text


def test_stop_and_seed(server, pipeline, images):
    full = expected(pipeline, images[0], max_new_tokens=30).text
    stop = next(ch for i, ch in enumerate(full) if i > 3 and ch != "\ufffd")
    response = post(server, good_body(images[0], temperature=0, max_tokens=30, stop=[stop]))
    body = response.json()
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    sampled = [
        post(server, good_body(images[0], temperature=1.3, top_p=0.9, seed=11, max_tokens=16)).json()
        for _ in range(2)
    ]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]


def test_local_files_only_under_the_allowed_folder(server, pipeline, images, tmp_path):
    inside = post(
        server,
        {**good_body(images[3], temperature=0), "messages": [user_message(QUESTION, f"file://{images[3]}")]},
    )
    assert inside.status_code == 200, inside.text
    assert inside.json()["choices"][0]["message"]["content"] == expected(pipeline, images[3]).text
    outside = tmp_path / "secret.png"
    outside.write_bytes(images[3].read_bytes())
    response = post(server, {**good_body(images[3]), "messages": [user_message(QUESTION, str(outside))]})
    assert response.status_code == 403
    traversal = f"{images[3].parent}/../{outside.parent.name}/secret.png"
    assert (
        post(server, {**good_body(images[3]), "messages": [user_message(QUESTION, traversal)]}).status_code
        == 403
    )


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels."""
    raw = bytearray(png_bytes((8, 8)))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(raw[ihdr : ihdr + 17]))
    raw[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(raw)


def _png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD_INPUTS = {
    # name: (body or raw bytes, expected status, expected error param or code substring)
    "malformed_json": (b'{"model": "tiny-test", "messages": [', 400, "invalid_json"),
    "not_an_object": (b"[1, 2, 3]", 400, "invalid_json"),
    "missing_messages": ({"model": MODEL_NAME}, 400, "messages"),
    "empty_messages": ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    "wrong_type_max_tokens": ("max_tokens", "lots", 400, "max_tokens"),
    "wrong_type_messages": ({"model": MODEL_NAME, "messages": "hello"}, 400, "messages"),
    "wrong_type_temperature": ("temperature", "hot", 400, "temperature"),
    "temperature_out_of_range": ("temperature", 5, 400, "temperature"),
    "bad_role": (
        {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    "unknown_model": ("model", "gpt-4o", 404, "model_not_found"),
    "max_tokens_over_context": ("max_tokens", 5000, 400, "context_length_exceeded"),
    "n_2": ("n", 2, 400, "n"),
    "last_turn_not_user": (
        {"model": MODEL_NAME, "messages": [{"role": "assistant", "content": "x"}]},
        400,
        "messages",
    ),
    "invalid_base64": ("image", "data:image/png;base64,@@@notbase64@@@", 400, "invalid_base64"),
    "not_an_image": ("image", _png_url(b"this is plain text, not a png"), 400, "invalid_image"),
    "truncated_image": ("image", _png_url(png_bytes((64, 64))[:60]), 400, "invalid_image"),
    "too_many_pixels": ("image", _png_url(png_bytes((1200, 1000))), 400, "invalid_image"),
    "decompression_bomb": ("image", _png_url(_bomb_png()), 400, "invalid_image"),
    "remote_url": ("image", "https://example.com/cat.png", 400, "invalid_image_url"),
    "local_path_not_allowed_scheme": ("image", "ftp://host/cat.png", 400, "invalid_image_url"),
    "too_many_images": ("images", 3, 400, "too_many_images"),
    "image_token_in_text": ("question", "<image> 何ですか", 400, "messages.0.content"),
    "body_too_large": ("padding", 2 * 2**20, 413, "request_too_large"),
    # values no sampler can honour: refused, naming the field
    "seed_too_large": ("seed", 2**64, 400, "seed"),
    "seed_negative": ("seed", -1, 400, "seed"),
    "repetition_penalty_tiny": ("repetition_penalty", 1e-300, 400, "repetition_penalty"),
    "temperature_nan": (
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    "top_p_infinite": (
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        400,
        "top_p",
    ),
    "too_many_stops": ("stop", [str(i) for i in range(17)], 400, "stop"),
    "stop_too_long": ("stop", ["x" * 257], 400, "stop"),
    "deeply_nested_json": (b"[" * 100_000, 400, "invalid_json"),
    "deeply_nested_field": (b'{"model": "tiny-test", "messages": ' + b"[" * 100_000, 400, "invalid_json"),
}


def _bad_request(name: str, image_url: str):
    spec = BAD_INPUTS[name]
    if len(spec) == 3:
        return spec
    key, value, status, expect = spec
    body = {"model": MODEL_NAME, "messages": [user_message(QUESTION, image_url)], "max_tokens": 4}
    if key == "image":
        body["messages"] = [user_message(QUESTION, value)]
    elif key == "images":
        body["messages"] = [user_message(QUESTION, *[image_url] * value)]
    elif key == "question":
        body["messages"] = [user_message(value, image_url)]
    elif key == "padding":
        body["padding"] = "x" * value
    else:
        body[key] = value
    return body, status, expect


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_in_openai_shape(server, images, name):
    body, status, expect = _bad_request(name, data_url(images[0]))
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert expect in (error["code"] or "") or expect in (error["param"] or ""), error
    assert server.health()["status"] == "ok"


def test_server_still_answers_after_bad_input(server, pipeline, images):
    for name in BAD_INPUTS:
        body, status, _ = _bad_request(name, data_url(images[1]))
        assert post(server, body).status_code == status
    assert_still_serving(server, images[1], pipeline)
    # unknown routes and methods answer in the same shape
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


def test_openai_client_sees_bad_requests_as_exceptions(server, images):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[user_message(QUESTION, data_url(images[0]))])
    with pytest.raises(openai.BadRequestError, match="base64"):
        c.chat.completions.create(
            model=MODEL_NAME, messages=[user_message(QUESTION, "data:image/png;base64,!!")]
        )


def test_concurrent_clients_are_batched_and_all_correct(server, pipeline, images):
    n = 8
    questions = [f"{QUESTION}{'。' * i}" for i in range(n)]
    results = [expected(pipeline, images[i % 4], questions[i], max_new_tokens=20) for i in range(n)]
    want = [r.text for r in results]
    before = server.health()["stats"]
    answers: list[str | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def ask(i: int) -> None:
        try:
            c = client(server)
            barrier.wait(timeout=30)
            r = c.chat.completions.create(
                model=MODEL_NAME,
                messages=[user_message(questions[i], data_url(images[i % 4]))],
                max_tokens=20,
                temperature=0,
                stream=i % 2 == 1,
            )
            answers[i] = (
                "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
                if i % 2
                else r.choices[0].message.content
            )
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert answers == want
    after = server.health()["stats"]
    assert after["completed"] - before["completed"] == n
    assert after["peak_batch"] > 1
    # fewer decode steps than one request after another (the first token comes from the prefill)
    assert after["steps"] - before["steps"] < sum(r.completion_tokens - 1 for r in results)


def test_disconnected_stream_frees_its_slot(server):
    """A client that leaves mid-stream: its row leaves the batch (the server counts it cancelled)."""
    before = server.health()["stats"]["cancelled"]
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 3500,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["stats"]["cancelled"] > before:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["stats"]["cancelled"] > before


def test_sampling_is_not_forced_to_greedy(server, pipeline, images):
    """Seeded samples repeat, differ between seeds and differ from the greedy answer (greedy decoding
    forced on every request would pass a check that only compares two seeded samples)."""
    greedy = expected(pipeline, images[0], max_new_tokens=16).text

    def sample(seed: int, temperature: float = 1.3) -> str:
        body = good_body(images[0], temperature=temperature, seed=seed, max_tokens=16)
        response = post(server, body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    first = [sample(seed) for seed in (1, 2, 3)]
    assert first == [sample(seed) for seed in (1, 2, 3)]
    assert len(set(first)) > 1 and greedy not in first
    assert sample(1, temperature=0.001) == greedy  # below the temperature floor: greedy


HOSTILE = {
    # name: (extra fields, expected status); 200 ones are mapped to documented behaviour
    "seed_2_64": ({"seed": 2**64, "temperature": 1}, 400),
    "temperature_1e-38": ({"temperature": 1e-38}, 200),
    "temperature_min_float": ({"temperature": 5e-324}, 200),
    "top_p_tiny": ({"temperature": 2, "top_p": 1e-300, "seed": 3}, 200),
    "repetition_penalty_tiny": ({"temperature": 2, "repetition_penalty": 1e-300}, 400),
    "repetition_penalty_max": ({"temperature": 2, "repetition_penalty": 10, "top_p": 1e-9}, 200),
    "long_stops": ({"stop": ["あ" * 256] * 16}, 200),
}


def test_hostile_values_never_disturb_concurrent_good_requests(server, pipeline, images):
    n_good = 4
    want = [expected(pipeline, images[i], max_new_tokens=12).text for i in range(n_good)]
    names = list(HOSTILE)
    outcome: dict[str, int] = {}
    answers: list[list[str | None]] = []
    barrier_size = n_good + 1

    def run(target, *args):
        thread = threading.Thread(target=target, args=args)
        thread.start()
        return thread

    for name in names:
        extra, _ = HOSTILE[name]
        barrier = threading.Barrier(barrier_size)
        got: list[str | None] = [None] * n_good

        def good(i: int, barrier=barrier, got=got) -> None:
            barrier.wait(timeout=30)
            response = post(server, good_body(images[i], temperature=0, max_tokens=12))
            got[i] = (
                response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            )

        def hostile(name=name, extra=extra, barrier=barrier) -> None:
            barrier.wait(timeout=30)
            outcome[name] = post(server, good_body(images[0], max_tokens=12, **extra)).status_code

        threads = [run(good, i) for i in range(n_good)] + [run(hostile)]
        for t in threads:
            t.join(120)
        answers.append(got)
    assert outcome == {name: status for name, (_, status) in HOSTILE.items()}
    assert answers == [want] * len(names)
    assert server.health()["stats"]["failed"] == 0


def test_post_bodies_must_be_declared_json(server, images):
    body = json.dumps(good_body(images[0], temperature=0)).encode()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        extra = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(
            server.url + "/v1/chat/completions", content=body, headers={**headers, **extra}, timeout=60
        )
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["error"]["code"] == "unsupported_media_type"
    ok = {**headers, "Content-Type": "application/json; charset=utf-8"}
    assert (
        httpx.post(server.url + "/v1/chat/completions", content=body, headers=ok, timeout=60).status_code
        == 200
    )


def test_a_loopback_server_answers_only_loopback_host_names(server):
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.10", "127.0.0.1.evil.example"):
        response = httpx.get(server.url + "/health", headers={"Host": host}, timeout=10)
        assert response.status_code == 400, host
        assert response.json()["error"]["code"] == "invalid_host"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
