"""Tiny random LLM directories of each architecture, with a family's special tokens and template.

Nothing is downloaded: a small byte-level BPE is trained on a few sentences and saved as a
`PreTrainedTokenizerFast` with the family's special tokens (and its stock template text as the
tokenizer's own `chat_template`); the model is the family's architecture at width 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class Family:
    name: str  # the template's name in model.templates
    model_type: str
    end_of_turn: str  # the token that ends a reply
    bos: str | None
    eos: str
    extra: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)


_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
_KV = {"num_key_value_heads": 2, "max_position_embeddings": 2048}

FAMILIES = {
    f.name: f
    for f in [
        Family("llm-jp-3", "llama", "</s>", "<s>", "</s>", [], {**_SMALL, **_KV}),
        Family(
            "sarashina2.2",
            "llama",
            "</s>",
            "<s>",
            "</s>",
            ["<|user|>", "<|assistant|>", "<|system|>"],
            {**_SMALL, **_KV},
        ),
        Family(
            "qwen3",
            "qwen3",
            "<|im_end|>",
            None,
            "<|im_end|>",
            ["<|endoftext|>", "<|im_start|>", "<think>", "</think>"],
            {**_SMALL, **_KV, "head_dim": 16, "tie_word_embeddings": True},
        ),
        # eos is the base model's <|end_of_text|>: a reply must still stop at <|eot_id|>.
        Family(
            "llama-3",
            "llama",
            "<|eot_id|>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            {**_SMALL, **_KV, "rope_theta": 500000.0},
        ),
        Family(
            "gemma",
            "gemma",
            "<end_of_turn>",
            "<bos>",
            "<eos>",
            ["<start_of_turn>", "<end_of_turn>"],
            {**_SMALL, **_KV, "head_dim": 16},
        ),
        Family(
            "llm-jp-v1",
            "gpt2",
            "<EOD|LLM-jp>",
            None,
            "<EOD|LLM-jp>",
            [],
            {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024},
        ),
        Family(
            "plain",
            "gpt_neox",
            "<|endoftext|>",
            None,
            "<|endoftext|>",
            [],
            {**_SMALL, "max_position_embeddings": 1024},
        ),
    ]
}

CORPUS = [
    "これは赤い車の写真です。画像には猫と犬が写っています。",
    "What is in the image? A red car and a small cat.",
    "質問に答えてください。左の画像と右の画像を比べると、色が違います。",
    "領収書の合計金額は1,280円です。日付は2024年5月1日です。",
] * 3


def build_tokenizer(family: Family, metaspace: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 / Llama-3 / Qwen style), or with `metaspace` a SentencePiece-style one."""
    specials = ["<unk>", "<pad>", family.eos, *([family.bos] if family.bos else []), *family.extra]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        alphabet = sorted(set("".join(CORPUS)) | set("▁\n#:?!"))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=family.eos,
        bos_token=family.bos,
        additional_special_tokens=[t for t in family.extra if t not in (family.eos, family.bos)],
    )


def build_llm_dir(family: Family, out: Path, seed: int = 0) -> Path:
    """A tiny random causal LM + tokenizer of `family`, saved as a HF model directory."""
    tokenizer = build_tokenizer(family)
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **family.config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
