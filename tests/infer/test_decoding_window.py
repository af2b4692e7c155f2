"""IncrementalDecoder decodes a window of recent ids, not the whole answer at every token
(issue 18, section 2), and streams exactly what decoding the whole answer every time streams.

Three tokenizers of different kinds, built here: byte-fallback BPE with a fuse decoder (the demo's),
byte-level BPE (GPT-2's kind) and a sentencepiece-style Metaspace one (a leading space dropped
from the first token only; the clean-up of spaces before punctuation on). Random answers mix
ordinary tokens, special tokens and byte tokens that form whole, split and broken characters.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from convllava_jp.infer.decoding import IncrementalDecoder

TEXTS = [
    "左上に赤い円があります。右下に青い四角があります。",
    "The cat isn't here. Is it? Yes, it's there!",
    "何色ですか？ はい、あります。 いいえ、ありません。",
] * 20
SPECIALS = ["<pad>", "</s>", "<|im_end|>"]


def _wrap(tokenizer: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[2:],
        **kwargs,
    )


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *SPECIALS, *byte_tokens])
    tok.train_from_iterator(TEXTS, trainer)
    return _wrap(tok, unk_token="<unk>")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    return _wrap(tok)


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *SPECIALS])
    tok.train_from_iterator(TEXTS, trainer)
    return _wrap(tok, unk_token="<unk>", clean_up_tokenization_spaces=True)


TOKENIZERS = {
    "byte-fallback": byte_fallback_tokenizer,
    "byte-level": byte_level_tokenizer,
    "metaspace": metaspace_tokenizer,
}


class WholeDecoder(IncrementalDecoder):
    """The answer decoded whole at every token: what the pieces must equal."""

    window = None


class SmallWindow(IncrementalDecoder):
    window = 2  # the boundary moves at nearly every token
    context = 1


class CountingTokenizer:
    """Delegates; counts the ids decoded."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.decoded = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self._tok.decode(ids, **kwargs)


def random_answer(tok, rng: random.Random, n: int) -> list[int]:
    """Ordinary tokens of the training texts, special tokens, and byte tokens: whole characters,
    characters split across byte tokens, and broken ones."""
    ordinary = tok.encode("".join(TEXTS[:3]), add_special_tokens=False)
    specials = tok.convert_tokens_to_ids(SPECIALS)
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    has_bytes = all(i is not None and i != tok.unk_token_id for i in byte_ids)
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.6:
            ids.append(rng.choice(ordinary))
        elif kind < 0.7:
            ids.append(rng.choice(specials))
        elif has_bytes:
            raw = rng.choice(["あ", "円", "é", "😀"]).encode()
            if kind > 0.9:
                raw = raw[: rng.randrange(1, len(raw))]  # broken: a lone lead or half a character
            ids += [byte_ids[b] for b in raw]
        else:  # byte-level: its ordinary ids are bytes; a run of them may split a character
            ids += tok.encode(rng.choice(["あ", "円", "é", "😀", " ."]), add_special_tokens=False)
    return ids[:n]


def stream(decoder_cls, tok, ids: list[int], stop: list[str]) -> tuple[list[str], str, bool]:
    decoder = decoder_cls(tok, stop)
    pieces = []
    for i in ids:
        pieces.append(decoder.add(i))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    return pieces, decoder.text, decoder.stopped


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_windowed_pieces_equal_whole_decoding(kind):
    tok = TOKENIZERS[kind]()
    rng = random.Random(kind)
    for trial in range(12):
        ids = random_answer(tok, rng, rng.randrange(1, 300))
        stop = [[], ["。右"], ["there!", "円が"], [" ."]][trial % 4]
        want = stream(WholeDecoder, tok, ids, stop)
        assert "".join(want[0]) == want[1]
        for cls in (IncrementalDecoder, SmallWindow):
            assert stream(cls, tok, ids, stop) == want, (kind, trial, cls.__name__)


def test_decoding_work_grows_linearly_with_the_answer():
    tok = CountingTokenizer(byte_fallback_tokenizer())
    ids = (tok.encode("".join(TEXTS), add_special_tokens=False) * 10)[:1000]
    assert len(ids) == 1000
    decoder = IncrementalDecoder(tok)
    for i in ids:
        decoder.add(i)
    decoder.finish()
    # whole decoding at every token: ~500,000 ids; a window of ~40 ids, checks at 64, 128, 256,
    # 512 and the final decode: ~42,000
    assert tok.decoded < 60 * len(ids)
    assert decoder.text == tok.decode(ids, skip_special_tokens=True)
