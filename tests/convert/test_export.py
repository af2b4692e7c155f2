"""`export --format transformers`: FastVLM dirs that plain transformers loads, with our logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from convllava_jp.cli import main
from convllava_jp.convert.export import ExportError, export_model_dir
from convllava_jp.convert.init import make_processor, prepare_tokenizer
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest, VLMPipeline
from convllava_jp.model import ConvLlavaForConditionalGeneration
from convllava_jp.model.model_dir import load_model_dir, save_model_dir
from convllava_jp.model.presets import build_config

# head_dim 32 everywhere: the size vLLM's CPU attention accepts, so the same shapes serve there.
TEXT_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
    },
}


def build_model_dir(
    out, tokenizer_dir, family="gpt2", mode="pad", projector="mlp2x_gelu", tied=False, seed=0, **text
):
    """A random tiny-preset model dir (5-stage ConvNeXt, 128 px) with the given LLM family."""
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text_dict = {**TEXT_CONFIGS[family], "vocab_size": len(tok) + 1, "tie_word_embeddings": tied, **text}
    config = build_config("tiny", text_config=AutoConfig.for_model(**text_dict), projector_type=projector)
    model = ConvLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # layer scale starts at 1e-6: make every weight matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prepare_tokenizer(tok, model)
    save_model_dir(model, make_processor(tok, 128, mode, model.config.image_stride), out)
    return out


def _image(seed=0, size=(128, 128)):
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _our_logits(model_dir, image, question="何色?"):
    model, processor = load_model_dir(model_dir)
    messages = VLMPipeline.question_messages(question)
    enc = processor.encode_conversation(messages, [image], add_generation_prompt=True)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([enc.input_ids]), pixel_values=torch.stack(enc.pixel_values)
        ).logits
    return enc, processor.render(messages, add_generation_prompt=True), logits


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_export_reloads_with_plain_transformers_and_our_logits(tiny_world, tmp_path, family):
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", family)
    dst = export_model_dir(src, tmp_path / "hf")
    image = _image()
    enc, prompt, ours = _our_logits(src, image)

    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(dst)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    # The exported processor expands <image> to as many ids as ours, and the same pixels.
    assert inputs["input_ids"][0].tolist() == enc.input_ids
    torch.testing.assert_close(inputs["pixel_values"][0], enc.pixel_values[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = model(input_ids=inputs["input_ids"], pixel_values=torch.stack(enc.pixel_values)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_tied_gpt2_exports_untied_and_exact(tiny_world, tmp_path):
    """The issue's failing case: a tied GPT-2 (wte, not embed_tokens) reloads exactly, untied."""
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2", tied=True)
    dst = export_model_dir(src, tmp_path / "hf")
    enc, _, ours = _our_logits(src, _image(1))
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([enc.input_ids]), pixel_values=torch.stack(enc.pixel_values))
    torch.testing.assert_close(theirs.logits, ours, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_pipeline(tiny_world, tmp_path):
    """transformers' generate on the export answers as VLMPipeline does, token for token."""
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2", mode="crop")
    dst = export_model_dir(src, tmp_path / "hf")
    pipe = VLMPipeline.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    for seed, question in enumerate(["何色ですか?", "いくつありますか?", "左にあるのは何?"]):
        image = _image(seed)
        request = GenerationRequest(VLMPipeline.question_messages(question), [image])
        enc = pipe.encode(request)
        ours = pipe.generate([request], GenerationConfig(max_new_tokens=12))[0]
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([enc.input_ids]),
                pixel_values=torch.stack(enc.pixel_values),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=pipe.stop_token_ids,
            )
        new = out[0, len(enc.input_ids) :].tolist()
        new = [t for t in new if t not in pipe.stop_token_ids]
        assert pipe.tokenizer.decode(new, skip_special_tokens=True) == ours.text


def test_linear_projector_exports_exactly(tiny_world, tmp_path):
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "llama", projector="linear")
    dst = export_model_dir(src, tmp_path / "hf")
    enc, _, ours = _our_logits(src, _image(2))
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([enc.input_ids]), pixel_values=torch.stack(enc.pixel_values))
    torch.testing.assert_close(theirs.logits, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"projector": "mlp3x_gelu"}, ["mlp3x_gelu", "plugin"]),
        ({"mode": "keep-aspect"}, ["keep-aspect", "plugin"]),
    ],
)
def test_refuses_what_fastvlm_cannot_carry(tiny_world, tmp_path, kwargs, words):
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2", **kwargs)
    with pytest.raises(ExportError) as err:
        export_model_dir(src, tmp_path / "hf")
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "hf").exists()


def test_refuses_a_family_transformers_reloads_wrongly(tiny_world, tmp_path, monkeypatch):
    """A reload that differs from ours (as GPT-2 did in older transformers) is named, not written."""
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    real = AutoModelForImageTextToText.from_pretrained

    def wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.language_model.ln_f.bias.add_(0.5)
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", wrong)
    with pytest.raises(ExportError) as err:
        export_model_dir(src, tmp_path / "hf")
    assert "gpt2" in str(err.value) and "reloaded" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_cli_export(tiny_world, tmp_path, capsys):
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "qwen2")
    assert main(["export", "--format", "transformers", str(src), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    bad = build_model_dir(tmp_path / "k", tiny_world / "tokenizer", "qwen2", mode="keep-aspect")
    assert main(["export", str(bad), str(tmp_path / "hf2")]) == 2
    assert "keep-aspect" in capsys.readouterr().err


def test_export_carries_one_plain_chat_template_and_its_stop_ids(tiny_world, tmp_path):
    """vLLM's server needs a string template (not our dict) it can compile without transformers'
    `{% generation %}` extension, and stops only at the generation config's EOS ids."""
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "llama")
    dst = export_model_dir(src, tmp_path / "hf", template="plain")
    tok = AutoTokenizer.from_pretrained(dst)
    assert isinstance(tok.chat_template, str) and "generation %}" not in tok.chat_template
    assert AutoProcessor.from_pretrained(dst).chat_template == tok.chat_template
    messages = [{"role": "user", "content": "<image>\n何?"}, {"role": "assistant", "content": "赤"}]
    _, processor = load_model_dir(src)
    assert tok.apply_chat_template(messages, tokenize=False) == processor.render(messages, "plain")
    eos = AutoModelForImageTextToText.from_pretrained(dst).generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    vocab = AutoConfig.from_pretrained(dst).text_config.vocab_size
    assert set(processor.stop_token_ids("plain")) <= set(eos) and all(i < vocab for i in eos)


def test_refuses_to_replace_a_dir_that_is_not_a_model(tiny_world, tmp_path):
    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_model_dir(src, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="must not overwrite"):
        export_model_dir(src, src)


def test_export_defaults_to_the_template_the_model_was_trained_with(tiny_world, tmp_path):
    from convllava_jp.convert.export import chat_template_text

    src = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "llama")
    model, processor = load_model_dir(src)
    processor.record_trained_template("llm-jp-3")
    save_model_dir(model, processor, src)
    dst = export_model_dir(src, tmp_path / "hf")
    _, processor = load_model_dir(src)
    assert AutoTokenizer.from_pretrained(dst).chat_template == chat_template_text(processor, "llm-jp-3")
