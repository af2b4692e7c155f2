"""init_model: the stage-1 start model from a pretrained LLM and trunk, written as a model dir."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from convllava_jp.convert.init import init_model
from convllava_jp.errors import CheckpointError, ConfigError
from convllava_jp.model import ConvLlavaForConditionalGeneration
from convllava_jp.model.model_dir import load_model_dir, save_model_dir

from ._support import small_timm, text_columns, text_ids, tiny_preset, word_tokenizer, write_llm


def test_init_model_writes_a_loadable_dir_with_the_source_weights(tmp_path):
    src_llm = write_llm(tmp_path / "llm", vocab_size=60)
    ref = small_timm()
    save_file(ref.state_dict(), tmp_path / "trunk.safetensors")

    out = tmp_path / "stage0"
    init_model(tiny_preset(), out, llm=str(tmp_path / "llm"), vision=str(tmp_path / "trunk.safetensors"))
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model, processor = load_model_dir(out)
    assert isinstance(model, ConvLlavaForConditionalGeneration)
    # LLM weights are the source's, untouched (vocab 60 > 53 tokens: no resize).
    src_sd, ours = src_llm.state_dict(), model.language_model.state_dict()
    assert src_sd.keys() == ours.keys()
    assert all(torch.equal(src_sd[k], ours[k]) for k in src_sd)
    with torch.no_grad():
        assert torch.equal(
            text_columns(model(input_ids=text_ids()).logits, model),
            text_columns(src_llm(text_ids()).logits, model),
        )
    # Trunk from the timm checkpoint; stage 5 present and fresh.
    assert torch.equal(
        model.vision_tower.encoder.stages[3].layers[0].layer_scale_parameter, ref.stages[3].blocks[0].gamma
    )
    assert len(model.vision_tower.encoder.stages) == 5
    # Tokenizer + processor.
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == processor.image_token_id == 52
    assert processor.tokenizer.pad_token == "</s>"
    assert processor.image_processor.image_size == 128 and processor.image_processor.mode == "pad"
    assert processor.stride == model.config.image_stride == 64
    assert model.get_input_embeddings().num_embeddings == 60


def test_init_model_resizes_only_when_the_image_token_has_no_row(tmp_path):
    src_llm = write_llm(tmp_path / "llm", vocab_size=52)  # exactly the tokenizer's 52 tokens
    out = tmp_path / "out"
    model = init_model(tiny_preset(), out, llm=str(tmp_path / "llm"), dtype="bfloat16")
    assert model.config.image_token_id == 52
    assert model.get_input_embeddings().num_embeddings == 53
    reloaded, _ = load_model_dir(out)
    assert reloaded.dtype == torch.bfloat16  # saved dtype kept
    wte = reloaded.language_model.transformer.wte.weight
    assert torch.equal(wte[:52], src_llm.transformer.wte.weight.to(torch.bfloat16))
    fp32, _ = load_model_dir(out, dtype="float32")
    assert fp32.dtype == torch.float32


def test_init_model_of_a_preset_without_llm_or_trunk(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        init_model("tiny", tmp_path / "out")
    word_tokenizer().save_pretrained(tmp_path / "tok")
    model = init_model("tiny", tmp_path / "out", tokenizer=str(tmp_path / "tok"))
    assert model.config.image_token_id == 52
    assert model.get_input_embeddings().num_embeddings == 53  # the tokenizer's vocabulary, <image> included
    reloaded, processor = load_model_dir(tmp_path / "out")
    assert processor.image_processor.image_size == 128 and len(processor.tokenizer) == 53
    assert torch.equal(reloaded.projector[0].weight, model.projector[0].weight)
    # the tiny LLM is drawn at its preset's scale (0.08 at width 128), not GPT-2's 0.02
    llm = model.language_model
    for weight in (llm.get_input_embeddings().weight, llm.transformer.h[0].attn.c_attn.weight):
        assert abs(weight.detach().std().item() - 0.08) < 0.01


def test_save_model_dir_refuses_to_replace_a_foreign_directory(tmp_path):
    write_llm(tmp_path / "llm")
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model directory"):
        init_model(tiny_preset(), out, llm=str(tmp_path / "llm"))
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm", "results"]


def test_save_model_dir_replaces_an_older_model_dir(tmp_path):
    write_llm(tmp_path / "llm")
    out = tmp_path / "out"
    init_model(tiny_preset(), out, llm=str(tmp_path / "llm"))
    (out / "stale-shard.safetensors").write_text("old")
    model, processor = load_model_dir(out)
    save_model_dir(model, processor, out)
    assert not (out / "stale-shard.safetensors").exists()
    assert load_model_dir(out)[0].config.image_token_id == model.config.image_token_id
