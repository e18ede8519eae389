"""The words of the shapes world.

One token per word: controls name words ("circle"), and the tokenizers built from this list map each
word to exactly one id, so a word's token index is its position in the prompt (after the start token).
"""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
"""Colour names and their RGB values, chosen to be far apart from each other and from the background."""

BACKGROUND: tuple[int, int, int] = (242, 240, 232)
"""A light, slightly warm background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
SIZE_WORDS: tuple[str, ...] = ("small", "large")

FUNCTION_WORDS: tuple[str, ...] = (
    "a", "an", "and", "two", "three", "on", "at", "in", "the", "to", "of",
    "left", "right", "top", "bottom", "above", "below", "middle", "next", ",",
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
"""``<eos>`` must not get id 2: transformers' CLIP pools at ``argmax(input_ids)`` when ``eos_token_id == 2``."""
PAD, UNK, BOS, EOS = SPECIAL_TOKENS


def words() -> list[str]:
    """Every word the world's captions can use, in a fixed order (special tokens excluded)."""
    out: list[str] = []
    for w in (*FUNCTION_WORDS, *SIZE_WORDS, *COLOURS, *SHAPES, *PLURALS.values()):
        if w not in out:
            out.append(w)
    return out


def vocabulary() -> dict[str, int]:
    """Token ids: special tokens first, then :func:`words`."""
    return {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words()])}
