"""vLLM serves exported models with VLMPipeline's greedy answers, token for token (fp32, CPU).

Runs in the vLLM venv (`.ci/vllm`), on cases built in the main venv by `build_vllm_cases.py`
(`$CONVLLAVA_VLLM_CASES` names their folder). Skipped where vLLM is not importable or no cases
were built, so the main suite runs without vLLM.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

vllm = pytest.importorskip("vllm")
if not hasattr(vllm, "LLM"):  # tests/ on sys.path makes this folder a namespace package "vllm"
    pytest.skip("vllm is not installed here", allow_module_level=True)
CASES_DIR = os.environ.get("CONVLLAVA_VLLM_CASES")
if not CASES_DIR or not (Path(CASES_DIR) / "cases.json").is_file():
    pytest.skip(
        "no vLLM parity cases: run tests/vllm/build_vllm_cases.py, set CONVLLAVA_VLLM_CASES",
        allow_module_level=True,
    )
CASES = json.loads((Path(CASES_DIR) / "cases.json").read_text())


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request):
    """(case, vllm.LLM) on the case's exported dir through vLLM's Transformers backend."""
    case = CASES[request.param]
    llm = vllm.LLM(
        model=case["hf_dir"],
        model_impl="transformers",
        dtype="float32",
        gpu_memory_utilization=float(os.environ.get("CONVLLAVA_VLLM_MEMORY", "0.15")),
        max_model_len=case["max_model_len"],
        enforce_eager=True,
        seed=0,
    )
    yield request.param, case, llm
    del llm
    gc.collect()


def _answers(llm, case, prompts):
    from PIL import Image

    params = vllm.SamplingParams(
        temperature=0.0,
        max_tokens=case["max_new_tokens"],
        stop_token_ids=case["stop_token_ids"],
        # VLMPipeline never generates the image placeholder (generation_config.suppress_tokens)
        logit_bias={case["image_token_id"]: -1e9},
        skip_special_tokens=False,
    )
    inputs = [
        {"prompt": p["prompt"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
        for p in prompts
    ]
    return llm.generate(inputs, params, use_tqdm=False)


def test_greedy_answers_equal_pipeline(served):
    """All prompts at once (vLLM batches them): same prompt ids (image tokens included), same answer."""
    name, case, llm = served
    outputs = _answers(llm, case, case["prompts"])
    for i, (p, out) in enumerate(zip(case["prompts"], outputs)):
        assert list(out.prompt_token_ids) == p["prompt_ids"], f"{name} prompt {i}: prompt ids differ"
        got = [t for t in out.outputs[0].token_ids if t not in case["stop_token_ids"]]
        assert got == p["answer_ids"], f"{name} prompt {i} ({Path(p['image']).name}): answer differs"
