"""A word-level tokenizer for the shapes world: one token per word, no download.

Built with the ``tokenizers`` library from :func:`attnctl.toyworld.vocab.vocabulary` and wrapped as a
``transformers.PreTrainedTokenizerFast``, so it fills every tokenizer slot of the SD3 and FLUX pipelines
(the CLIP ones and the T5 one). Text is lower-cased, split on whitespace and punctuation (every
punctuation mark, the comma included, is a word of its own), and framed as ``<bos> words… <eos>``;
padding uses ``<pad>``, words outside the vocabulary become ``<unk>`` (see :func:`unknown_words` to name
them in an error message).

Because every word is exactly one token, the token index of the i-th word of a prompt is ``i + 1``.

In transformers 5.x ``PreTrainedTokenizerFast`` is an alias of ``TokenizersBackend``; a pipeline saved
with this tokenizer records ``["transformers", "TokenizersBackend"]`` in its ``model_index.json``, which
loads offline from the folder's ``tokenizer.json``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from attnctl.toyworld import vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["make_tokenizer", "split_words", "unknown_words", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 24
"""Default ``model_max_length``: ``<bos>`` + 22 words + ``<eos>``."""


def _backend() -> Tokenizer:
    """The raw ``tokenizers`` object (a fresh one on every call: callers may mutate it)."""
    ids = vocab.vocabulary()
    tok = Tokenizer(WordLevel(vocab=ids, unk_token=vocab.UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{vocab.BOS} $A {vocab.EOS}",
        pair=f"{vocab.BOS} $A {vocab.EOS} $B:1 {vocab.EOS}:1",
        special_tokens=[(vocab.BOS, ids[vocab.BOS]), (vocab.EOS, ids[vocab.EOS])],
    )
    # No decoder: `decode` joins tokens with single spaces, which is exactly how captions are written.
    return tok


def make_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """The shapes-world tokenizer as a ``PreTrainedTokenizerFast`` with ``model_max_length=max_length``.

    It saves with ``save_pretrained(folder)`` and loads back with
    ``PreTrainedTokenizerFast.from_pretrained(folder)`` (or ``AutoTokenizer``), offline.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 (<bos>, one word, <eos>), got {max_length}")
    # imported here: split_words (the world's caption checks) needs only `tokenizers`, not transformers' import time
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        model_max_length=max_length,
        bos_token=vocab.BOS,
        eos_token=vocab.EOS,
        pad_token=vocab.PAD,
        unk_token=vocab.UNK,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )


@lru_cache(maxsize=1)
def _splitter() -> Tokenizer:
    return _backend()


def split_words(prompt: str) -> list[str]:
    """The words of ``prompt`` as the tokenizer sees them (normalised, split), without special tokens."""
    tok = _splitter()
    normalised = tok.normalizer.normalize_str(prompt)
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalised)]


def unknown_words(prompt: str | list[str]) -> list[str]:
    """Words of ``prompt`` (or of several prompts) that the shapes world does not know, in order, once each.

    An empty list means every word maps to its own token.
    """
    known = set(vocab.words())
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out: list[str] = []
    for p in prompts:
        for w in split_words(p):
            if w not in known and w not in out:
                out.append(w)
    return out
