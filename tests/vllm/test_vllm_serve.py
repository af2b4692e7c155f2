"""`vllm serve` answers the `openai` client: images (data URLs), streaming, concurrent requests.

Two servers, one per road: `vllm serve OUR_DIR` (our plugin; the keep-aspect case, which only the
plugin serves: mixed token counts per image) and `vllm serve EXPORT --model-impl transformers`
(the demo-shaped case). Runs in the vLLM venv on the cases `build_vllm_cases.py` wrote (see
test_vllm_parity.py); the answers must be VLMPipeline's (greedy, the model dir's chat template
applied by vLLM's chat endpoint).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

vllm = pytest.importorskip("vllm")
if not hasattr(vllm, "LLM"):  # tests/ on sys.path makes this folder a namespace package "vllm"
    pytest.skip("vllm is not installed here", allow_module_level=True)
openai = pytest.importorskip("openai")
CASES_DIR = os.environ.get("CONVLLAVA_VLLM_CASES")
if not CASES_DIR or not (Path(CASES_DIR) / "cases.json").is_file():
    pytest.skip("no vLLM cases: run tests/vllm/build_vllm_cases.py", allow_module_level=True)
CASES = json.loads((Path(CASES_DIR) / "cases.json").read_text())
ROADS = {"plugin": "keep-aspect", "export": "demo-gpt2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(road: str, case: dict) -> list[str]:
    vllm_bin = str(Path(sys.executable).parent / "vllm")
    if road == "plugin":  # our model dir as it is: the chat template and content format from it
        argv = [vllm_bin, "serve", case["model_dir"]]
    else:
        argv = [vllm_bin, "serve", case["hf_dir"], "--model-impl", "transformers"]
        argv += ["--chat-template-content-format", "openai"]
    argv += ["--dtype", "float32", "--max-model-len", str(case["max_model_len"]), "--enforce-eager"]
    return argv + ["--gpu-memory-utilization", "0.15", "--served-model-name", "demo"]


@pytest.fixture(scope="module", params=sorted(ROADS))
def server(request, tmp_path_factory):
    """(openai client, case) of a running `vllm serve` on the road's case."""
    case = CASES[ROADS[request.param]]
    if request.param == "export" and not case["hf_dir"]:
        pytest.skip("no export for this case")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    argv = _argv(request.param, case) + ["--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"vllm serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(2)
    yield client, case
    proc.terminate()
    proc.wait(timeout=60)


def _messages(prompt: dict) -> list[dict]:
    data = base64.b64encode(Path(prompt["image"]).read_bytes()).decode()
    question = prompt["prompt"].split("<image>\n", 1)[1].rsplit(" システム: ", 1)[0]
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": question},
            ],
        }
    ]


def _token_id(logprob) -> int:
    return int(logprob.token.removeprefix("token_id:"))


def _ask(client, case: dict, prompt: dict, stream: bool = False) -> list[int]:
    """The answer's token ids (logprobs with `return_tokens_as_token_ids`: a random model's text is
    byte soup, which detokenizers may render differently)."""
    kwargs = {
        "model": "demo",
        "messages": _messages(prompt),
        "temperature": 0.0,
        "max_tokens": case["max_new_tokens"],
        "logit_bias": {str(case["image_token_id"]): -100},
        "logprobs": True,
        "extra_body": {"stop_token_ids": case["stop_token_ids"], "return_tokens_as_token_ids": True},
    }
    if not stream:
        content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    else:
        chunks = client.chat.completions.create(stream=True, **kwargs)
        content = [
            lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content
        ]
    return [t for t in map(_token_id, content) if t not in case["stop_token_ids"]]


def test_chat_with_image_answers_as_pipeline(server):
    client, case = server
    prompt = case["prompts"][0]
    assert _ask(client, case, prompt) == prompt["answer_ids"]


def test_streaming_gives_the_same_answer(server):
    client, case = server
    prompt = case["prompts"][1]
    assert _ask(client, case, prompt, stream=True) == prompt["answer_ids"]


def test_concurrent_requests(server):
    """All prompts at once (images of different token counts in the keep-aspect case)."""
    client, case = server
    prompts = case["prompts"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: _ask(client, case, p), prompts))
    assert answers == [p["answer_ids"] for p in prompts]
