"""The judge client against a real scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from convllava_jp.errors import ConfigError, DataError
from convllava_jp.eval.judge import JudgeConfig, build_judge_prompt, judge_many, judge_one

SERVER_MODEL = "judge-model-2024-05-13"


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": SERVER_MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


GOOD = (200, completion('```json\n{"score_gpt": 8, "score": 7}\n```'))
GARBAGE = (200, completion("The model answer looks fine to me."))


@dataclass
class Script:
    """Replies in order; the last one repeats. A callable reply gets the request body."""

    replies: list[Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_reply(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        with self.lock:
            index = len(self.requests) - 1
            reply = self.replies[min(index, len(self.replies) - 1)]
        if callable(reply):
            reply = reply(body)
        status, payload, *delay = reply
        return status, payload, delay[0] if delay else 0.0


def make_handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # name fixed by http.server
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            with script.lock:
                script.requests.append(
                    {"t": time.monotonic(), "path": self.path, "headers": dict(self.headers), "body": body}
                )
            status, payload, delay = script.next_reply(body)
            if delay:
                time.sleep(delay)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(payload, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and hung up (test_timeout_...)

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[str, Script]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(*replies: Any) -> tuple[str, Script]:
        script = Script(list(replies))
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(script))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def cfg_for(url: str, **kw: Any) -> JudgeConfig:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout_s", 5.0)
    return JudgeConfig(url=url, model="gpt-4o-2024-05-13", **kw)


def ask(cfg: JudgeConfig) -> dict[str, Any]:
    return judge_one(
        cfg, "公園で犬が走っている写真。", "犬は何をしていますか？", "犬が走っています。", "犬が寝ています。"
    )


def test_429_then_success_retries_and_sends_right_body(serve, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    url, script = serve((429, {"error": {"message": "rate limited"}}), GOOD)
    result = ask(cfg_for(url, backoff_s=0.05, api_key_env="MY_JUDGE_KEY"))

    assert result["score_gpt"] == 8 and result["score"] == 7 and result["error"] is None
    assert result["attempts"] == 2 and len(script.requests) == 2
    assert result["judge_model"] == "gpt-4o-2024-05-13"
    assert result["judge_model_version"] == SERVER_MODEL
    assert "score_gpt" in result["raw"]
    assert script.requests[1]["t"] - script.requests[0]["t"] >= 0.05  # slept the backoff

    first = script.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test-123"
    body = first["body"]
    assert body["model"] == "gpt-4o-2024-05-13"
    assert body["temperature"] == 0
    user = body["messages"][-1]["content"]
    for text in (
        "公園で犬が走っている写真。",
        "犬は何をしていますか？",
        "犬が走っています。",
        "犬が寝ています。",
    ):
        assert text in user


def test_500_forever_records_minus_one_after_exponential_backoff(serve):
    url, script = serve((500, "internal error"))
    result = ask(cfg_for(url, max_retries=3, backoff_s=0.02))

    assert result["score"] == -1 and result["score_gpt"] == -1
    assert result["error"].startswith("http 500")
    assert result["attempts"] == 4 and len(script.requests) == 4
    times = [r["t"] for r in script.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Sleeps are 0.02, 0.04, 0.08: a constant backoff could not make the third gap this long.
    for gap, floor in zip(gaps, (0.02, 0.04, 0.08)):
        assert gap >= floor


def test_garbage_reply_retried_once_then_parse_error(serve):
    url, script = serve(GARBAGE)
    result = ask(cfg_for(url))
    assert len(script.requests) == 2
    assert result["error"] == "parse"
    assert result["score"] == -1 and result["score_gpt"] == -1
    assert result["raw"] == "The model answer looks fine to me."
    assert result["judge_model_version"] == SERVER_MODEL


def test_garbage_then_good_succeeds_on_the_retry(serve):
    url, script = serve(GARBAGE, GOOD)
    result = ask(cfg_for(url))
    assert len(script.requests) == 2
    assert (result["score_gpt"], result["score"], result["error"]) == (8, 7, None)


def test_out_of_range_scores_count_as_parse_failure(serve):
    url, _ = serve((200, completion('{"score_gpt": 12, "score": 0}')))
    assert ask(cfg_for(url))["error"] == "parse"


def test_non_json_http_body_is_a_parse_failure(serve):
    url, script = serve((200, "<html>proxy says hi</html>"))
    result = ask(cfg_for(url))
    assert len(script.requests) == 2
    assert result["error"] == "parse" and result["score"] == -1
    assert "proxy says hi" in result["raw"]


def test_client_error_is_not_retried(serve):
    url, script = serve((401, {"error": {"message": "bad key"}}))
    result = ask(cfg_for(url))
    assert len(script.requests) == 1
    assert result["error"].startswith("http 401") and "bad key" in result["error"]
    assert result["score"] == -1


def test_connection_refused_retries_then_records_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = ask(cfg_for(f"http://127.0.0.1:{port}", max_retries=2))
    assert result["attempts"] == 3
    assert result["error"].startswith("connection:")
    assert result["score"] == -1 and result["score_gpt"] == -1


def test_timeout_counts_as_connection_error_and_is_retried(serve):
    url, script = serve((200, completion("{}"), 0.6), GOOD)
    result = ask(cfg_for(url, timeout_s=0.2, max_retries=1))
    assert result["error"] is None and result["score"] == 7
    assert result["attempts"] == 2


def test_no_authorization_header_without_key(serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url, script = serve(GOOD)
    ask(cfg_for(url + "/v1/"))
    assert "Authorization" not in script.requests[0]["headers"]
    assert script.requests[0]["path"] == "/v1/chat/completions"


def test_judge_many_keeps_order(serve):
    def by_answer(body: dict[str, Any]) -> tuple[int, Any]:
        n = int(re.search(r"ANSWER-(\d+)", body["messages"][-1]["content"]).group(1))
        return 200, completion(json.dumps({"score_gpt": 10, "score": n}))

    url, script = serve(by_answer)
    items = [
        {"context": "c", "question": "q", "reference": "r", "answer": f"ANSWER-{n}"} for n in (3, 9, 1, 5)
    ]
    results = judge_many(cfg_for(url), items, max_workers=3, show_progress=False)
    assert [r["score"] for r in results] == [3, 9, 1, 5]
    assert len(script.requests) == 4
    with pytest.raises(DataError, match="item 0 lacks"):
        judge_many(cfg_for(url), [{"context": "c"}], show_progress=False)


def test_prompt_and_config():
    prompt = build_judge_prompt("文脈", "質問", "参考回答", "モデル回答")
    assert all(
        s in prompt for s in ("文脈", "質問", "参考回答", "モデル回答", '"score_gpt"', '"score"', "1 to 10")
    )
    assert prompt.index("参考回答") < prompt.index("モデル回答")
    assert JudgeConfig("http://h:1", "m").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig("http://h:1/v1", "m").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig("https://h/v1/chat/completions", "m").endpoint == "https://h/v1/chat/completions"
    assert JudgeConfig("https://h:1", "m", api_key="k").headers()["Authorization"] == "Bearer k"
    assert JudgeConfig("http://127.0.0.1:1", "m", api_key="k").headers()["Authorization"] == "Bearer k"
    assert JudgeConfig("http://[::1]:1", "m", api_key="k").headers()["Authorization"] == "Bearer k"
    for url in ("http://h:1", "http://10.0.0.5:8000", "http://127.0.0.1.evil.example"):
        with pytest.raises(ConfigError, match="plain http"):
            JudgeConfig(url, "m", api_key="k").headers()
    with pytest.raises(ConfigError, match="http"):
        JudgeConfig("h:1", "m")
    with pytest.raises(ConfigError, match="max_retries"):
        JudgeConfig("http://h:1", "m", max_retries=-1)
