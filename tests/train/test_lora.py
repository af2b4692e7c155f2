"""LoRA on the LLM (peft): what trains, what is saved, and that the merged model is the trained one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from convllava_jp.data.collate import DataCollator
from convllava_jp.data.dataset import ConversationDataset
from convllava_jp.data.records import DataSource
from convllava_jp.errors import ConfigError
from convllava_jp.model.model_dir import load_model_dir
from convllava_jp.model.modeling import parameter_counts
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.lora import DEFAULT_TARGET_MODULES, apply_lora, default_target_modules, merge_lora
from convllava_jp.train.recipe import LoraSpec, StageConfig
from convllava_jp.train.stages import run_stage

from .conftest import TEST_DEFAULTS


def _stage(tiny_world, **kw) -> StageConfig:
    body = {**TEST_DEFAULTS, "lr": 5e-3, "max_steps": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    body.update(kw)
    return StageConfig(
        name="3",
        data=[{"path": str(tiny_world / "stage3.json")}],
        template="llm-jp-v1",
        trainable=["projector", "llm"],
        **body,
    )


def test_default_targets_per_llm_family():
    assert default_target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(default_target_modules("llama"))
    assert set(DEFAULT_TARGET_MODULES) >= {"gpt2", "llama", "gpt_neox"}
    with pytest.raises(ConfigError, match="target_modules"):
        default_target_modules("some_new_arch")


def test_lora_trains_adapters_and_projector_only(tiny_model_dir):
    model, _ = load_model_dir(tiny_model_dir)
    apply_trainable(model, ["projector"], allow_empty=True)
    n_adapters = apply_lora(model, LoraSpec(r=4, alpha=8))
    counts = parameter_counts(model, trainable_only=True)
    assert counts["llm"] == n_adapters > 0
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters())
    assert counts["vision_trunk"] == counts["stage5"] == 0
    trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # GPT-2 (tiny: 2 layers): c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each layer, A and B each.
    assert len(trainable) == 2 * 4 * 2


def test_lora_stage_saves_a_merged_plain_model(tiny_world, tiny_model_dir, tmp_path):
    stage = _stage(tiny_world)
    result = run_stage(stage, tiny_model_dir, tmp_path / "stage3", resume=False)
    assert result.steps == 4
    n_lora = result.trainable_params["llm"]
    assert (
        0
        < n_lora
        < 0.2 * sum(v.numel() for k, v in _weights(tiny_model_dir).items() if "language_model" in k)
    )

    # The output is a plain model directory: no peft keys, loads with from_pretrained.
    saved = _weights(tmp_path / "stage3" / "model")
    init = _weights(tiny_model_dir)
    assert saved.keys() == init.keys()
    assert not any("lora" in k or "base_model" in k for k in saved)
    model, processor = load_model_dir(tmp_path / "stage3" / "model")
    # The merged LLM weights moved only where LoRA adapts (attention / MLP projections)...
    moved = {k for k in init if not torch.equal(init[k], saved[k])}
    llm_moved = {k for k in moved if k.startswith("language_model.")}
    assert llm_moved and all(k.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for k in llm_moved)
    # ...the projector trained in full, and the frozen vision tower did not move.
    assert any(k.startswith("projector.") for k in moved)
    assert not any(k.startswith("vision_tower.") for k in moved)
    assert type(model.language_model).__name__ == "GPT2LMHeadModel"


def test_merged_model_equals_the_adapted_one(tiny_world, tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir)
    apply_trainable(model, ["projector"], allow_empty=True)
    spec = LoraSpec(r=4, alpha=8)
    apply_lora(model, spec)
    # Give the adapters non-zero weights (B starts at 0), as training would.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ds = ConversationDataset(
        [DataSource(tiny_world / "stage3.json", max_samples=4)], processor, "llm-jp-v1", 96
    )
    batch = DataCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    batch.pop("skipped")
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = merge_lora(model, spec)
        plain = merged(**batch).logits
    assert type(merged.language_model).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-4)


def test_qlora_without_cuda_is_a_clear_error(tiny_world, tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    stage = _stage(tiny_world, lora={"r": 4, "alpha": 8, "bits": 4})
    with pytest.raises(ConfigError, match="QLoRA.*CUDA"):
        run_stage(stage, tiny_model_dir, tmp_path / "q")


def test_lora_spec_validation(tiny_world):
    with pytest.raises(ConfigError, match="bits"):
        LoraSpec(bits=8)
    with pytest.raises(ConfigError, match="lora.r"):
        LoraSpec(r=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        _stage(tiny_world, lora={"rank": 4})
    with pytest.raises(ConfigError, match="does not list llm"):
        StageConfig(name="3", data=[{"path": "x.json"}], trainable=["projector"], lora={"r": 4})
    assert LoraSpec(target_modules="c_attn, c_fc").target_modules == ["c_attn", "c_fc"]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))
