"""--dtype on the CPU: bf16 weights read straight from the files, "auto", and the CPU fast path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from convllava_jp.infer.generation import VLMPipeline
from convllava_jp.model import model_dir as md
from convllava_jp.model.fast_inference import RowLinear, prepare_cpu_inference
from convllava_jp.model.modeling import ConvLlavaForConditionalGeneration


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_on_load_equals_transformers_cast(tiny_model_dir, dtype):
    ours, _ = md.load_model_dir(tiny_model_dir, dtype=dtype)
    theirs = ConvLlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=dtype)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_keep_in_fp32_modules_stay_fp32(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(ConvLlavaForConditionalGeneration, "_keep_in_fp32_modules_strict", ["projector"])
    model, _ = md.load_model_dir(tiny_model_dir, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.language_model.parameters())


_RSS_PROBE = """
import json, resource, sys
import torch
from convllava_jp.model.model_dir import load_model
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
_ = load_model(sys.argv[1]); del _  # warm-up: lazy imports; the fp32 weights stay memory-mapped, untouched
before = rss()
model = load_model(sys.argv[1], dtype="bfloat16")
print(json.dumps({"grown_mb": rss() - before, "dtype": str(model.dtype)}))
"""


def test_bf16_load_never_holds_an_fp32_copy(tiny_model_dir, tmp_path):
    """Peak RSS of a bf16 load of an fp32 dir: the bf16 model and one tensor, not the fp32 model."""
    from dataclasses import replace

    from convllava_jp.model import build_config, get_preset

    base = get_preset("tiny")
    text = {**base.text, "n_embd": 384, "n_layer": 12, "n_head": 4, "vocab_size": 512}
    config = build_config(replace(base, text=text), image_token_id=511)
    torch.manual_seed(0)
    ConvLlavaForConditionalGeneration(config).save_pretrained(tmp_path / "m")
    fp32_mb = (tmp_path / "m" / "model.safetensors").stat().st_size / 2**20
    assert fp32_mb > 80
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(tmp_path / "m")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "torch.bfloat16"
    assert result["grown_mb"] < 0.75 * fp32_mb, (result, fp32_mb)


def test_auto_dtype_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(md, "native_bf16", lambda device="cpu": True)
    assert md.resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(md, "native_bf16", lambda device="cpu": False)
    assert md.resolve_dtype("auto", "cpu") is None
    assert md.resolve_dtype("bf16") is torch.bfloat16
    assert md.native_bf16("auto") is False and md.native_bf16("meta") is False


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_row_linear_computes_the_same_layer(layer):
    torch.manual_seed(0)
    src = nn.Linear(24, 40) if layer == "linear" else Conv1D(40, 24)
    nn.init.normal_(src.bias)
    fast = RowLinear.from_module(src)
    for shape in [(1, 1, 24), (1, 24), (3, 5, 24)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), src(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 1, 24)
    with torch.inference_mode():
        torch.testing.assert_close(
            fast.to(torch.bfloat16)(x.bfloat16()), src.to(torch.bfloat16)(x.bfloat16()), rtol=0.02, atol=0.02
        )


def test_fast_path_applies_to_reduced_precision_on_cpu_only(tiny_model_dir):
    model, _ = md.load_model_dir(tiny_model_dir)
    assert prepare_cpu_inference(model) is False
    assert not any(isinstance(m, RowLinear) for m in model.modules())
    model, _ = md.load_model_dir(tiny_model_dir, dtype="bfloat16")
    reference = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    assert prepare_cpu_inference(model) is True
    linears = [m for m in model.language_model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert not linears and any(isinstance(m, RowLinear) for m in model.language_model.modules())
    assert model.vision_tower.embeddings.patch_embeddings.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    for name, value in model.language_model.state_dict().items():  # same values; Conv1D stored (out, in)
        old = reference[name]
        assert torch.equal(value, old) or torch.equal(value, old.t()), name


def test_pipeline_takes_the_fast_path_for_bf16_only(tiny_model_dir):
    exact = VLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert exact.model.dtype == torch.float32 and not any(
        isinstance(m, RowLinear) for m in exact.model.modules()
    )
    fast = VLMPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16").model
    assert any(isinstance(m, RowLinear) for m in fast.modules())
    plain, _ = md.load_model_dir(tiny_model_dir, dtype="bfloat16")
    n = plain.config.image_tokens(64, 64)
    ids = torch.cat([torch.full((1, n), plain.config.image_token_id), torch.arange(5, 17)[None]], 1)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        a = plain(input_ids=ids, pixel_values=pixels).logits.float()
        b = fast(input_ids=ids, pixel_values=pixels).logits.float()
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
        # one-row decoding steps (the GEMV path) agree with the plain model's too
        out = fast.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        step = plain(input_ids=out[:, :-1], pixel_values=pixels).logits[:, -1].float()
        last = fast(input_ids=out[:, :-1], pixel_values=pixels).logits[:, -1].float()
        torch.testing.assert_close(last, step, rtol=0.05, atol=0.05)
