"""The model: splice, text-only parity, KV-cache generation, save/load, presets, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from convllava_jp import ConfigError, TemplateError
from convllava_jp.model import ConvLlavaForConditionalGeneration, build_config, build_projector
from convllava_jp.model.model_dir import load_model_dir

IMG = 99  # image placeholder id of the hand-built model (outside the 96-token vocabulary)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = build_config("tiny", vocab_size=96, image_token_id=IMG)
    return ConvLlavaForConditionalGeneration(config).eval()


def _slow_reference_embeds(model, input_ids, images_per_sample):
    """Per-sample, per-position loop: what the vectorised splice must equal."""
    embed = model.get_input_embeddings()
    rows = []
    for ids, images in zip(input_ids, images_per_sample):
        feats = [model.projector(model.encode_images(img[None]))[0] for img in images]
        flat = torch.cat(feats) if feats else torch.zeros(0, embed.embedding_dim)
        k = 0
        row = []
        for t in ids.tolist():
            if t == IMG:
                row.append(flat[k])
                k += 1
            else:
                row.append(embed.weight[t])
        assert k == flat.shape[0]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_splice_equals_slow_reference_on_mixed_batch(model):
    torch.manual_seed(1)
    a = torch.randn(3, 128, 128)
    b = torch.randn(3, 192, 128)  # another size: 3x2 = 6 tokens
    c = torch.randn(3, 128, 128)
    ids = torch.full((3, 16), 5)
    ids[0, 2:6] = IMG  # sample 0: one 128x128 image (4 tokens)
    ids[1, 1:7] = IMG  # sample 1: the 192x128 image (6 tokens) ...
    ids[1, 9:13] = IMG  # ... then a 128x128 one
    # sample 2: text only
    ids[:, -1] = 7
    with torch.no_grad():
        fast = model.splice_image_features(ids, [a, b, c])
        slow = _slow_reference_embeds(model, ids, [[a], [b, c], []])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


def test_placeholder_image_mismatch_is_an_error(model):
    ids = torch.tensor([[1, IMG, IMG, IMG, 2]])  # 3 placeholders, an image gives 4 tokens
    with pytest.raises(TemplateError, match="do not match"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128))
    with pytest.raises(TemplateError, match="no images"):
        model(input_ids=ids)


def test_text_only_logits_equal_bare_llm(model):
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        bare = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(ours, bare, rtol=0, atol=0)


def test_generate_with_kv_cache_equals_loop_without_cache(model):
    torch.manual_seed(2)
    ids = torch.tensor([[3, IMG, IMG, IMG, IMG, 8, 9, 10]])
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        seq = ids
        for _ in range(8):  # no cache: the whole sequence (and the image) every step
            logits = model(input_ids=seq, pixel_values=pixels, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()


def test_generate_encodes_the_image_once(model, monkeypatch):
    calls = []
    original = model.encode_images

    def counting(pixel_values):
        calls.append(pixel_values.shape)
        return original(pixel_values)

    monkeypatch.setattr(model, "encode_images", counting)
    ids = torch.tensor([[3, IMG, IMG, IMG, IMG, 8]])
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            pixel_values=torch.randn(1, 3, 128, 128),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert len(calls) == 1


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = ConvLlavaForConditionalGeneration.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(auto) is ConvLlavaForConditionalGeneration
    assert AutoConfig.from_pretrained(tmp_path).model_type == "convllava_jp"


def test_gradient_checkpointing_gives_the_same_gradients(model):
    torch.manual_seed(3)
    ids = torch.tensor([[3, IMG, IMG, IMG, IMG, 8, 9, 10, 11]])
    pixels = torch.randn(1, 3, 128, 128)

    def grads(checkpointing: bool):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMG, -100)).loss.backward()
        model.eval()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        plain, ckpt = grads(False), grads(True)
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
    assert plain.keys() == ckpt.keys()
    assert any(n.startswith("vision_tower.encoder.stages.4") for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], rtol=1e-5, atol=1e-6)


def test_full_preset_stage5_shape_on_meta_device():
    config = build_config("convllava-jp-1.3b-768")
    with torch.device("meta"):
        model = ConvLlavaForConditionalGeneration(config)
        feats = model.vision_tower(torch.empty(2, 3, 768, 768)).last_hidden_state
    assert tuple(feats.shape) == (2, 3072, 12, 12)
    assert model.config.image_tokens(768, 768) == 144
    drop = [layer.drop_path.drop_prob for layer in model.vision_tower.encoder.stages[4].layers]
    assert drop[0] == pytest.approx(0.085) and drop[-1] == pytest.approx(0.1) and len(drop) == 6


def test_stage5_off_gives_stride_32():
    config = build_config("convllava-jp-1.3b-768", stage5_depth=0)
    assert config.vision_config.num_stages == 4 and config.image_stride == 32
    assert config.image_tokens(768, 768) == 576


def test_parameter_counts_trainable_only(model):
    from convllava_jp.model.modeling import parameter_counts

    full = parameter_counts(model)
    assert parameter_counts(model, trainable_only=True) == full
    try:
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        for stage in model.vision_tower.encoder.stages[model.config.trunk_stages :]:
            stage.requires_grad_(True)
        counts = parameter_counts(model, trainable_only=True)
    finally:
        model.requires_grad_(True)
    assert counts.keys() == full.keys()
    assert counts["vision_trunk"] == 0 and counts["llm"] == 0
    assert counts["projector"] == full["projector"] > 0 and counts["stage5"] == full["stage5"] > 0
    assert counts["total"] == full["projector"] + full["stage5"]


def test_bad_presets_and_projectors():
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("nope")
    with pytest.raises(ConfigError, match="projector"):
        build_projector("mlp2x_relu", 8, 8)
    assert len(build_projector("mlp3x_gelu", 8, 4)) == 5
    assert len(build_projector("linear", 8, 4)) == 1


def test_info_cli_reports_article_numbers():
    def info(*args):
        out = subprocess.run(
            [sys.executable, "-m", "convllava_jp.cli", "info", "--json", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    full = info("--preset", "convllava-jp-1.3b-768")
    assert round(full["params"]["total"] / 1e9, 2) == 2.10
    assert full["image_tokens"] == 144 and full["image_size"] == [768, 768]
    assert info("--preset", "convllava-jp-1.3b-1280", "--image-size", "1280x960")["image_tokens"] == 300


@pytest.mark.parametrize(
    "size,tokens", [("768", 144), ("1024", 256), ("1280", 400), ("1536", 576), ("640x1280", 200)]
)
def test_info_token_table(size, tokens, capsys):
    from convllava_jp.cli import main

    assert main(["info", "--json", "--image-size", size]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens"] == tokens


def test_tiny_preset_is_small(capsys):
    from convllava_jp.cli import main

    assert main(["info", "--json", "--preset", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] < 10_000_000
    assert main(["info", "--preset", "nope"]) == 2


def test_model_dir_with_processor_trains_one_step(tiny_model_dir, tiny_world):
    """A model dir from init: the processor's placeholder id is the model's; a loss goes down a step."""
    model, processor = load_model_dir(tiny_model_dir)
    assert model.config.image_token_id == processor.image_token_id
    record = json.loads((tiny_world / "stage3.json").read_text())[0]
    enc = processor.encode_conversation(record["conversations"], images=[str(tiny_world / record["image"])])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, pixel_values=enc.pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_image_placeholder_is_never_generated(tmp_path):
    """Suppressed through the generation config (not in `forward`), also after save/load."""
    torch.manual_seed(0)
    config = build_config("tiny", vocab_size=96, image_token_id=5)  # an id inside the vocabulary
    model = ConvLlavaForConditionalGeneration(config).eval()
    assert model.generation_config.suppress_tokens == [5]
    with torch.no_grad():
        # make it the model's favourite token at every position: a constant feature feeds its row
        model.language_model.transformer.ln_f.bias[0] += 10.0
        model.language_model.lm_head.weight[5, 0] += 100.0
    model.save_pretrained(tmp_path)
    reloaded = ConvLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.generation_config.suppress_tokens == [5]
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        assert torch.equal(logits, model.language_model(input_ids=prompt).logits)  # forward is the plain LM
        assert logits[0, -1].argmax().item() == 5
        for m in (model, reloaded):
            out = m.generate(
                input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            assert 5 not in out[0, 3:].tolist()


def test_set_image_token_id_moves_the_suppressed_token():
    model = ConvLlavaForConditionalGeneration(build_config("tiny", vocab_size=96, image_token_id=0))
    model.generation_config.suppress_tokens = [0, 7]
    model.set_image_token_id(90)
    assert model.config.image_token_id == 90
    assert model.generation_config.suppress_tokens == [7, 90]  # token 0 is an ordinary token again


def test_no_split_modules_come_from_the_language_model_and_the_vision_tower():
    from transformers import LlamaConfig

    gpt2 = ConvLlavaForConditionalGeneration(build_config("tiny", vocab_size=96))
    assert gpt2._no_split_modules == {"ConvNextLayer", "ConvNextStage", "GPT2Block"}
    llama_text = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    with torch.device("meta"):
        llama = ConvLlavaForConditionalGeneration(build_config("tiny", text_config=llama_text))
    assert llama._no_split_modules == {"ConvNextLayer", "ConvNextStage", "LlamaDecoderLayer"}


def test_gradient_checkpointing_kwargs_reach_every_checkpoint(model, monkeypatch):
    import transformers.modeling_utils

    calls = []
    original = transformers.modeling_utils.checkpoint

    def recording(function, *args, **kwargs):
        calls.append((type(getattr(function, "__self__", function)).__name__, kwargs))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", recording)
    ids = torch.tensor([[3, IMG, IMG, IMG, IMG, 8]])
    try:
        model.train()
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}
        )
        assert model.is_activation_checkpointing
        model(
            input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128), labels=ids.masked_fill(ids == IMG, -100)
        )
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert not model.is_activation_checkpointing
    kinds = [kind for kind, _ in calls]
    assert kinds.count("ConvNextStage") == len(model.vision_tower.encoder.stages)
    assert len(kinds) - kinds.count("ConvNextStage") == model.config.text_config.n_layer  # one per LLM block
    assert all(kwargs == {"use_reentrant": False, "preserve_rng_state": False} for _, kwargs in calls)


def test_cpu_inference_encodes_big_batches_in_chunks(model, monkeypatch):
    """Without gradients the tower takes at most CPU_TOWER_PIXELS per call; the same features."""
    import convllava_jp.model.modeling as modeling

    model.eval()
    torch.manual_seed(0)
    size = 64
    pixels = torch.randn(5, 3, size, size)
    whole = model.encode_images(pixels)  # gradients on: one call, as training runs it
    calls = []
    hook = model.vision_tower.embeddings.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    monkeypatch.setattr(modeling, "CPU_TOWER_PIXELS", 2 * size * size)
    try:
        with torch.no_grad():
            chunked = model.encode_images(pixels)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5, rtol=1e-4)
