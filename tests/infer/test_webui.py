"""The web UI, launched for real (`webui` subprocess) and driven with gradio_client."""

from __future__ import annotations

import httpx
import pytest

from ._support import API_KEY

gradio_client = pytest.importorskip("gradio_client", reason="the web UI tests need gradio (extra 'webui')")
pytest.importorskip("gradio", reason="the web UI tests need gradio (extra 'webui')")

QUESTION = "画像を説明してください。"
FOLLOW_UP = "何色ですか？"


def assistant_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def test_page_and_api_share_the_port_and_the_key(webui, tmp_path):
    page = httpx.get(webui.url + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(webui.url + "/v1/models", timeout=30).status_code == 401  # CONVLLAVA_API_KEY
    keyed = httpx.get(webui.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert keyed.json()["data"][0]["id"] == "tiny-test"
    # the page's own API asks for the key as the password too
    for auth in (None, ("anyone", "wrong")):
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a bare ValueError or an HTTP error)
            gradio_client.Client(webui.url + "/", auth=auth, verbose=False, download_files=str(tmp_path))


def test_chat_in_the_web_ui_streams_the_python_api_answers(webui, pipeline, images, tmp_path):
    client = gradio_client.Client(
        webui.url + "/",
        auth=("anyone", API_KEY),
        verbose=False,
        download_files=str(tmp_path),
        analytics_enabled=False,
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


def test_uploads_reach_load_image_undecoded(tmp_path, monkeypatch):
    # gradio's own Image.preprocess opens uploads with every Pillow plugin (and may convert them);
    # the web UI hands the upload's path to load_image, which decodes the accepted formats only.
    import gradio as gr
    from gradio.data_classes import ImageData
    from PIL import Image

    from convllava_jp.infer.webui import build_webui

    opened: list[object] = []
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args))
    eps = tmp_path / "figure.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n")
    from types import SimpleNamespace

    batcher = SimpleNamespace(max_batch_size=1, max_queue=0)  # the app is only built, never asked
    app = build_webui(batcher)  # type: ignore[arg-type]
    (component,) = [block for block in app.blocks.values() if isinstance(block, gr.Image)]
    assert component.preprocess(ImageData(path=str(eps), orig_name="figure.eps")) == str(eps)
    assert component.preprocess(None) is None
    with pytest.raises(gr.Error):
        component.preprocess(ImageData(url="data:image/png;base64,AAAA"))
    assert opened == []
