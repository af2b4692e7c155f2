"""Inference benchmarks: latency with one image vs the bare LLM, batched predict, server concurrency.

    PYTHONPATH=src python benchmarks/bench_infer.py                  # random `small` preset model
    PYTHONPATH=src python benchmarks/bench_infer.py --model DIR      # an existing model directory

1. Time to first token and decode tokens/s for one image + question, through
   `VLMPipeline.generate` (transformers' generate) and the server's `ContinuousBatcher`, against
   the bare language model's `generate` on a prompt of the same length (target >= 0.95x).
2. `VLMPipeline.generate` throughput over the same requests at several batch sizes.
3. The real server (a subprocess) with 1, 4, 8, 16 concurrent clients vs one client asking
   sequentially, and that speed-up against the ceiling: the language model alone decoding as many
   rows at once (step time at batch N vs batch 1), measured in the same run just before and just
   after the server rows (their mean). Target (issue 18): server / ceiling >= 0.9 at 8 and 16.
4. Peak RSS of this process and of the server.

`--quick` runs only the ceiling and the server at 1, 8, 16 clients and writes
nowhere unless `--output` is given (for iterating on the engine).

With random weights the EOS row of the output layer is zeroed, so every answer runs to the token
limit and all paths generate the same number of tokens. Prints Markdown tables and writes them to
docs/benchmarks-infer.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from _rss import peak_rss_mb  # benchmarks/ is on sys.path when a script runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from convllava_jp.infer.batching import ContinuousBatcher  # noqa: E402
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest, VLMPipeline  # noqa: E402

log = logging.getLogger("bench_infer")
QUESTION = "画像を説明してください。"


# --- model ----------------------------------------------------------------------------------
def build_random_model(preset: str, out_dir: Path) -> Path:
    """A model directory of `preset` with random weights and the synthetic world's tokenizer."""
    from convllava_jp.demo.tokenizer import train_tokenizer
    from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, get_preset
    from convllava_jp.model.image_processing import ConvLlavaImageProcessor
    from convllava_jp.model.model_dir import save_model_dir
    from convllava_jp.model.processing import ConvLlavaProcessor, add_image_token
    from convllava_jp.model.templates import LLM_JP_SYSTEM_PROMPT

    texts = [
        LLM_JP_SYSTEM_PROMPT,
        "ユーザー: 画像を説明してください。 システム: 左上に赤い円があります。",
    ] * 8
    tokenizer = train_tokenizer(texts, vocab_size=512)
    image_token_id = add_image_token(tokenizer)
    p = get_preset(preset)
    config = build_config(p, image_token_id=image_token_id)
    torch.manual_seed(0)
    model = ConvLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # answers run to max_new_tokens on every path
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
    processor = ConvLlavaProcessor(
        ConvLlavaImageProcessor(image_size=p.image_size, mode=p.image_mode, stride=config.image_stride),
        tokenizer,
    )
    return save_model_dir(model, processor, out_dir)


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- 1. latency -----------------------------------------------------------------------------
@dataclass
class Latency:
    path: str
    prompt_tokens: int
    ttft_s: float
    decode_tps: float


def bench_latency(pipeline: VLMPipeline, image: Image.Image, new_tokens: int, repeats: int) -> list[Latency]:
    """Each path timed for 1 and for `new_tokens` tokens; paths interleaved round by round (the
    machine's load drifts), medians over `repeats` rounds. decode tokens/s = (N - 1) / (t_N - t_1)."""
    request = GenerationRequest(pipeline.question_messages(QUESTION, 1), [image])
    encoded = pipeline.encode(request)
    n_prompt = len(encoded.input_ids)
    one, full = GenerationConfig(max_new_tokens=1), GenerationConfig(max_new_tokens=new_tokens)

    # the bare LLM: same prompt length, text ids only, transformers' generate
    lm = pipeline.model.language_model
    tok = pipeline.tokenizer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(300, len(tok) - 1, (1, n_prompt), generator=g).to(pipeline.device)
    mask = torch.ones_like(ids)

    def bare(cfg: GenerationConfig) -> None:
        with torch.inference_mode():
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                **cfg.to_hf(),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        assert out.shape[1] == n_prompt + cfg.max_new_tokens

    batcher = ContinuousBatcher(pipeline, batch_wait_s=0).start()
    paths = {
        "bare LLM generate (same prompt length, no image)": bare,
        "VLMPipeline.generate (1 image, preprocessed)": lambda cfg: pipeline.generate(
            [], cfg, encoded=[encoded]
        ),
        "VLMPipeline.generate (1 image, from PIL: preprocess + tokenize)": lambda cfg: pipeline.generate(
            [request], cfg
        ),
        "ContinuousBatcher (server engine, 1 image)": lambda cfg: batcher.generate(encoded, cfg),
    }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
    try:
        for run in paths.values():
            run(one)  # warm-up
        for round_ in range(repeats):
            for name, run in paths.items():
                for cfg, bucket in ((one, times[name][0]), (full, times[name][1])):
                    start = time.perf_counter()
                    run(cfg)
                    bucket.append(time.perf_counter() - start)
            log.info("latency round %d/%d done", round_ + 1, repeats)
    finally:
        batcher.close()
    rows = []
    for name, (t1, tn) in times.items():
        first, whole = statistics.median(t1), statistics.median(tn)
        rows.append(Latency(name, n_prompt, first, (new_tokens - 1) / (whole - first)))
        log.info("%s: ttft %.1f ms, decode %.1f tok/s", name, first * 1000, rows[-1].decode_tps)
    return rows


class StepProbe:
    """Decode steps of the language model alone at `context` cached tokens, for several batch
    sizes: the ceiling of what batching can gain on this machine. Caches are built once and cut
    back to `context` after each measurement, so it can be repeated around every server row."""

    def __init__(self, pipeline: VLMPipeline, batch_sizes: list[int], context: int = 128):
        self.lm = pipeline.model.language_model
        self.device = pipeline.device
        self.context = context
        torch.manual_seed(0)
        self.caches, self.tokens = {}, {}
        with torch.inference_mode():
            for b in batch_sizes:
                ids = torch.randint(300, 400, (b, context), device=self.device)
                self.caches[b], self.tokens[b] = self.lm(input_ids=ids, use_cache=True).cache, ids[:, -1:]

    @torch.inference_mode()
    def measure(self, batch_sizes: list[int], rounds: int = 5, steps: int = 4) -> dict[int, float]:
        """Batch size -> median ms per step; batch sizes take turns (the load drifts), `steps`
        steps each per round after one warm-up step."""
        times: dict[int, list[float]] = {b: [] for b in batch_sizes}
        for _ in range(rounds):
            for b in batch_sizes:
                for i in range(steps + 1):
                    start = time.perf_counter()
                    out = self.lm(
                        input_ids=self.tokens[b],
                        cache=self.caches[b],
                        use_cache=True,
                        position_ids=torch.full((b, 1), self.context + i, device=self.device),
                    )
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times[b].append(time.perf_counter() - start)
                    self.caches[b] = out.cache
                for layer in self.caches[b].layers:  # back to `context` tokens
                    layer.keys, layer.values = (
                        layer.keys[:, :, : self.context],
                        layer.values[:, :, : self.context],
                    )
        return {b: statistics.median(t) * 1000 for b, t in times.items()}


def bench_decode_steps(probe: StepProbe, batch_sizes: list[int]) -> list[tuple[int, float]]:
    """(batch size, ms per decode step) of the language model alone."""
    ms = probe.measure(batch_sizes)
    log.info("decode steps (ms): %s", ", ".join(f"batch {b}: {ms[b]:.1f}" for b in batch_sizes))
    return [(b, ms[b]) for b in batch_sizes]


# --- 2. batched predict -----------------------------------------------------------------------
@dataclass
class PredictRow:
    batch_size: int
    requests: int
    seconds: float
    tokens: int


def bench_predict(
    pipeline: VLMPipeline, images: list[Image.Image], batch_sizes: list[int], n_requests: int, new_tokens: int
) -> list[PredictRow]:
    requests = [
        GenerationRequest(pipeline.question_messages(QUESTION + "。" * (i % 3), 1), [images[i % len(images)]])
        for i in range(n_requests)
    ]
    encoded = [pipeline.encode(r) for r in requests]
    config = GenerationConfig(max_new_tokens=new_tokens)
    pipeline.generate([], GenerationConfig(max_new_tokens=2), encoded=encoded[:1])  # warm-up
    rows = []
    for bs in batch_sizes:
        start = time.perf_counter()
        results = pipeline.generate([], config, batch_size=bs, encoded=encoded)
        seconds = time.perf_counter() - start
        rows.append(PredictRow(bs, n_requests, seconds, sum(r.completion_tokens for r in results)))
        log.info("predict batch %d: %.1f s, %.1f tok/s", bs, seconds, rows[-1].tokens / seconds)
    return rows


# --- 3. server ------------------------------------------------------------------------------
@dataclass
class ServerRow:
    clients: int
    requests: int
    seconds: float
    tokens: int
    p50_latency_s: float
    mean_ttft_s: float  # submit to the first token, inside the server (its /health counters)
    mean_batch: float  # tokens per decode step, from the server's /health counters
    llm_step_ms: float  # the LLM alone, one step at batch `clients`, measured just before and after


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_clients(url: str, clients: int, bodies: list[dict]) -> tuple[list[float], int]:
    """`clients` threads post the bodies (each taken once); returns (latencies, completion tokens)."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    todo = iter(bodies)

    def worker() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    body = next(todo, None)
                if body is None:
                    return
                start = time.perf_counter()
                response = http.post(url + "/v1/chat/completions", json=body)
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    pool = [threading.Thread(target=worker) for _ in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, tokens[0]


def bench_server(
    model_dir: Path,
    images: list[Image.Image],
    client_counts: list[int],
    n_requests: int,
    new_tokens: int,
    device: str,
    threads: int | None,
    probe: StepProbe,
    extra_args: list[str] = (),
    dtype: str | None = None,
) -> tuple[list[ServerRow], float]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "convllava_jp.cli", "serve", "--model", str(model_dir)]
    args += [
        "--port",
        str(port),
        "--model-name",
        "bench",
        "--device",
        device,
        "--max-batch-size",
        str(max(client_counts)),
    ]
    if threads:
        args += ["--num-threads", str(threads)]
    if dtype:  # the server runs what the ceiling is measured on
        args += ["--dtype", dtype]
    args += list(extra_args)
    log_file = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)
    proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; log in {log_file.name}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        urls = [png_data_url(im) for im in images]

        def body(i: int) -> dict:
            content = [
                {"type": "text", "text": QUESTION + "。" * (i % 3)},
                {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
            ]
            return {
                "model": "bench",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": new_tokens,
                "temperature": 0,
            }

        with httpx.Client(timeout=600) as warm:
            warm.post(url + "/v1/chat/completions", json={**body(0), "max_tokens": 2}).raise_for_status()
        rows = []
        for clients in client_counts:
            around = probe.measure(sorted({1, clients}), rounds=2, steps=3)
            before = httpx.get(url + "/health").json()["stats"]
            start = time.perf_counter()
            latencies, tokens = _run_clients(url, clients, [body(i) for i in range(n_requests)])
            seconds = time.perf_counter() - start
            after = httpx.get(url + "/health").json()["stats"]
            later = probe.measure(sorted({1, clients}), rounds=2, steps=3)
            mean_batch = (after["tokens"] - before["tokens"]) / max(after["steps"] - before["steps"], 1)
            firsts = max(after.get("first_tokens", 0) - before.get("first_tokens", 0), 1)
            ttft = (after.get("first_token_s", 0.0) - before.get("first_token_s", 0.0)) / firsts
            rows.append(
                ServerRow(
                    clients,
                    n_requests,
                    seconds,
                    tokens,
                    statistics.median(latencies),
                    ttft,
                    mean_batch,
                    (around[clients] + later[clients]) / 2,
                )
            )
            log.info(
                "server %d clients: %.1f s, %.1f tok/s, mean batch %.1f, %d prefills (%d joined a running batch)",
                clients,
                seconds,
                tokens / seconds,
                mean_batch,
                after["prefills"] - before["prefills"],
                after["joined_running"] - before["joined_running"],
            )
        server_rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    return rows, server_rss


# --- report ---------------------------------------------------------------------------------
def speedups(steps: list[tuple[int, float]]) -> dict[int, float]:
    """Batch size -> tokens/s at that batch over tokens/s at batch 1."""
    base = dict(steps)[1]
    return {b: b * base / ms for b, ms in steps}


def ceiling_rows(server: list[ServerRow], before, after) -> list[tuple]:
    """Per server row: (clients, server speed-up vs 1 client, LLM-alone speed-up before and after
    the server rows, their ratio; the same ratio from the LLM-alone steps measured around each row)."""
    seq = server[0]
    up_before, up_after = speedups(before), speedups(after)
    rows = []
    for row in server[1:]:
        if row.clients not in up_before:
            continue
        ceiling = (up_before[row.clients] + up_after[row.clients]) / 2
        up = row.tokens / row.seconds / (seq.tokens / seq.seconds)
        # Each row's tokens/s over the LLM alone's at its batch size, measured around it: the load
        # the two rows ran under cancels out.
        share = row.tokens / row.seconds * row.llm_step_ms / (1000 * row.clients)
        share_seq = seq.tokens / seq.seconds * seq.llm_step_ms / 1000
        rows.append(
            (row.clients, up, up_before[row.clients], up_after[row.clients], up / ceiling, share / share_seq)
        )
    return rows


def render_ceiling(server: list[ServerRow], before, after) -> list[str]:
    lines = [
        "",
        "## Server vs the ceiling (the language model alone at the same batch), one run",
        "",
        "Server speed-up: tokens/s at N clients over tokens/s at 1 client (table above). Ceiling: the "
        "LLM-alone decode speed-up at batch N (table of decode steps), measured just before and just "
        "after the server rows; ratio = server speed-up / mean ceiling (target >= 0.9). Load-adjusted: "
        "each server row's tokens/s as a share of the LLM alone's tokens/s at its batch size, measured "
        "right before and after that row, over the same share at 1 client (equal to the ratio when "
        "the load stays the same; the load of other processes cancels out).",
        "",
        "| concurrent clients | server speed-up | ceiling before | ceiling after | ratio | load-adjusted ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for clients, up, c0, c1, ratio, adjusted in ceiling_rows(server, before, after):
        lines.append(f"| {clients} | {up:.2f}x | {c0:.2f}x | {c1:.2f}x | {ratio:.2f} | {adjusted:.2f} |")
    return lines


def render_server(server: list[ServerRow]) -> list[str]:
    seq = server[0].tokens / server[0].seconds
    lines = [
        "",
        f"## Server (`serve`, continuous batching, {server[0].requests} requests per row)",
        "",
        "| concurrent clients | seconds | requests/s | tokens/s | vs sequential | median latency (s) | mean time to first token (s) | mean batch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in server:
        tps = row.tokens / row.seconds
        name = f"{row.clients}" + (" (sequential)" if row.clients == 1 else "")
        lines.append(
            f"| {name} | {row.seconds:.1f} | {row.requests / row.seconds:.2f} | {tps:.1f} | {tps / seq:.2f}x | "
            f"{row.p50_latency_s:.2f} | {row.mean_ttft_s:.2f} | {row.mean_batch:.1f} |"
        )
    return lines


def render(
    args,
    model_desc: str,
    latency: list[Latency],
    steps: list[tuple[int, float]],
    steps_after: list[tuple[int, float]],
    predict: list[PredictRow],
    server: list[ServerRow],
    bench_rss: float,
    server_rss: float,
) -> str:
    lines = [
        "# Inference benchmarks",
        "",
        f"{time.strftime('%Y-%m-%d')}, `benchmarks/bench_infer.py{' --quick' if args.quick else ''}`; "
        f"{model_desc}; device {args.device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; load average "
        f"{args.load_before:.1f} before the run and {args.load_after:.1f} after (other processes share "
        f"the CPUs). Greedy decoding, {args.new_tokens} new tokens per answer.",
    ]
    if latency:
        lines += [
            "",
            "## Latency: one image vs the bare LLM",
            "",
            "| path | prompt tokens | time to first token (ms) | decode tokens/s | decode vs bare LLM |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        base = latency[0].decode_tps
        for row in latency:
            lines.append(
                f"| {row.path} | {row.prompt_tokens} | {row.ttft_s * 1000:.1f} | {row.decode_tps:.1f} | "
                f"{row.decode_tps / base:.2f}x |"
            )
    lines += [
        "",
        f"## Decode step of the language model alone vs batch size ({steps[0][0]} to {steps[-1][0]} rows, 128 cached tokens)",
        "",
        "What batching can gain at most on this machine: tokens/s of pure decoding (measured before the "
        "server rows; `after`: the same after them).",
        "",
        "| batch size | ms per step | tokens/s | vs batch 1 | ms per step after | vs batch 1 after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    up, up_after = speedups(steps), speedups(steps_after)
    for (b, ms), (_, ms_after) in zip(steps, steps_after):
        lines.append(
            f"| {b} | {ms:.1f} | {b * 1000 / ms:.1f} | {up[b]:.2f}x | {ms_after:.1f} | {up_after[b]:.2f}x |"
        )
    if predict:
        lines += [
            "",
            f"## Batched predict (`VLMPipeline.generate`, {predict[0].requests} requests, left padding)",
            "",
            "| batch size | seconds | requests/s | tokens/s | vs batch 1 |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in predict:
            tps = row.tokens / row.seconds
            lines.append(
                f"| {row.batch_size} | {row.seconds:.1f} | {row.requests / row.seconds:.2f} | {tps:.1f} | "
                f"{tps / (predict[0].tokens / predict[0].seconds):.2f}x |"
            )
    if server:
        lines += render_server(server)
        lines += render_ceiling(server, steps, steps_after)
    lines += [
        "",
        "## Memory",
        "",
        "| process | peak RSS (MiB) |",
        "| --- | ---: |",
        f"| benchmark (pipeline, batcher, predict) | {bench_rss:.0f} |",
    ]
    if server:
        lines.append(f"| server | {server_rss:.0f} |")
    return "\n".join(lines) + "\n"


OWN_SECTIONS = ("Latency", "Decode step", "Batched predict", "Server (", "Server vs the ceiling", "Memory")


def other_sections(path: Path) -> str:
    """The sections of the file at `path` this benchmark does not write (kept after its report)."""
    if not path.exists():
        return ""
    sections = path.read_text(encoding="utf-8").split("\n## ")[1:]
    kept = [s for s in sections if not s.startswith(OWN_SECTIONS)]
    return "".join("\n## " + s.rstrip("\n") + "\n" for s in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: a random model of --preset)")
    parser.add_argument("--preset", default="small", help="preset of the random model (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--new-tokens", type=int, help="tokens per answer (default: 128)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="latency repeats, median taken (default: %(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per predict / server row (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-sizes", default="1,2,4,8,16", help="predict batch sizes (default: %(default)s)"
    )
    parser.add_argument("--clients", help="server concurrency levels (default: 1,4,8,16, quick: 1,8,16)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument passed on to `convllava-jp serve` (repeatable), e.g. --server-arg=--batch-wait-ms=20",
    )
    parser.add_argument("--skip-server", action="store_true", help="only latency and predict")
    parser.add_argument(
        "--quick", action="store_true", help="only the ceiling and the server at 1, 8, 16 clients"
    )
    parser.add_argument(
        "--output", help="Markdown file to write (default: docs/benchmarks-infer.md; quick: none)"
    )
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or 128
    args.clients = args.clients or ("1,8,16" if args.quick else "1,4,8,16")
    if args.output is None and not args.quick:
        args.output = str(ROOT / "docs" / "benchmarks-infer.md")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            log.info("building a random %s model", args.preset)
            model_dir = build_random_model(args.preset, Path(tmp) / f"random-{args.preset}")
        pipeline = VLMPipeline.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
        n_params = sum(p.numel() for p in pipeline.model.parameters())
        size = pipeline.processor.image_processor.image_size
        size = size if isinstance(size, int) else max(size)
        model_desc = f"model {args.model or 'random ' + args.preset} ({n_params / 1e6:.0f}M parameters, {pipeline.model.dtype}, {size} px)"
        images = [make_image((size + 64 * i, size), seed=i) for i in range(4)]

        latency, predict = [], []
        if not args.quick:
            latency = bench_latency(pipeline, images[0], args.new_tokens, args.repeats)
            predict = bench_predict(
                pipeline,
                images,
                [int(b) for b in args.batch_sizes.split(",")],
                args.requests,
                args.new_tokens,
            )
        bench_rss = peak_rss_mb()
        probe = StepProbe(pipeline, [1, 4, 8, 16])
        steps = bench_decode_steps(probe, [1, 4, 8, 16])
        server, server_rss = [], float("nan")
        if not args.skip_server:
            server, server_rss = bench_server(
                model_dir,
                images,
                [int(c) for c in args.clients.split(",")],
                args.requests,
                args.new_tokens,
                args.device,
                args.threads,
                probe,
                args.server_arg,
                args.dtype,
            )
        steps_after = bench_decode_steps(probe, [1, 4, 8, 16])
    args.load_after = os.getloadavg()[0]
    report = render(args, model_desc, latency, steps, steps_after, predict, server, bench_rss, server_rss)
    print(report)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + other_sections(out), encoding="utf-8")
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
