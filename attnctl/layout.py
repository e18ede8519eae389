"""Token layout of one run: where image and text tokens sit in the joint sequence, and which text
positions hold which word.

SD3 / SD3.5 order the joint sequence ``[image, text]`` and the text is ``[CLIP (77), T5 (max_sequence_length)]``
(the two CLIP encoders share positions; their features are concatenated). FLUX orders it ``[text, image]``
and the text is T5 only (CLIP gives the pooled vector). Users name words; the layout turns them into
text-relative token indices for every tokenizer segment.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import LayoutError, WordCutOffError
from .sites import family_of

_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")  # runs of letters and digits; each other mark alone, as tokenizers split


NO_RUN = ("no run of this transformer is being followed: the controller was closed with its processors left in "
          "place, or the processors were made by a controller of another pipeline")
NO_RUN_FIX = ("install processors from a controller of this pipeline (attnctl.attach(pipe, ...), or "
              "set_attn_processor(Controller(pipe, ...).processors())), or call controller.begin_run(layout=...) "
              "before calling the transformer by hand")


def word_key(word: str) -> str:
    """How words are compared: NFKC-normalised (as tokenizers read full-width letters) and lower case."""
    return unicodedata.normalize("NFKC", word).strip().lower()


@dataclass(frozen=True)
class TextSegment:
    """The positions one tokenizer fills in the text part of the sequence."""

    name: str  # "clip" or "t5"
    start: int  # first position, relative to the start of the text tokens
    length: int
    words: dict[str, tuple[int, ...]] = field(default_factory=dict)  # word -> positions inside the segment
    text: str | None = None  # the prompt this tokenizer read (None: the layout's prompt)
    spans: tuple[tuple[str, tuple[int, ...]], ...] = ()  # each word of the text in order, with its positions
    also: str | None = None  # a second text these positions carry (SD3's prompt_2, which CLIP-G reads)

    def phrase_positions(self, keys: Sequence[str]) -> list[int] | None:
        """Positions of the phrase ``keys`` (its words' keys) where it stands in the text as written — its words
        one after another, every one of them within the tokens (a phrase the truncation cut into has none there) —
        or ``None`` when this segment has no spans (a hand-made layout)."""
        if not self.spans:
            return None
        out: set[int] = set()
        for found in self._occurrences(keys):
            if all(pos for _, pos in found):
                out.update(p for _, pos in found for p in pos)
        return sorted(self.start + p for p in out)

    def phrase_cut(self, keys: Sequence[str]) -> bool:
        """The phrase stands in the text, but the truncation cut off some of its words there."""
        return any(not all(pos for _, pos in found) for found in self._occurrences(keys))

    def _occurrences(self, keys: Sequence[str]) -> list[tuple[tuple[str, tuple[int, ...]], ...]]:
        return [self.spans[i:i + len(keys)] for i in runs([w for w, _ in self.spans], keys)]


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

    def words(self, segments: tuple[str, ...] | None = None) -> list[str]:
        """The words the text tokens hold, each once, in the chosen tokenizer segments (``None``: all)."""
        seen: list[str] = []
        for seg in self._chosen(segments):
            seen.extend(w for w in seg.words if w not in seen)
        return seen

    def word_tokens(self, word: str, segments: tuple[str, ...] | None = None) -> list[int]:
        """Text-relative token positions of ``word`` (all occurrences, all chosen tokenizer segments)."""
        key = word_key(word)
        out: list[int] = []
        for seg in self._chosen(segments):
            out.extend(seg.start + p for p in seg.words.get(key, ()))
        if not out:
            self._absent(word, segments)
        return sorted(set(out))

    def phrase_tokens(self, phrase: str, segments: tuple[str, ...] | None = None) -> list[int]:
        """Text-relative token positions of a word or phrase. A phrase (``"red circle"``) counts where its words
        stand together in the prompt, so in "a red circle and a blue circle" it is the first circle's tokens and
        "red"'s; on a hand-made layout without word order (no ``spans``), it is all its words' tokens."""
        keys = text_words(phrase)
        if len(keys) <= 1:
            return self.word_tokens(keys[0] if keys else phrase, segments)
        words = [self.word_tokens(k, segments) for k in keys]  # each word is there (else its own clear error)
        out: set[int] = set()
        for seg in self._chosen(segments):
            found = seg.phrase_positions(keys)
            if found is None:  # no word order known: the words' tokens in this segment
                out.update(p for pos in words for p in pos if seg.start <= p < seg.start + seg.length)
            else:
                out.update(found)
        if not out and any(seg.phrase_cut(keys) for seg in self._chosen(segments)):
            raise self._cut_off(f"the phrase {phrase!r} is in the prompt, but a word of it is")
        if not out:
            raise LayoutError(
                f"the phrase {phrase!r} is not in the prompt as written: its words are there, but not one after "
                f"another{self._where(segments)}",
                fix="name the phrase as it stands in the prompt, or its words one by one")
        return sorted(out)

    def tokens_of_word_at(self, index: int) -> list[int]:
        """Text-relative token positions of the prompt's ``index``-th word (as :func:`text_words` counts them) in
        every segment that read the prompt; a segment without word order gives all that word's tokens. A word the
        truncation cut off in every segment is an error."""
        words = text_words(self.prompt or "")
        if not 0 <= index < len(words):
            raise LayoutError(f"the prompt {self.prompt!r} has no word {index + 1}")
        word, out = words[index], set()
        for seg in self.segments:
            if (seg.text if seg.text is not None else self.prompt) != self.prompt:
                continue
            if not seg.spans:
                out.update(seg.start + p for p in seg.words.get(word, ()))
            elif index < len(seg.spans) and seg.spans[index][0] == word:  # (spans hold the words, in order)
                out.update(seg.start + p for p in seg.spans[index][1])
        if not out:
            raise self._cut_off(f"the word {word!r} (word {index + 1} of the prompt {self.prompt!r}) is")
        return sorted(out)

    def _cut_off(self, what: str) -> WordCutOffError:
        """The error for words of the prompt the truncation left out (``what`` says which, ending in "is")."""
        return WordCutOffError(
            f"{what} past the tokens the text encoders read "
            f"({', '.join(f'{seg.name} {seg.length}' for seg in self.segments)}): the prompt was cut off",
            fix="shorten the prompt, or raise max_sequence_length (T5) if the model allows")

    def _where(self, segments: tuple[str, ...] | None) -> str:
        where = f" in the prompt {self.prompt!r}" if self.prompt is not None else ""
        read = [f"the {s.name} tokens read {s.text!r}" for s in self._chosen(segments)
                if s.text is not None and s.text != self.prompt]
        read += [f"the {s.name} tokens also read {s.also!r}" for s in self._chosen(segments) if s.also is not None]
        if read:  # e.g. FLUX's prompt_2, which its T5 tokens (the only text tokens) read instead of prompt
            where += f" as the text tokens read it ({'; '.join(read)})"
        return where

    def _absent(self, word: str, segments: tuple[str, ...] | None) -> None:
        if self.cut_off(word, segments):
            raise self._cut_off(f"the word {word!r} is in the prompt but")
        known = ", ".join(self.words(segments)[:20]) or (
            "(none: the prompt has no words)" if self.prompt is not None
            else "(no prompt tokens are known for this run)")
        raise LayoutError(
            f"the word {word!r} is not{self._where(segments)}; a control can only name words of the prompt it runs "
            f"on. Words of this prompt: {known}."
        )

    def _chosen(self, segments: tuple[str, ...] | None) -> list[TextSegment]:
        return [s for s in self.segments if segments is None or s.name in segments]

    def cut_off(self, word: str, segments: tuple[str, ...] | None = None) -> bool:
        """``word`` is in the text a (chosen) tokenizer segment read, but not in its tokens (truncated away)."""
        key = word_key(word)
        for seg in self._chosen(segments):
            for text in (seg.text if seg.text is not None else self.prompt, seg.also):
                if text is not None and key not in seg.words and key in text_words(text):
                    return True
        return False


def text_words(text: str) -> list[str]:
    """The words of ``text`` as a run's layout reads them (:func:`word_key`), in order, punctuation left out."""
    return [w for w in (word_key(m) for m in _WORD.findall(text)) if w and w[0].isalnum()]


def runs(seq: Sequence[str], keys: Sequence[str]) -> list[int]:
    """Where the words ``keys`` stand one after another in ``seq``: the index of each run's first word."""
    n = len(keys)
    return [i for i in range(len(seq) - n + 1) if list(seq[i:i + n]) == list(keys)] if n else []


def absent_words(words: Sequence[str], text: str) -> list[str]:
    """The words or phrases of ``words`` that ``text`` does not contain (a phrase: not with its words one after
    another), read from the text alone, before any tokenizer: a batch file and an edit check their words with it
    up front."""
    seq = text_words(text)

    def present(keys: list[str]) -> bool:
        return bool(keys) and bool(runs(seq, keys))

    return [w for w in words if not present(text_words(w))]


def phrases_apart(words: Sequence[str], text: str) -> list[str]:
    """The phrases of ``words`` (two words or more) one of whose words also stands in ``text`` away from the phrase,
    as "circle" does for "red circle" in "a red circle and a blue circle". Before phrases were read where they stand
    (December 2026) such a phrase took those tokens too; a batch run hashes these items apart, so that resuming
    makes their older images again."""
    seq = text_words(text)
    out = []
    for phrase in words:
        keys = text_words(phrase)
        if len(keys) < 2:
            continue
        inside = [False] * len(seq)
        for i in runs(seq, keys):
            inside[i:i + len(keys)] = [True] * len(keys)
        if any(w in keys and not inside[i] for i, w in enumerate(seq)):
            out.append(phrase)
    return out


def image_grid(layout: TokenLayout | None, n_image: int, who: str, site: str,
               reference_ok: bool = False) -> tuple[int, int]:
    """The run's image grid for a control that maps image tokens to places (``who`` at ``site``, whose image stream
    has ``n_image`` tokens). A reference image's tokens after the grid (FLUX Kontext) are accepted with
    ``reference_ok=True``, for a control that acts on the generated grid's queries only (:meth:`SiteCall.grid_slice`);
    otherwise they, and a grid the run's layout does not describe, are a clear error."""
    if layout is None:
        raise LayoutError(f"{who} at {site}: {NO_RUN}", fix=NO_RUN_FIX)
    grid = layout.grid
    reference = layout.reference_tokens and n_image == layout.n_image + layout.reference_tokens
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


def word_spans(tokenizer: Any, prompt: str, max_length: int) -> list[tuple[str, tuple[int, ...]]]:
    """Each word and mark of ``prompt`` in order (its :func:`word_key`) with the token positions it occupies, as
    the pipelines tokenize it; a word past the truncation has none."""
    matches = [(word_key(m.group()), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    enc = None
    try:
        enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        enc = None
    found: list[list[int]] = [[] for _ in matches]
    if enc is not None and "offset_mapping" in enc:
        for pos, (a, b) in enumerate(enc["offset_mapping"]):
            if b <= a:
                continue  # special or padding token
            for i, (_, s, e) in enumerate(matches):
                if a < e and b > s:
                    found[i].append(pos)
    else:  # a slow tokenizer: each word's token ids as the next sub-sequence of the prompt's ids
        ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        start = 0
        for i, (_, s, e) in enumerate(matches):
            sub = tokenizer(prompt[s:e], add_special_tokens=False)["input_ids"]
            for j in range(start, len(ids) - len(sub) + 1):
                if sub and ids[j:j + len(sub)] == sub:
                    found[i] = list(range(j, j + len(sub)))
                    start = j + len(sub)
                    break
    return [(w, tuple(sorted(set(p)))) for (w, _, _), p in zip(matches, found, strict=True)]


def _segment(name: str, start: int, length: int, tokenizer: Any, text: str,
             also: tuple[Any, str] | None = None) -> TextSegment:
    """A tokenizer's segment of the text tokens, ``text`` read by ``tokenizer``; ``also``: a second tokenizer and
    text whose features share these positions (SD3's CLIP-G reading ``prompt_2``), whose words are found there too
    (with two word orders at one place, a phrase is then its words' tokens)."""
    spans = word_spans(tokenizer, text, length)
    words: dict[str, set[int]] = {}
    extra = word_spans(also[0], also[1], length) if also is not None else []
    for w, pos in [*spans, *extra]:
        if pos:
            words.setdefault(w, set()).update(pos)
    return TextSegment(name, start, length, {w: tuple(sorted(p)) for w, p in words.items()}, text,
                       tuple((w, p) for w, p in spans if w[0].isalnum()) if also is None else (),
                       also[1] if also is not None else None)


def layout_for_pipeline(pipe: Any, prompt: str | None, text_len: int, grid: tuple[int, int],
                        prompt_t5: str | None = None, reference_tokens: int = 0, prompt_clip2: str | None = None
                        ) -> TokenLayout:
    """Build the layout of one run of a diffusers SD3 or FLUX pipeline from its tokenizers (``reference_tokens``: the
    image-stream tokens after the generated grid, FLUX Kontext's input image). ``prompt_t5``: the text T5 reads
    (SD3's ``prompt_3``, FLUX's ``prompt_2``), ``None`` for the prompt; ``prompt_clip2``: SD3's ``prompt_2``, which
    CLIP-G reads at the positions CLIP-L reads ``prompt`` at (their features are concatenated), so a word of either
    is found there. Both are the texts the encoders read, one prompt's: an empty text is read as empty. (A
    pipeline's own argument goes through diffusers' ``prompt_2 or prompt`` first, where an empty text means the
    prompt; the controller does that, for each prompt of a list.)"""
    family = family_of(pipe.transformer)
    segments: list[TextSegment] = []
    t5_prompt = prompt_t5 if prompt_t5 is not None else prompt
    if family == "sd3":
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        t5_len = text_len - clip_len
        second = None
        if prompt is not None and prompt_clip2 and prompt_clip2 != prompt:  # (an empty text adds no words)
            second = (getattr(pipe, "tokenizer_2", None) or pipe.tokenizer, prompt_clip2)
        segments.append(_segment("clip", 0, clip_len, pipe.tokenizer, prompt, second) if prompt is not None
                        else TextSegment("clip", 0, clip_len, {}, prompt))
        if t5_len > 0 and prompt is not None and getattr(pipe, "text_encoder_3", None) is not None:
            segments.append(_segment("t5", clip_len, t5_len, pipe.tokenizer_3, t5_prompt))
        elif t5_len > 0:
            segments.append(TextSegment("t5", clip_len, t5_len, {}, t5_prompt))
    elif prompt is not None:
        segments.append(_segment("t5", 0, text_len, pipe.tokenizer_2, t5_prompt))
    else:
        segments.append(TextSegment("t5", 0, text_len, {}, t5_prompt))
    return TokenLayout(family, text_len, grid, tuple(segments), prompt, reference_tokens)
