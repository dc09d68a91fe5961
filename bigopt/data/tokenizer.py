"""Byte-level BPE trained on the training split with Hugging Face ``tokenizers``.

Byte-level, so every input is representable (no unknown token) and decoding gives the text
back. Id 0 is the padding token (``<|pad|>``), matching the byte tokenizer's padding id, so the
windowing code is the same for both. The tokenizer travels as its JSON (``data/tokenizer.json``
in the run dir, and passed to the Ray Data tasks that tokenize).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (pad first) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == 0
    return tok


@lru_cache(maxsize=4)
def from_json(text: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def encode(texts: list[str], tokenizer_json: str) -> Iterator[list[int]]:
    for encoding in from_json(tokenizer_json).encode_batch(texts, add_special_tokens=False):
        yield encoding.ids
