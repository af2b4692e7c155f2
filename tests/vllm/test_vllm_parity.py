"""vLLM gives VLMPipeline's greedy answers token for token (fp32, CPU), on both roads.

- plugin: `vllm.LLM(model=OUR_DIR)` loads our model dir as it is through our plugin
  (`convllava_jp.vllm_plugin`, found by vLLM through the `vllm.general_plugins` entry point);
- export: `vllm.LLM(model=EXPORT, model_impl="transformers")` on `export --format transformers`.

Runs in the vLLM venv (`.ci/vllm`), on cases built in the main venv by `build_vllm_cases.py`
(`$CONVLLAVA_VLLM_CASES` names their folder). Skipped where vLLM is not importable or no cases
were built, so the main suite runs without vLLM. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker, a small KV cache): a start takes seconds, not
the ~45 s of vLLM's default processes; `test_vllm_serve.py` covers those.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
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
RUNS = [(name, "plugin") for name in sorted(CASES)]
RUNS += [(name, "export") for name in sorted(CASES) if CASES[name]["hf_dir"]]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{name}-{road}" for name, road in RUNS])
def served(request):
    """(name, case, vllm.LLM) on the case's model dir (plugin) or its export (Transformers backend)."""
    name, road = request.param
    case = CASES[name]
    model = (
        {"model": case["model_dir"]}
        if road == "plugin"
        else {"model": case["hf_dir"], "model_impl": "transformers"}
    )
    llm = vllm.LLM(
        **model,
        dtype="float32",
        max_model_len=case["max_model_len"],
        enforce_eager=True,
        seed=0,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=256 * 2**20,
    )
    yield f"{name}-{road}", case, llm
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
    """All prompts at once (vLLM batches them): same prompt ids (as many image tokens per image as
    ours, keep-aspect sizes included), same answer ids."""
    name, case, llm = served
    outputs = _answers(llm, case, case["prompts"])
    for i, (p, out) in enumerate(zip(case["prompts"], outputs)):
        image = Path(p["image"]).name
        assert out.prompt_token_ids.count(case["image_token_id"]) == p["image_tokens"], f"{name} {image}"
        assert list(out.prompt_token_ids) == p["prompt_ids"], f"{name} prompt {i}: prompt ids differ"
        if name.endswith("-export") and _resampled_noise(p["image"]):
            # The export's own (CLIP) image processor resamples a non-square image slightly
            # differently (docs/vllm.md); on random noise that changes a random model's answer.
            continue
        got = [t for t in out.outputs[0].token_ids if t not in case["stop_token_ids"]]
        assert got == p["answer_ids"], f"{name} prompt {i} ({image}): answer differs"


def _resampled_noise(image: str) -> bool:
    """A random-noise image that is not square (the tall 300x80 ones): resized by the processor."""
    from PIL import Image

    with Image.open(image) as opened:
        width, height = opened.size
    return Path(image).name.startswith("random_") and width != height


def test_keep_aspect_case_mixes_token_counts():
    """The keep-aspect case really has images of different token counts (the budget included)."""
    case = CASES.get("keep-aspect")
    if case is None:
        pytest.skip("no keep-aspect case built")
    counts = {p["image_tokens"] for p in case["prompts"]}
    assert len(counts) > 1 and max(counts) <= 10, counts
