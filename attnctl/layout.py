"""Token layout of one run: where image and text tokens sit in the joint sequence, and which text
positions hold which word.

SD3 / SD3.5 order the joint sequence ``[image, text]`` and the text is ``[CLIP (77), T5 (max_sequence_length)]``
(the two CLIP encoders share positions; their features are concatenated). FLUX orders it ``[text, image]``
and the text is T5 only (CLIP gives the pooled vector). Users name words; the layout turns them into
text-relative token indices for every tokenizer segment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import LayoutError, WordCutOffError
from .sites import family_of

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class TextSegment:
    """The positions one tokenizer fills in the text part of the sequence."""

    name: str  # "clip" or "t5"
    start: int  # first position, relative to the start of the text tokens
    length: int
    words: dict[str, tuple[int, ...]] = field(default_factory=dict)  # word -> positions inside the segment
    text: str | None = None  # the prompt this tokenizer read (None: the layout's prompt)


@dataclass(frozen=True)
class TokenLayout:
    """Everything a control needs to find tokens in the joint sequence of one run."""

    family: Literal["sd3", "flux"]
    text_len: int
    grid: tuple[int, int]  # (h, w) of the image token grid; non-square allowed
    segments: tuple[TextSegment, ...] = ()
    prompt: str | None = None
    reference_tokens: int = 0  # image-stream tokens after the generated grid (FLUX Kontext's input image)

    @property
    def n_image(self) -> int:
        """Tokens of the generated image grid (not counting reference tokens)."""
        return self.grid[0] * self.grid[1]

    @property
    def n_total(self) -> int:
        return self.n_image + self.text_len

    @property
    def image_first(self) -> bool:
        return self.family == "sd3"

    def image_slice(self, joint: bool = True) -> slice:
        """Image tokens in the joint sequence (``joint=False``: in an image-only sequence, e.g. SD3.5 attn2)."""
        if not joint or self.image_first:
            return slice(0, self.n_image)
        return slice(self.text_len, self.text_len + self.n_image)

    def text_slice(self) -> slice:
        return slice(self.n_image, self.n_total) if self.image_first else slice(0, self.text_len)

    def text_to_joint(self, positions: list[int]) -> list[int]:
        """Text-relative positions -> indices in the joint sequence."""
        off = self.text_slice().start
        return [off + p for p in positions]

    def words(self) -> list[str]:
        seen: list[str] = []
        for seg in self.segments:
            seen.extend(w for w in seg.words if w not in seen)
        return seen

    def word_tokens(self, word: str, segments: tuple[str, ...] | None = None) -> list[int]:
        """Text-relative token positions of ``word`` (all occurrences, all chosen tokenizer segments)."""
        key = word.strip().lower()
        out: list[int] = []
        for seg in self.segments:
            if segments is not None and seg.name not in segments:
                continue
            out.extend(seg.start + p for p in seg.words.get(key, ()))
        if not out:
            if self.cut_off(word, segments):
                raise WordCutOffError(
                    f"the word {word!r} is in the prompt but past the tokens the text encoders read "
                    f"({', '.join(f'{seg.name} {seg.length}' for seg in self.segments)}): the prompt was cut off",
                    fix="shorten the prompt, or raise max_sequence_length (T5) if the model allows")
            where = f" in the prompt {self.prompt!r}" if self.prompt is not None else ""
            read = [f"the {s.name} tokens read {s.text!r}" for s in self._chosen(segments)
                    if s.text is not None and s.text != self.prompt]
            if read:  # e.g. FLUX's prompt_2, which its T5 tokens (the only text tokens) read instead of prompt
                where += f" as the text tokens read it ({'; '.join(read)})"
            known = ", ".join(self.words()[:20]) or "(no prompt tokens are known for this run)"
            raise LayoutError(
                f"the word {word!r} is not{where}; a control can only name words of the prompt it runs on. "
                f"Words of this prompt: {known}."
            )
        return sorted(set(out))

    def _chosen(self, segments: tuple[str, ...] | None) -> list[TextSegment]:
        return [s for s in self.segments if segments is None or s.name in segments]

    def cut_off(self, word: str, segments: tuple[str, ...] | None = None) -> bool:
        """``word`` is in the text a (chosen) tokenizer segment read, but not in its tokens (truncated away)."""
        key = word.strip().lower()
        for seg in self._chosen(segments):
            text = seg.text if seg.text is not None else self.prompt
            if text is not None and key not in seg.words and key in (m.group().lower() for m in _WORD.finditer(text)):
                return True
        return False


def text_words(text: str) -> list[str]:
    """The words of ``text`` as a run's layout reads them, lower case, punctuation left out."""
    return [w for w in _WORD.findall(text.lower()) if w[0].isalnum() or w[0] == "_"]


def absent_words(words: Sequence[str], text: str) -> list[str]:
    """The words or phrases of ``words`` that ``text`` does not contain (a phrase: some word of it missing), read
    from the text alone, before any tokenizer: a batch file and an edit check their words with it up front."""
    present = set(text_words(text))
    return [w for w in words if not set(text_words(w)) <= present]


def image_grid(layout: TokenLayout | None, n_image: int, who: str, site: str,
               reference_ok: bool = False) -> tuple[int, int]:
    """The run's image grid for a control that maps image tokens to places (``who`` at ``site``, whose image stream
    has ``n_image`` tokens). A reference image's tokens after the grid (FLUX Kontext) are accepted with
    ``reference_ok=True``, for a control that acts on the generated grid's queries only (:meth:`SiteCall.grid_slice`);
    otherwise they, and a grid the run's layout does not describe, are a clear error."""
    grid = layout.grid if layout is not None else None
    reference = layout is not None and layout.reference_tokens and n_image == layout.n_image + layout.reference_tokens
    if reference and reference_ok:
        return grid
    if reference:
        raise LayoutError(
            f"{who}: {site} has {n_image} image tokens, the {grid[0]}×{grid[1]} generated grid and "
            f"{layout.reference_tokens} tokens of a reference image (FLUX Kontext's input image); {who} works on "
            "the generated grid and does not handle a reference image's tokens",
            fix="use it with FluxPipeline or FluxImg2ImgPipeline (the input image as the starting latents), or use "
                "the controls that work on Kontext (SoftPAG, AttentionProbe, AttentionRegulation, LayoutGuidance, "
                "IsolationAttention)")
    if grid is None or grid[0] * grid[1] != n_image:
        raise LayoutError(f"{who}: {site} has {n_image} image tokens but the run's image grid is {grid}",
                          fix="pass height/width the model supports, or a layout whose grid matches")
    return grid


def word_positions(tokenizer: Any, prompt: str, max_length: int) -> dict[str, tuple[int, ...]]:
    """Map each word of ``prompt`` to the token positions it occupies, as the pipelines tokenize it
    (padding to ``max_length``, special tokens included, truncated)."""
    enc = None
    try:
        enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        enc = None
    out: dict[str, list[int]] = {}
    spans = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    if enc is not None and "offset_mapping" in enc:
        offsets = enc["offset_mapping"]
        for pos, (a, b) in enumerate(offsets):
            if b <= a:
                continue  # special or padding token
            for w, s, e in spans:
                if a < e and b > s:
                    out.setdefault(w, []).append(pos)
        return {w: tuple(sorted(set(p))) for w, p in out.items()}
    # Slow tokenizer: find each word's token ids as a sub-sequence of the prompt's ids.
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    for w, _, _ in spans:
        sub = tokenizer(w, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) - len(sub) + 1):
            if sub and ids[i : i + len(sub)] == sub:
                out.setdefault(w, []).extend(range(i, i + len(sub)))
    return {w: tuple(sorted(set(p))) for w, p in out.items()}


def layout_for_pipeline(pipe: Any, prompt: str | None, text_len: int, grid: tuple[int, int],
                        prompt_t5: str | None = None, reference_tokens: int = 0) -> TokenLayout:
    """Build the layout of one run of a diffusers SD3 or FLUX pipeline from its tokenizers (``reference_tokens``: the
    image-stream tokens after the generated grid, FLUX Kontext's input image)."""
    family = family_of(pipe.transformer)
    segments: list[TextSegment] = []
    t5_prompt = prompt_t5 if prompt_t5 is not None else prompt
    if family == "sd3":
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        t5_len = text_len - clip_len
        clip_words = word_positions(pipe.tokenizer, prompt, clip_len) if prompt is not None else {}
        segments.append(TextSegment("clip", 0, clip_len, clip_words, prompt))
        t5_words: dict[str, tuple[int, ...]] = {}
        if prompt is not None and getattr(pipe, "text_encoder_3", None) is not None and t5_len > 0:
            t5_words = word_positions(pipe.tokenizer_3, t5_prompt, t5_len)
        if t5_len > 0:
            segments.append(TextSegment("t5", clip_len, t5_len, t5_words, t5_prompt))
    else:
        t5_words = word_positions(pipe.tokenizer_2, t5_prompt, text_len) if prompt is not None else {}
        segments.append(TextSegment("t5", 0, text_len, t5_words, t5_prompt))
    return TokenLayout(family, text_len, grid, tuple(segments), prompt, reference_tokens)
