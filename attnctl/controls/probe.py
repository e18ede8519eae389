"""AttentionProbe: image→word attention maps, reduced on the fly.

At every selected joint site and step, the probe receives the attention probabilities of image queries on
the chosen text tokens (never the full map) and adds their sum over heads into one running buffer of shape
``(rows, N_img, tokens)``: memory O(N_img · T) for the whole run, whatever the number of sites and steps.
The fused kernel still computes the layer's output; the probe only recomputes ``exp(q·k_t/√d − lse)`` for
its few columns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, LayoutError
from ..layout import NO_RUN, NO_RUN_FIX, image_grid
from ..processors.contributions import Probe, Selection
from ..schedules import Schedule, as_schedule
from .base import Control, ControlConfig, Roles, RunState, SegmentList, check_segments, clean_words, register


class ProbeConfig(ControlConfig):
    words: list[str] | None = Field(None, description="words to map; None: every text token")
    tokens: list[int] | None = Field(None, description="text-relative token positions, instead of words")
    segments: SegmentList = Field(None, description="tokenizer segments to read words from (clip, t5)")
    sites: str | list[str] = "all"
    heads: list[int] | None = None
    roles: Roles = ["cond"]
    weight: Any = Field(1.0, validate_default=True,
                        description="schedule: weight of each step in the average (0 skips a step)")

    @field_validator("weight")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        schedule = as_schedule(v)
        schedule.checked(0.0, None)  # a weight below 0 would make the average no average (the JSON stays as given)
        return schedule.to_json()

    @field_validator("words")
    @classmethod
    def _words(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("words is an empty list; give at least one word, or None for every text token")
        return None if v is None else clean_words(v, "words", "circle")

    @field_validator("heads", "tokens")
    @classmethod
    def _not_empty(cls, v: list[int] | None, info) -> list[int] | None:
        if v is not None and not v:
            raise ValueError(f"{info.field_name} is an empty list; give at least one, or None for all")
        repeated = sorted({x for x in v or [] if v.count(x) > 1})
        if repeated:  # a token's map is one column (and one file); a head twice would count it twice in the mean
            raise ValueError(f"repeats {', '.join(map(str, repeated))}; list each once")
        return v

    @model_validator(mode="after")
    def _one_kind_of_column(self) -> ProbeConfig:
        if self.words is not None and self.tokens is not None:
            raise ValueError("give words or tokens, not both (the probe maps one kind of column)")
        return self


@register
class AttentionProbe(Control):
    """Average attention of image tokens on words, over heads, sites and steps."""

    kind = "probe"
    Config = ProbeConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._weight, self._weight_spec = as_schedule(self.config.weight), self.config.weight
        self._started = False  # a run began with the probe attached
        self.reset()

    def prompt_words(self) -> list[str]:
        return list(self.config.words or [])

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._mass = 0.0
        self._positions: list[int] | None = None
        self._columns: list[str] = []
        self._prompt_positions: dict[int, tuple[Any, list[int]]] = {}  # id(layout) -> (layout, its positions)
        self.grid: tuple[int, int] | None = None
        self.calls = 0
        self._steps: set[int] = set()

    def _weight_schedule(self) -> Schedule:
        """The weight schedule, made anew when ``config.weight`` was assigned since: assignment counts, as for
        every control's settings."""
        if self._weight_spec != self.config.weight:
            self._weight, self._weight_spec = as_schedule(self.config.weight), self.config.weight
        return self._weight

    def begin_run(self, state: RunState) -> None:
        self._weight_schedule()
        self.reset()
        self._started = True
        cfg = self.config
        layouts = [state.layout] if state.row_layouts is None else [lay for lay in state.row_layouts if lay]
        if cfg.words is not None and any(lay is None or lay.prompt is None for lay in layouts):
            raise LayoutError(
                "AttentionProbe(words=...) needs the run's prompt to find the words (a run given only prompt_embeds "
                "has none); pass the prompt text instead, through attnctl.attach or an attnctl pipeline, or give "
                "tokens=[...]"
            )

    def _word_columns(self, layout) -> tuple[list[int], list[str]]:
        """Text positions of the words in one prompt's layout, and the word of each (a phrase such as ``"red circle"``:
        its words' tokens where it stands in the prompt, mapped together as one)."""
        if layout is None:
            raise LayoutError(f"AttentionProbe(words=...): {NO_RUN}", fix=NO_RUN_FIX)
        segs = tuple(self.config.segments) if self.config.segments else None
        check_segments(layout, segs, "AttentionProbe")
        pos, cols = [], []
        for w in self.config.words:
            p = layout.phrase_tokens(w, segs)
            pos.extend(p)
            cols.extend([w] * len(p))
        return pos, cols

    def _resolve(self, call, state: RunState) -> list[int]:
        if self._positions is not None:
            return self._positions
        cfg, layout = self.config, state.layout
        if cfg.words is not None and state.row_layouts is not None:  # several prompts: name columns by the first
            layout = next(lay for lay in state.row_layouts if lay is not None)
        if cfg.words is not None:
            pos, cols = self._word_columns(layout)
        elif cfg.tokens is not None:
            pos, cols = list(cfg.tokens), [str(t) for t in cfg.tokens]
        else:
            pos = list(range(call.n_text))
            cols = [str(t) for t in pos]
        bad = [p for p in pos if not 0 <= p < call.n_text]
        if bad:
            raise ConfigError(f"AttentionProbe: token positions {bad} are outside the {call.n_text} text tokens")
        self._positions, self._columns = pos, cols
        return pos

    def contribute(self, call, q, k, v, state: RunState):
        if call.n_text == 0:  # image-only attention (SD3.5 attn2) has no text columns
            return []
        if state.skip_layer_pass:  # the step's conditional rows once more, in a model with layers left out
            return []
        w = self._weight_schedule()(*state.schedule_step)
        if w == 0:
            return []
        pos = self._resolve(call, state)
        start = call.text_slice().start
        cols = state.index([start + p for p in pos], call.device)
        heads = None
        if self.config.heads is not None:
            bad = [h for h in self.config.heads if not 0 <= h < call.site.heads]
            if bad:
                raise ConfigError(f"AttentionProbe: heads {bad} do not exist at {call.site.name} "
                                  f"(heads 0..{call.site.heads - 1})")
            heads = state.index(self.config.heads, call.device)
        if self.config.words is not None and state.row_layouts is None:  # rows whose tokens the words are found in
            batch = state.rows_by_prompt(self.config.roles, call.batch, call.device)[0][1]
        else:
            batch = state.rows_with(self.config.roles, call.batch, call.device)
        if batch is not None and len(batch) == 0:
            return []
        img = call.image_slice()
        if state.layout is not None:  # maps of the generated grid's queries (not FLUX Kontext's reference tokens)
            self.grid = image_grid(state.layout, call.n_image, "AttentionProbe", call.site.name, reference_ok=True)
            img = call.grid_slice(self.grid[0] * self.grid[1])
        self.calls += 1
        self._steps.add(state.step)
        if self.config.words is None or state.row_layouts is None:
            return [Probe(cols, lambda p, w=w: self._add(p, w), Selection(batch, img, heads))]
        return self._per_prompt(call, state, start, heads, w, img)

    def _per_prompt(self, call, state: RunState, start: int, heads, weight: float, img: slice) -> list[Probe]:
        """Several prompts in one call: each prompt's rows are probed on its own tokens of the words, into the
        rows of one buffer (the words must take as many tokens in every prompt, so the columns line up)."""
        groups = state.rows_by_prompt(self.config.roles, call.batch, call.device)
        selected = sorted(r for _, _, rows in groups for r in rows)
        order = {r: i for i, r in enumerate(selected)}  # buffer row of each batch row, in batch order
        n_heads = call.site.heads if heads is None else len(heads)
        self._mass += n_heads * weight  # once per call, whatever the number of prompts
        out = []
        for layout, rows, host_rows in groups:
            pos = self._positions_in(layout)
            cols = state.index([start + p for p in pos], call.device)
            where = state.index([order[r] for r in host_rows], call.device)
            out.append(Probe(cols, lambda p, where=where: self._add_rows(p, weight, where, len(selected)),
                             Selection(rows, img, heads)))
        return out

    def _positions_in(self, layout) -> list[int]:
        """The words' positions in one prompt of a several-prompt call, checked once per run to line up with the
        columns of the first prompt."""
        kept = self._prompt_positions.get(id(layout))
        if kept is not None and kept[0] is layout:
            return kept[1]
        pos, names = self._word_columns(layout)
        if names != self._columns:
            raise LayoutError(
                f"AttentionProbe: the words {self.config.words} take other tokens in {layout.prompt!r} "
                f"({names}) than in the call's first prompt ({self._columns}), so their maps cannot share "
                "columns", fix="probe these prompts in separate calls")
        self._prompt_positions[id(layout)] = (layout, pos)
        return pos

    def _add(self, probs: torch.Tensor, weight: float) -> None:
        m = probs.sum(dim=2) * weight  # (rows, N_img, tokens), summed over heads
        self._sum = m if self._sum is None else self._sum + m
        self._mass += probs.shape[2] * weight

    def _add_rows(self, probs: torch.Tensor, weight: float, where: torch.Tensor, n_rows: int) -> None:
        m = probs.sum(dim=2) * weight  # (rows of one prompt, N_img, tokens)
        if self._sum is None:
            self._sum = m.new_zeros((n_rows, *m.shape[1:]))
        self._sum.index_add_(0, where, m)

    # ------------------------------------------------------------------------------ results
    def maps(self) -> torch.Tensor:
        """Mean attention ``(rows, tokens, h, w)`` over heads, sites and weighted steps of the last run."""
        if self._sum is None and self._started:
            raise LayoutError("AttentionProbe mapped nothing in the last run: its weight was 0 at every step, or no "
                              "call reached its sites and roles", fix="check weight=, sites= and roles=")
        if self._sum is None:
            raise LayoutError("AttentionProbe has no maps yet: run the pipeline with the probe attached first")
        h, w = self.grid if self.grid is not None else (int(self._sum.shape[1] ** 0.5),) * 2
        avg = self._sum / self._mass
        return avg.permute(0, 2, 1).reshape(avg.shape[0], avg.shape[2], h, w)

    def word_maps(self) -> dict[str, torch.Tensor]:
        """``{word: (rows, h, w)}``, each the sum over the word's tokens (all tokenizer segments)."""
        maps = self.maps()
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._columns):
            out[name] = out[name] + maps[:, i] if name in out else maps[:, i].clone()
        return out

    def summary(self) -> str | None:
        if not self.calls:
            return None
        what = ", ".join(map(repr, self.config.words)) if self.config.words is not None else (
            f"tokens {self.config.tokens}" if self.config.tokens is not None else "every text token")
        return f"attention probe of {what}: maps over {self.calls} attention calls at {len(self._steps)} steps"

    def heatmap(self, word: str, size: tuple[int, int], row: int = 0) -> torch.Tensor:
        """One word's map upsampled to ``size`` (h, w) and scaled to [0, 1], for overlays."""
        maps = self.word_maps()
        if word not in maps:
            raise LayoutError(f"AttentionProbe: no map for {word!r}; mapped: {', '.join(maps)}")
        m = maps[word][row][None, None].float()
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
