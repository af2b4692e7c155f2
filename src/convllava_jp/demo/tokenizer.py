"""The synthetic world's tokenizer: char-level BPE over the world's Japanese, whole words kept whole.

Trained by `generate_world` on every text of the world; the result is a transformers fast
tokenizer with the `llm-jp-v1` (default) and `plain` chat templates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..model import templates
from .language import DESCRIBE_QUESTION
from .scenes import COLOURS, POSITIONS, SHAPES

IMAGE_TOKEN = templates.IMAGE_TOKEN
EOS_TOKEN = "<EOD|LLM-jp>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (UNK_TOKEN, PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
_MAX_TOKEN_CHARS = 3  # longest learned token; uncapped BPE turns answers into single tokens
# The llm-jp-v1 template's fixed text, one token each (plain text, not special: decoding keeps it).
# Every chat sample starts with the system prompt, 33 tokens of the learned vocabulary, and each
# turn has a role marker of 4-5: as one token each, a stage-3 sample is 32 tokens on average
# instead of 75 (the tiny LLM's attention is no longer spread over a long constant prefix), and
# its steps are cheaper (docs/training.md, "Demo speed").
TEMPLATE_TOKENS = (
    templates.LLM_JP_SYSTEM_PROMPT,
    f" {templates.USER_ROLE_JA}: ",
    f" {templates.ASSISTANT_ROLE_JA}: ",
)


def _lexicon_pattern() -> str:
    """Regex alternation of the world's content words, longest first.

    Without it BPE merges across word boundaries by frequency (黄色い星 -> 黄色 + い星), so a word
    would be a different token in each context. Whole words give every colour, shape and position
    one token wherever it occurs. A position keeps its particle (左上に, 左上は: one token), so in
    "左上に赤い円" the token right before a colour names the grid cell it is read from: the tiny LLM
    then binds a word to an image token in one attention hop (see the answers in `language.ask`).
    """
    words = {p + particle for p in POSITIONS for particle in ("", "に", "は", "の")}
    words |= {c.adjective for c in COLOURS} | set(SHAPES)
    return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train the world's tokenizer and wrap it as a transformers fast tokenizer.

    Char-level BPE with tokens of at most 3 characters (uncapped BPE merges whole answers into
    single tokens, which turns the task into classification), byte fallback (256 `<0xNN>` tokens
    on top of `vocab_size`) so any text encodes, no normalizer and a fuse decoder so decoding gives
    back the exact text. Special tokens: `<unk>`, `<pad>`, `<EOD|LLM-jp>` (eos), `<image>`.
    Chat templates: `llm-jp-v1` (default) and `plain`; that template's system prompt and role
    markers are one added token each (`TEMPLATE_TOKENS`).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    # The world's words are pieces of their own (as a morphological pre-tokenizer would cut
    # them), and so are whitespace, digits and punctuation; BPE merges within the rest. Split
    # keeps every character, so decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(_lexicon_pattern() + r"|\s|\d|[、。，．？！：「」（）:,.!?()]"), behavior="isolated"
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # tokenizers stops one short of this (a value of 3 yields tokens of at most 2 characters).
        max_token_length=_MAX_TOKEN_CHARS + 1,
        show_progress=False,
        initial_alphabet=list("0123456789"),
    )
    specials = [*SPECIAL_TOKENS]

    def strip_specials(items: Iterable[str]):
        for text in items:
            for token in specials:
                text = text.replace(token, "\n")
            yield text

    tokenizer.train_from_iterator(strip_specials(texts), trainer)

    # BpeTrainer has no byte-fallback alphabet: insert <0x00>..<0xFF> right after the special
    # tokens (as llama-style tokenizers do) and renumber the rest; merges refer to strings.
    data = json.loads(tokenizer.to_str())
    learned = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    n_special = len(SPECIAL_TOKENS)
    if [t for t, _ in learned[:n_special]] != specials:
        raise RuntimeError("tokenizers placed the special tokens unexpectedly; cannot add byte tokens")
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in learned[n_special:]]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    tokenizer = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))

    chat_templates = {"default": templates.JINJA_TEMPLATES["llm-jp-v1"], **templates.JINJA_TEMPLATES}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=chat_templates,
        clean_up_tokenization_spaces=False,
    )
    wrapped.add_tokens([AddedToken(t, normalized=False, special=False) for t in TEMPLATE_TOKENS])
    return wrapped


def world_vocabulary_texts() -> list[str]:
    """Every word of the world, so the tokenizer covers even ones a small world never draws."""
    texts = [templates.LLM_JP_SYSTEM_PROMPT, templates.USER_ROLE_JA, templates.ASSISTANT_ROLE_JA]
    texts += [f" {templates.USER_ROLE_JA}: ", f" {templates.ASSISTANT_ROLE_JA}: ", "0123456789"]
    texts += [DESCRIBE_QUESTION, "図形はいくつありますか？"]
    texts += [f"{n}つです。" for n in range(10)] + [f"{p}にある図形は何色ですか？" for p in POSITIONS]
    for c in COLOURS:
        texts += [f"{c.adjective}図形はどんな形ですか？"]
        texts += [f"{p}に{c.adjective}図形があります。" for p in POSITIONS]
        for s in SHAPES:
            texts += [f"{c.adjective}{s}はありますか？", f"{c.adjective}{s}です。"]
            texts += [f"{c.adjective}{s}があります。", f"{c.adjective}{s}しかありません。"]
        texts += [f"{c.adjective}図形はありません。"]
    return texts
