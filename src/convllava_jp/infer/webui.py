"""A small web UI (gradio): upload an image, chat about it in Japanese, answers stream in.

`convllava-jp webui --model DIR` serves the UI at `/` and, on the same port, the OpenAI-compatible
API under `/v1` (see `server.py`); both share one `ContinuousBatcher`, so several browser tabs are
decoded together. The chat handler is exposed to `gradio_client` as `/chat` (inputs: image,
question, history, max_new_tokens, temperature; output: the updated history) and `/reset`.
With an API key (`--api-key` or CONVLLAVA_API_KEY) the API needs it as a Bearer token and the
page asks for it as the password (any user name).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Iterator

from ..errors import ConvLlavaError
from .batching import ContinuousBatcher
from .compute_threads import call_in_passing_thread, one_intra_op_thread
from .generation import GenerationConfig, GenerationRequest, VLMPipeline

log = logging.getLogger(__name__)

TITLE = "ConvLLaVA-JP"
INTRO = "画像をアップロードして、日本語で質問してください。回答は生成されながら表示されます。"


def _text(content) -> str:
    """A chat message's text, whatever form gradio hands it in (str, part dicts, lists)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return str(content)


def _uploaded_path(payload) -> str | None:
    """The uploaded file's path, undecoded: `load_image` decodes it later (accepted formats only).

    gradio's `Image.preprocess` opens uploads with every Pillow plugin and may convert or re-save
    them (an EPS would run Ghostscript); data URLs are refused, the browser uploads files.
    """
    if payload is None:
        return None
    if getattr(payload, "path", None) is None:
        import gradio as gr

        raise gr.Error("upload the image as a file")
    return str(payload.path)


def history_pairs(history: list[dict] | None) -> list[tuple[str, str]]:
    """gradio's message list -> (question, answer) pairs of completed turns."""
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            question = _text(message.get("content"))
        elif role == "assistant" and question is not None:
            pairs.append((question, _text(message.get("content"))))
            question = None
    return pairs


def build_webui(
    batcher: ContinuousBatcher, default_max_new_tokens: int = 256, request_timeout_s: float = 300.0
):
    """The gradio Blocks app over a batcher (not launched)."""
    import gradio as gr

    def respond(image, question, history, max_new_tokens, temperature) -> Iterator[tuple[list[dict], str]]:
        question = (question or "").strip()
        history = [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []]
        if not question:
            yield history, ""
            return
        one_intra_op_thread()  # gradio's thread encodes the image; only the engine's computes in parallel
        images = [image] if image else []
        messages = VLMPipeline.question_messages(question, len(images), history_pairs(history))
        config = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            for piece in batcher.stream(
                GenerationRequest(messages, images), config, timeout=request_timeout_s
            ):
                answer += piece
                history[-1] = {"role": "assistant", "content": answer}
                yield history, ""
        except (ConvLlavaError, TimeoutError) as err:
            raise gr.Error(str(err)) from None
        yield history, ""

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="画像", sources=["upload", "clipboard"])
                image.preprocess = _uploaded_path  # gradio's own would decode it with every plugin
                with gr.Accordion("生成の設定", open=False):
                    max_new_tokens = gr.Slider(
                        1, 1024, value=default_max_new_tokens, step=1, label="最大トークン数"
                    )
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="会話", height=480)
                question = gr.Textbox(label="質問", placeholder="例: 画像を説明してください。", lines=2)
                with gr.Row():
                    send = gr.Button("送信", variant="primary")
                    reset = gr.Button("リセット")
        inputs = [image, question, chatbot, max_new_tokens, temperature]
        send.click(respond, inputs, [chatbot, question], api_name="chat")
        question.submit(respond, inputs, [chatbot, question], api_name=False)
        reset.click(lambda: ([], ""), None, [chatbot, question], api_name="reset")
        image.change(lambda: ([], ""), None, [chatbot, question], api_name=False)
    demo.queue(default_concurrency_limit=batcher.max_batch_size, max_size=batcher.max_queue or None)
    return demo


def require_gradio() -> None:
    """ConvLlavaError with the install hint when gradio is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConvLlavaError("the web UI needs gradio: pip install 'convllava-jp[webui]'") from None


def launch_webui(
    batcher: ContinuousBatcher,
    host: str = "127.0.0.1",
    port: int = 7860,
    model_name: str = "convllava-jp",
    default_max_new_tokens: int = 256,
    request_timeout_s: float = 300.0,
    api_key: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> None:
    """Serve the web UI at `/` and the OpenAI-compatible API under `/v1` until interrupted."""
    require_gradio()
    import gradio as gr

    from .server import ServerConfig, create_app, run_app, warn_if_exposed

    warn_if_exposed(host, api_key)
    config = ServerConfig(
        model_name=model_name,
        api_key=api_key,
        default_max_tokens=default_max_new_tokens,
        request_timeout_s=request_timeout_s,
        bind_host=host,
        allowed_hosts=allowed_hosts,
    )
    app = create_app(batcher, config)
    demo = build_webui(batcher, default_max_new_tokens, request_timeout_s)
    auth = None
    if api_key:

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(str(password).encode(), api_key.encode())

    app = gr.mount_gradio_app(
        app, demo, path="/", footer_links=["api"], run_history=False, ssr_mode=False, auth=auth
    )
    run_app(app, host, port)


def serve_webui(load_batcher: Callable[[], ContinuousBatcher], host: str, port: int, **options) -> None:
    """`convllava-jp webui`: check gradio and the port first, then load the model and launch."""
    from .server import bind_socket

    require_gradio()
    bind_socket(host, port).close()
    launch_webui(call_in_passing_thread(load_batcher), host=host, port=port, **options)
