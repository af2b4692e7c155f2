"""`convllava-jp chat | predict | serve | webui`: the arguments, and thin calls into `infer`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..infer.chat import CHAT_HELP  # imports nothing heavy: `--help` stays instant

FORMAT = argparse.RawDescriptionHelpFormatter
PREDICT_DESCRIPTION = (
    "Answer every line of a JSONL file, in batches, writing one JSON line per answer.\n\n"
    'input lines:  {"id": "q1", "image": "img.png", "question": "何色ですか？"}\n'
    '              ("images": [...] for several, "messages": [...] for a whole conversation;\n'
    "               without an id (or question_id) a hash of the line's content is the id;\n"
    "               image paths are relative to --image-root, by default the input's folder)\n"
    'output lines: {"id", "answer", "finish_reason", "prompt_tokens", "completion_tokens"}\n\n'
    "Rerunning with the same --output skips the ids already written, so an interrupted run\n"
    "continues where it stopped. Records that fail (malformed, missing image, too long) are\n"
    "logged and listed beside OUT (answers.jsonl -> answers.errors.jsonl: id, line, error), not\n"
    "written to OUT, and the exit code is 1; a rerun retries them."
)

SERVE_DESCRIPTION = (
    "Serve the model over an OpenAI-compatible API; concurrent requests are batched together.\n\n"
    "  from openai import OpenAI\n"
    '  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")\n'
    "  client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': [\n"
    "      {'type': 'text', 'text': '画像を説明してください。'},\n"
    "      {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}]}])\n\n"
    "Images come as base64 data: URLs (local paths only under --allow-local-files).\n"
    "Bad input gets a 4xx JSON error in OpenAI's shape; a full queue gets 503."
)


# --- shared options and loaders ---------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (config.json, weights, tokenizer)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or auto (bfloat16 where the device computes in it natively, e.g. "
        "AVX512-BF16/AMX CPUs). bfloat16/float16 on the CPU take the fast path: weights cast while read, "
        "channels_last vision tower, GEMV decoding (default: the dtype the weights were saved in, exact)",
    )
    p.add_argument(
        "--template",
        help="chat template of the prompts: a name (llm-jp-v1, plain, llm-jp-3, qwen3, ...) or a .jinja file "
        "(default: the one the model was trained with, recorded in its dir, else llm-jp-v1)",
    )
    p.add_argument("--num-threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="answer length limit (default: %(default)s)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: %(default)s)"
    )
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end the answer at TEXT (repeatable)"
    )
    g.add_argument("--seed", type=int, help="seed for sampling")


def _add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=port, help="TCP port, 0 = any free one (default: %(default)s)")
    p.add_argument("--model-name", help="model id clients send (default: the model directory's name)")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 (and as the web UI's password) "
        "(default: $CONVLLAVA_API_KEY or none)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="Host header name accepted besides loopback ones when bound to loopback, e.g. the "
        "name a local reverse proxy passes on (repeatable)",
    )
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch-size", type=int, default=8, help="requests decoded together (default: %(default)s)"
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for a slot before 503 (default: %(default)s)",
    )
    g.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="when idle, wait this long for more requests to batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=250.0,
        help="when idle and more requests are still being read or prepared, wait for them up to "
        "this long, so a burst of clients starts as one batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-prefill-batch",
        type=int,
        default=8,
        help="most requests prefilled (vision tower + prompt) in one call (default: %(default)s)",
    )
    g.add_argument(
        "--no-overlap-prefill",
        dest="overlap_prefill",
        action="store_false",
        help="prefill joining requests between decode steps instead of beside them in a worker thread",
    )


def _generation_config(args: argparse.Namespace):
    from ..infer.generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=list(args.stop),
        seed=args.seed,
    ).validate()


def _load_pipeline(args: argparse.Namespace):
    import torch

    from ..infer.generation import VLMPipeline

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return VLMPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, template=args.template
    )


def _load_batcher(args: argparse.Namespace):
    from ..infer.batching import ContinuousBatcher

    return ContinuousBatcher(
        _load_pipeline(args),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_batch_wait_s=max(args.max_batch_wait_ms, args.batch_wait_ms) / 1000,
        max_prefill_batch=args.max_prefill_batch,
        overlap_prefill=args.overlap_prefill,
    )


def _model_name(args: argparse.Namespace) -> str:
    return args.model_name or Path(args.model).resolve().name


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("CONVLLAVA_API_KEY") or None


# --- commands ---------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    from ..infer.chat import run_chat

    config = _generation_config(args)
    run_chat(_load_pipeline(args), config, args.image)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..infer.predict import predict_file

    config = _generation_config(args)
    failed = predict_file(
        args.input, args.output, lambda: _load_pipeline(args), config, args.batch_size, args.image_root
    )
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":  # `vllm serve` via our plugin or an export: see docs/vllm.md
        from ..vllm_plugin.launch import serve_with_vllm

        return serve_with_vllm(args)
    from ..infer.server import ServerConfig, serve_model

    config = ServerConfig(
        model_name=_model_name(args),
        api_key=_api_key(args),
        allow_local_files=Path(args.allow_local_files) if args.allow_local_files else None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_preparing=args.max_preparing,
        allowed_hosts=tuple(args.allow_host),
        request_timeout_s=args.request_timeout,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
    )
    serve_model(lambda: _load_batcher(args), config, args.host, args.port)
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from ..infer.webui import serve_webui

    serve_webui(
        lambda: _load_batcher(args),
        args.host,
        args.port,
        model_name=_model_name(args),
        default_max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.request_timeout,
        api_key=_api_key(args),
        allowed_hosts=tuple(args.allow_host),
    )
    return 0


# --- parsers ----------------------------------------------------------------------------------
def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat about an image in the terminal (multi-turn, streamed)",
        description="Multi-turn chat about an image; answers are printed as they are generated.\n\n"
        + CHAT_HELP,
        formatter_class=FORMAT,
    )
    _add_model_args(p)
    p.add_argument("--image", metavar="PATH", help="image to talk about (default: none; /image PATH later)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="answer a JSONL file of questions in batches (resumable)",
        description=PREDICT_DESCRIPTION,
        formatter_class=FORMAT,
    )
    _add_model_args(p)
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="questions, one JSON object a line")
    p.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="answers (appended; existing ids are skipped)"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="records generated together (default: %(default)s)"
    )
    p.add_argument(
        "--image-root", metavar="DIR", help="base of relative image paths (default: the input's folder)"
    )
    _add_sampling_args(p)
    p.set_defaults(func=cmd_predict)


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default: %(default)s)"
    )
    g.add_argument("--max-images", type=int, default=4, help="images per request (default: %(default)s)")
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=16_000_000,
        help="width x height per image, checked before decoding (default: %(default)s)",
    )
    g.add_argument(
        "--max-request-pixels",
        type=int,
        default=32_000_000,
        help="width x height of all of a request's images together (default: %(default)s)",
    )
    g.add_argument(
        "--max-preparing",
        type=int,
        default=4,
        help="requests whose images are decoded at the same time; more wait (default: %(default)s)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds per request, queueing included (default: %(default)s)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="answer length when a request sets none (default: %(default)s)",
    )
    g.add_argument(
        "--default-temperature",
        type=float,
        default=1.0,
        help="temperature when a request sets none (default: %(default)s, as OpenAI)",
    )


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)",
        description=SERVE_DESCRIPTION,
        formatter_class=FORMAT,
    )
    _add_model_args(p)
    _add_server_args(p, port=8000)
    p.add_argument(
        "--allow-local-files",
        metavar="DIR",
        help="let image_url name files under DIR (file:///... or a path); off by default",
    )
    _add_serve_limits(p)
    g = p.add_argument_group("engine")
    g.add_argument(
        "--engine", choices=["builtin", "vllm"], default="builtin", help="who serves (default: %(default)s)"
    )
    g.add_argument("--vllm-bin", help="the vllm executable (default: $CONVLLAVA_VLLM_BIN, or on PATH)")
    g.add_argument(
        "--vllm-road",
        choices=["auto", "plugin", "export"],
        default="auto",
        help="vllm: serve the model dir through our vLLM plugin (needs convllava-jp in vLLM's env) or "
        "an export to transformers' FastVLM; auto: the plugin where vLLM's env has it (docs/vllm.md)",
    )
    g.add_argument(
        "--vllm-arg", action="append", metavar="ARG", help="pass ARG on to vllm serve (repeatable)"
    )
    p.set_defaults(func=cmd_serve)


def _add_webui(sub) -> None:
    p = sub.add_parser(
        "webui",
        help="web page to upload an image and chat (gradio), plus the /v1 API on the same port",
        description="Open http://HOST:PORT/ in a browser: upload an image, ask in Japanese, watch the answer stream in.",
    )
    _add_model_args(p)
    _add_server_args(p, port=7860)
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="default answer length (default: %(default)s)"
    )
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds per answer (default: %(default)s)"
    )
    p.set_defaults(func=cmd_webui)


def add_commands(sub) -> None:
    """Add `chat`, `predict`, `serve` and `webui` to the `convllava-jp` subparsers."""
    _add_chat(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_webui(sub)
