"""Load and fault figures of `convllava-jp serve`: 64 clients, good traffic with and without hostile traffic.

    PYTHONPATH=src python benchmarks/bench_serve_load.py                # random `tiny` model, CPU
    PYTHONPATH=src python benchmarks/bench_serve_load.py --model DIR --device cuda --seconds 60

A real server subprocess on 127.0.0.1 (nothing else is contacted). Two phases of `--seconds` each:
1. clean: `--clients` clients send only good requests (greedy; one image, streamed, several images,
   text only, images at the pixel limits) back to back;
2. mixed: the same good clients, plus a quarter as many hostile ones cycling through every kind of
   bad request the server refuses (malformed / deeply nested JSON, wrong Content-Type or Host, no
   key, values no sampler honours, oversized stop strings / text / body, bad / EPS / bomb images,
   too many images or pixels), requests mapped to documented behaviour (temperature 1e-38, top_p
   1e-300), clients that disconnect mid-stream and clients that time out.

Prints requests served, the 4xx by kind, the 5xx (must be 0), good requests that failed or whose
greedy answer differs from the clean phase (must be 0), p50/p99 latency of the good requests in
both phases, and the server's peak RSS (VmHWM). Record the table in docs/serving.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_infer import _free_port, _peak_rss_mb, build_random_model, make_image  # noqa: E402

KEY = "bench-key"
NAME = "bench"
QUESTION = "画像を説明してください。"


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def raw_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb_png() -> bytes:
    import struct
    import zlib

    raw = bytearray(base64.b64decode(png_url(Image.new("RGB", (8, 8))).split(",", 1)[1]))
    i = raw.index(b"IHDR")
    raw[i + 4 : i + 12] = struct.pack(">II", 100_000, 100_000)
    raw[i + 17 : i + 21] = struct.pack(">I", zlib.crc32(bytes(raw[i : i + 17])))
    return bytes(raw)


class Payloads:
    """The good and hostile request bodies, built once."""

    def __init__(self, max_tokens: int, image_pixels: int, request_pixels: int):
        side = int(image_pixels**0.5)
        self.small = [png_url(make_image((96 + 32 * i, 80 + 16 * i), seed=i)) for i in range(4)]
        self.large = png_url(Image.new("RGB", (side, image_pixels // side), (90, 140, 200)))
        self.n_large = max(1, request_pixels // (side * (image_pixels // side)))
        self.max_tokens = max_tokens
        self.eps = raw_url(
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
        )
        self.bomb = raw_url(bomb_png())

    def body(self, urls: list[str], question: str = QUESTION, **extra) -> dict:
        content = [{"type": "text", "text": question}] + [
            {"type": "image_url", "image_url": {"url": u}} for u in urls
        ]
        return {
            "model": NAME,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            **extra,
        }

    def good(self, i: int) -> tuple[str, dict]:
        """(kind, body) of the i-th good request; the same i gives the same body (and answer)."""
        kind = ["one_image", "streamed", "several_images", "text_only", "one_image", "pixel_limit"][i % 6]
        question = QUESTION + "。" * (i % 5)
        if kind == "several_images":
            return kind, self.body(self.small[: 2 + i % 3], question)
        if kind == "text_only":
            return kind, self.body([], question)
        if kind == "pixel_limit":
            return kind, self.body([self.large] * self.n_large, question)
        return kind, self.body([self.small[i % 4]], question, stream=kind == "streamed")

    def hostile(self) -> list[tuple[str, dict]]:
        """(kind, request spec): spec has a body (json or raw bytes) and optional headers / actions."""
        b = self.body([self.small[0]])
        raw = json.dumps(b).encode()
        long_text = json.dumps(self.body([], "あ" * 1_500_000), ensure_ascii=False).encode()
        too_large = json.dumps({**b, "padding": "x" * 21 * 2**20}).encode()
        return [
            ("malformed_json", {"content": b'{"model": "bench", "messages": ['}),
            ("deeply_nested_json", {"content": b'{"model": "bench", "messages": ' + b"[" * 200_000}),
            ("text_plain", {"content": raw, "content_type": "text/plain"}),
            ("bad_host", {"json": b, "host": "rebind.example"}),
            ("no_api_key", {"json": b, "key": None}),
            ("seed_2_64", {"json": {**b, "temperature": 1, "seed": 2**64}}),
            ("repetition_penalty_1e-300", {"json": {**b, "temperature": 1, "repetition_penalty": 1e-300}}),
            ("temperature_nan", {"content": raw.replace(b'"temperature": 0', b'"temperature": NaN')}),
            ("temperature_1e-38 (200)", {"json": {**b, "temperature": 1e-38}}),
            ("top_p_1e-300 (200)", {"json": {**b, "temperature": 2, "top_p": 1e-300, "seed": 1}}),
            ("too_many_stops", {"json": {**b, "stop": ["x"] * 17}}),
            ("stop_too_long", {"json": {**b, "stop": ["x" * 100_000]}}),
            ("text_too_long", {"content": long_text}),
            ("body_too_large", {"content": too_large}),
            ("bad_base64", {"json": self.body(["data:image/png;base64,@@@"])}),
            ("not_an_image", {"json": self.body([raw_url(b"plain text")])}),
            ("eps_image", {"json": self.body([self.eps])}),
            ("bomb_png", {"json": self.body([self.bomb])}),
            ("too_many_images", {"json": self.body(self.small * 2)}),
            ("too_many_pixels", {"json": self.body([self.large] * (self.n_large + 1))}),
            ("remote_url", {"json": self.body(["https://example.com/x.png"])}),
            ("unknown_model", {"json": {**b, "model": "gpt-4o"}}),
            ("disconnect_mid_stream", {"json": {**b, "stream": True, "max_tokens": 400}, "disconnect": True}),
            ("client_timeout", {"json": {**b, "max_tokens": 400}, "timeout": 0.3}),
        ]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter[tuple[str, str]] = Counter()  # (kind, status)
        self.latencies: list[float] = []
        self.good_failed: list[str] = []
        self.mismatches = 0
        self.served = 0

    def add(self, kind: str, status: str, latency: float | None = None) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            if status == "200":
                self.served += 1
            if latency is not None:
                self.latencies.append(latency)


def good_client(http: httpx.Client, url: str, payloads: Payloads, ids, stop: float, tally: Tally, answers):
    headers = {"Authorization": f"Bearer {KEY}"}
    while time.monotonic() < stop:
        i = next(ids) % 60
        kind, body = payloads.good(i)
        start = time.perf_counter()
        try:
            if body.get("stream"):
                text = ""
                with http.stream("POST", url, json=body, headers=headers) as r:
                    status = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            data = json.loads(line[6:])
                            if "error" in data:
                                status = 500
                            for choice in data.get("choices", []):
                                text += choice["delta"].get("content") or ""
            else:
                r = http.post(url, json=body, headers=headers)
                status = r.status_code
                text = r.json()["choices"][0]["message"]["content"] if status == 200 else r.text
        except httpx.HTTPError as err:
            status, text = type(err).__name__, ""
        latency = time.perf_counter() - start
        tally.add("good:" + kind, str(status), latency if status == 200 else None)
        with tally.lock:
            if status != 200:
                tally.good_failed.append(f"{kind}: {status} {text[:200]}")
            elif answers.setdefault(i, text) != text:
                tally.mismatches += 1


def hostile_client(url: str, specs, offset: int, stop: float, tally: Tally) -> None:
    """Cycle through the hostile kinds on one connection pool (bodies pre-encoded: the client's
    own CPU must not be what slows the good clients down)."""
    with httpx.Client(timeout=120) as http:
        for kind, spec in itertools.islice(itertools.cycle(specs), offset, None):
            if time.monotonic() >= stop:
                return
            headers = {"Content-Type": spec.get("content_type", "application/json")}
            if spec.get("key", KEY):
                headers["Authorization"] = f"Bearer {KEY}"
            if "host" in spec:
                headers["Host"] = spec["host"]
            timeout = spec.get("timeout", 120)
            try:
                if spec.get("disconnect"):
                    with http.stream(
                        "POST", url, headers=headers, content=spec["content"], timeout=timeout
                    ) as r:
                        status = str(r.status_code)
                        for line in r.iter_lines():
                            if '"content"' in line and '"content": ""' not in line:
                                status = "left mid-stream"
                                break
                else:
                    status = str(
                        http.post(url, headers=headers, content=spec["content"], timeout=timeout).status_code
                    )
            except httpx.TimeoutException:
                status = "client timed out"
            except httpx.HTTPError as err:
                status = type(err).__name__
            tally.add(kind, status)


def run_phase(
    base: str, payloads: Payloads, clients: int, hostile: int, seconds: float, answers, skip=()
) -> Tally:
    url = base + "/v1/chat/completions"
    tally = Tally()
    stop = time.monotonic() + seconds
    ids = itertools.count(random.Random(0).randrange(60))
    specs = [(kind, spec) for kind, spec in payloads.hostile() if kind.split(" ")[0] not in skip]
    for _, spec in specs:
        if "json" in spec:
            spec["content"] = json.dumps(spec.pop("json")).encode()
    limits = httpx.Limits(max_connections=clients + 8)
    with httpx.Client(timeout=600, limits=limits) as http:
        threads = [
            threading.Thread(target=good_client, args=(http, url, payloads, ids, stop, tally, answers))
            for _ in range(clients - hostile)
        ]
        threads += [
            threading.Thread(target=hostile_client, args=(url, specs, k * 5, stop, tally))
            for k in range(hostile)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return tally


def start_server(model_dir: Path, args) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "convllava_jp.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--model-name", NAME, "--api-key", KEY, "--device", args.device]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--request-timeout", str(args.request_timeout)]
    if args.threads:
        cmd += ["--num-threads", str(args.threads)]
    log_path = Path(tempfile.mkstemp(suffix=".log", prefix="serve-load-")[1])
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; log in {log_path}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, log_path
        except httpx.HTTPError:
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(clean: Tally, mixed: Tally, rss: tuple[float, float], health: dict, seconds: float) -> str:
    five_xx = sum(n for (kind, status), n in mixed.statuses.items() if status.startswith("5"))
    five_xx += sum(n for (kind, status), n in clean.statuses.items() if status.startswith("5"))
    lines = [
        "| phase | good served | good failed | answers differing | p50 s | p99 s | peak server RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t, r in (("clean", clean, rss[0]), ("mixed", mixed, rss[1])):
        good = sum(n for (k, s), n in t.statuses.items() if k.startswith("good:") and s == "200")
        lines.append(
            f"| {name} | {good} | {len(t.good_failed)} | {t.mismatches} | {pct(t.latencies, 50):.2f} | "
            f"{pct(t.latencies, 99):.2f} | {r:.0f} |"
        )
    lines += [
        "",
        f"{seconds:g} s per phase; 5xx in both phases: {five_xx}",
        "",
        "| hostile kind | answers |",
        "|---|---|",
    ]
    kinds: dict[str, Counter] = {}
    for (kind, status), n in mixed.statuses.items():
        if not kind.startswith("good:"):
            kinds.setdefault(kind, Counter())[status] += n
    for kind in sorted(kinds):
        lines.append(f"| {kind} | {', '.join(f'{s} x{n}' for s, n in sorted(kinds[kind].items()))} |")
    stats = health["stats"]
    lines += ["", "server counters: " + ", ".join(f"{k} {v}" for k, v in stats.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: a random model of --preset)")
    parser.add_argument("--preset", default="tiny", help="preset of the random model (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of each phase (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length of good requests")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--image-pixels", type=int, default=16_000_000, help="the server's per-image default")
    parser.add_argument(
        "--request-pixels", type=int, default=32_000_000, help="the server's per-request default"
    )
    parser.add_argument(
        "--skip", default="", help="hostile kinds left out, comma-separated (to find a costly one)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_random_model(args.preset, Path(tmp) / "model")
        payloads = Payloads(args.max_tokens, args.image_pixels, args.request_pixels)
        proc, base, log_path = start_server(model_dir, args)
        try:
            answers: dict[int, str] = {}
            hostile = max(1, args.clients // 4)
            clean = run_phase(base, payloads, args.clients - hostile, 0, args.seconds, answers)
            rss_clean = _peak_rss_mb(proc.pid)
            skip = set(filter(None, args.skip.split(",")))
            mixed = run_phase(base, payloads, args.clients, hostile, args.seconds, answers, skip)
            rss_mixed = _peak_rss_mb(proc.pid)
            health = httpx.get(base + "/health", timeout=30).json()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(report(clean, mixed, (rss_clean, rss_mixed), health, args.seconds))
    failed = clean.good_failed + mixed.good_failed
    for line in failed[:10]:
        print("good request failed:", line)
    print(f"server log: {log_path}")
    five_xx = any(s.startswith("5") for t in (clean, mixed) for (_, s) in t.statuses)
    return 1 if failed or five_xx or clean.mismatches or mixed.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
