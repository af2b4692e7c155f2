"""`convllava-jp chat | predict | serve | webui`: thin argparse front ends of the infer package.

`register(subparsers)` adds the four subcommands to the main `convllava-jp` parser (cli.py).
torch and transformers are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import ConvLlavaError, DataError

log = logging.getLogger(__name__)

CHAT_HELP = """commands inside the chat:
  /image PATH   switch to another image (starts a new conversation)
  /noimage      continue without an image (starts a new conversation)
  /reset        forget the conversation, keep the image
  /help         this list
  /quit         leave (also Ctrl-D)"""


# --- shared options -------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (config.json, weights, tokenizer)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: the dtype the weights were saved in)",
    )
    p.add_argument(
        "--template", default="llm-jp-v1", help="chat template of the prompts (default: %(default)s)"
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


def _generation_config(args: argparse.Namespace):
    from .generation import GenerationConfig

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

    from .generation import VLMPipeline

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return VLMPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, template=args.template
    )


# --- chat -----------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    from ..data.images import load_image
    from .generation import GenerationRequest

    config = _generation_config(args)
    pipeline = _load_pipeline(args)
    image = None
    image_name = None

    def set_image(path: str | None) -> None:
        nonlocal image, image_name
        if path is None:
            image, image_name = None, None
            return
        image = load_image(Path(path).expanduser())  # ImageError names the file
        image_name = path

    if args.image:
        set_image(args.image)
    history: list[tuple[str, str]] = []
    out = sys.stdout
    interactive = sys.stdin.isatty()
    print(f"画像: {image_name or '(なし)'} — /help でコマンド一覧", file=out, flush=True)
    while True:
        try:
            line = input("あなた> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                print(CHAT_HELP, file=out, flush=True)
            elif command == "/reset":
                history.clear()
                print("(会話をリセットしました)", file=out, flush=True)
            elif command == "/image" and not rest.strip():
                print("usage: /image PATH", file=out, flush=True)
            elif command in ("/image", "/noimage"):
                try:
                    set_image(rest.strip() if command == "/image" else None)
                except ConvLlavaError as err:
                    print(f"error: {err}", file=out, flush=True)
                    continue
                history.clear()
                print(f"(画像: {image_name or 'なし'}; 新しい会話)", file=out, flush=True)
            else:
                print(f"unknown command {command}; /help lists them", file=out, flush=True)
            continue
        images = [image] if image is not None else []
        request = GenerationRequest(pipeline.question_messages(line, len(images), history), images)
        print("AI> ", end="", file=out, flush=True)
        answer = ""
        try:
            for piece in pipeline.stream(request, config):
                answer += piece
                print(piece, end="", file=out, flush=True)
        except ConvLlavaError as err:  # e.g. the conversation outgrew the context
            print(f"\nerror: {err} (/reset starts over)", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history.append((line, answer))
    return 0


# --- predict --------------------------------------------------------------------------------
def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(id, record) of each JSONL line; id from "id", "question_id", or the line number."""
    records: list[tuple[str, dict]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        rid = record.get("id", record.get("question_id", number))
        rid = str(rid)
        if rid in seen:
            raise DataError(f"{path}:{number}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
        records.append((rid, record))
    return records


def _done_ids(path: Path) -> set[str]:
    """Ids already in an output file; an incomplete last line (killed run) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as f:
            f.truncate(end)
    done = set()
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path}:{number}: not an output line of predict (no id); move the file away"
                ) from None
    return done


def _record_request(rid: str, record: dict, root: Path, pipeline):
    """A GenerationRequest from {"image"|"images", "question"|"messages"}."""
    from .generation import GenerationRequest

    raw_images = record.get("images", record.get("image"))
    if raw_images is None:
        raw_images = []
    elif isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list) or not all(isinstance(x, str) for x in raw_images):
        raise DataError(f"record {rid}: image / images must be a path or a list of paths")
    images = [p if Path(p).is_absolute() else str(root / p) for p in raw_images]
    if "messages" in record:
        return GenerationRequest(record["messages"], images)
    question = record.get("question", record.get("text", record.get("prompt")))
    if not isinstance(question, str):
        raise DataError(f"record {rid}: needs a 'question' string (or 'messages')")
    return GenerationRequest(pipeline.question_messages(question, len(images)), images)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    inp, outp = Path(args.input), Path(args.output)
    records = _read_records(inp)
    done = _done_ids(outp)
    todo = [(rid, r) for rid, r in records if rid not in done]
    if done:
        log.info("resuming: %d of %d records already in %s", len(records) - len(todo), len(records), outp)
    if not todo:
        log.info("nothing to do: all %d records are in %s", len(records), outp)
        return 0
    config = _generation_config(args)
    pipeline = _load_pipeline(args)
    root = Path(args.image_root) if args.image_root else inp.parent
    outp.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with outp.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="predict", unit="rec") as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            encoded, ok = [], []
            for rid, record in chunk:
                try:
                    e = pipeline.encode(_record_request(rid, record, root, pipeline))
                    pipeline.check_fits(e, config)
                except ConvLlavaError as err:  # skipped, not written: a rerun tries it again
                    log.error("record %s: %s", rid, err)
                    failed += 1
                    continue
                encoded.append(e)
                ok.append(rid)
            if encoded:
                results = pipeline.generate([], config, batch_size=len(encoded), encoded=encoded)
                for rid, result in zip(ok, results):
                    row = {
                        "id": rid,
                        "answer": result.text,
                        "finish_reason": result.finish_reason,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                    }
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
            bar.update(len(chunk))
    log.info("wrote %d answers to %s", len(todo) - failed, outp)
    if failed:
        log.error("%d records failed (see above); rerun to retry them", failed)
        return 1
    return 0


# --- serve / webui --------------------------------------------------------------------------
def _add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=port, help="TCP port, 0 = any free one (default: %(default)s)")
    p.add_argument("--model-name", help="model id clients send (default: the model directory's name)")
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


def _load_batcher(args: argparse.Namespace):
    from .batching import ContinuousBatcher

    pipeline = _load_pipeline(args)
    return ContinuousBatcher(
        pipeline,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerConfig, bind_socket, serve

    bind_socket(args.host, args.port).close()  # fail before loading the model if the port is taken
    allow = Path(args.allow_local_files).resolve() if args.allow_local_files else None
    if allow is not None and not allow.is_dir():
        raise ConvLlavaError(f"--allow-local-files {args.allow_local_files}: not a directory")
    config = ServerConfig(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get("CONVLLAVA_API_KEY") or None,
        allow_local_files=allow,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        request_timeout_s=args.request_timeout,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
    )
    serve(_load_batcher(args), config, args.host, args.port)
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from .server import bind_socket
    from .webui import launch_webui, require_gradio

    require_gradio()
    bind_socket(args.host, args.port).close()
    launch_webui(
        _load_batcher(args),
        host=args.host,
        port=args.port,
        model_name=args.model_name or Path(args.model).resolve().name,
        default_max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.request_timeout,
    )
    return 0


# --- parser ---------------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `chat`, `predict`, `serve` and `webui` to a `convllava-jp` subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "chat",
        help="chat about an image in the terminal (multi-turn, streamed)",
        description="Multi-turn chat about an image; answers are printed as they are generated.\n\n"
        + CHAT_HELP,
        formatter_class=fmt,
    )
    _add_model_args(p)
    p.add_argument("--image", metavar="PATH", help="image to talk about (default: none; /image PATH later)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "predict",
        help="answer a JSONL file of questions in batches (resumable)",
        description=(
            "Answer every line of a JSONL file, in batches, writing one JSON line per answer.\n\n"
            'input lines:  {"id": "q1", "image": "img.png", "question": "何色ですか？"}\n'
            '              ("images": [...] for several, "messages": [...] for a whole conversation;\n'
            "               without an id the line number is the id; image paths are relative to\n"
            "               --image-root, by default the input file's folder)\n"
            'output lines: {"id", "answer", "finish_reason", "prompt_tokens", "completion_tokens"}\n\n'
            "Rerunning with the same --output skips the ids already written, so an interrupted run\n"
            "continues where it stopped. Records that fail (missing image, too long) are logged,\n"
            "not written, and the exit code is 1."
        ),
        formatter_class=fmt,
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

    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)",
        description=(
            "Serve the model over an OpenAI-compatible API; concurrent requests are batched together.\n\n"
            "  from openai import OpenAI\n"
            '  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")\n'
            "  client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': [\n"
            "      {'type': 'text', 'text': '画像を説明してください。'},\n"
            "      {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}]}])\n\n"
            "Images come as base64 data: URLs (local paths only under --allow-local-files).\n"
            "Bad input gets a 4xx JSON error in OpenAI's shape; a full queue gets 503."
        ),
        formatter_class=fmt,
    )
    _add_model_args(p)
    _add_server_args(p, port=8000)
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $CONVLLAVA_API_KEY or none)"
    )
    p.add_argument(
        "--allow-local-files",
        metavar="DIR",
        help="let image_url name files under DIR (file:///... or a path); off by default",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default: %(default)s)"
    )
    g.add_argument("--max-images", type=int, default=4, help="images per request (default: %(default)s)")
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=25_000_000,
        help="width x height per image, checked before decoding (default: %(default)s)",
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
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
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
