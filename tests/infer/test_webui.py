"""The web UI, launched for real (`webui` subprocess) and driven with gradio_client."""

from __future__ import annotations

import httpx
import pytest

gradio_client = pytest.importorskip("gradio_client", reason="the web UI tests need gradio (extra 'webui')")
pytest.importorskip("gradio", reason="the web UI tests need gradio (extra 'webui')")

QUESTION = "画像を説明してください。"
FOLLOW_UP = "何色ですか？"


def assistant_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def test_page_and_api_share_the_port(webui):
    page = httpx.get(webui.url + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(webui.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-test"


def test_chat_in_the_web_ui_streams_the_python_api_answers(webui, pipeline, images, tmp_path):
    client = gradio_client.Client(
        webui.url + "/", verbose=False, download_files=str(tmp_path), analytics_enabled=False
    )
    image = gradio_client.handle_file(str(images[0]))
    first = pipeline.chat(images[0], QUESTION, max_new_tokens=16)
    job = client.submit(image, QUESTION, [], 16, 0.0, api_name="/chat")
    history, textbox = job.result(timeout=60)
    assert textbox == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert assistant_text(history[1]) == first
    # the answer arrived in pieces: several intermediate updates of the chat
    partial = [assistant_text(out[0][-1]) for out in job.outputs()]
    assert len(partial) > 2 and partial[-1] == first
    assert all(first.startswith(p) for p in partial)

    second = pipeline.chat(images[0], FOLLOW_UP, history=[(QUESTION, first)], max_new_tokens=16)
    history, _ = client.predict(image, FOLLOW_UP, history, 16, 0.0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert assistant_text(history[3]) == second

    cleared, _ = client.predict(api_name="/reset")
    assert cleared == []
