"""IsolationAttention: several subjects in one image, none looking at another; each drawn after its reference.

After IR-Diffusion's isolation and reposition attention (with ConsiStory's masks from attention), moved to MM-DiT
joint attention (SD3, SD3.5, FLUX.1); ``docs/isolation.md`` has the derivation. In short, for the image queries of
a *target* row (the prompt that names every subject), at every selected site from the second step on:

- **masks** — subject ``i``'s mask is where the image tokens' attention on its words, read as a cross-attention map
  (the plain softmax over the text keys alone; summed over heads, tokens, the probed sites and the model calls of
  the previous denoising step), is above Otsu's threshold (:mod:`attnctl.subject_masks`);
- **isolation** — a query in subject ``i``'s mask gets ``log(1 − isolation_t)`` (``−∞`` at 1) on the image keys
  of the other subjects' masks (keys in its own mask too are left alone): no subject reads another;
- **reposition** (``references=True``) — the call's prompts come as ``[reference_1 … reference_n, target]``,
  reference ``i`` a prompt of subject ``i`` alone. Reference ``i``'s image keys and values inside its own mask are
  cropped to the mask's box, resized (nearest) onto the box of the target's mask ``i`` and laid on an empty canvas;
  the target's queries inside its mask ``i`` (a random ``1 − dropout`` of them each step) attend to that canvas with
  weight ``reposition_t`` (``log`` of it on the logits), every other query and canvas token gets ``−∞``. On FLUX the
  relocated keys are turned from their reference positions to their target positions (RoPE is a rotation per
  position: ``R(θ_target)·R(−θ_reference)``).

References and text queries keep their plain attention. No ``N × N`` tensor is held: the bias of each chunk of
query rows is made from the masks when the processor asks for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, LayoutError, SiteError, WordCutOffError
from ..layout import image_grid, text_words
from ..processors.contributions import DenseBias, ExtraKV, Probe, Selection
from ..schedules import as_schedule, bounded
from ..subject_masks import otsu_masks, relocation
from .base import Control, ControlConfig, RunState, SegmentList, clean_words, register, word_columns
from .regulation import JOINT_KINDS

_MAIN = object()
"""A call whose rows are those the masks are made in (:meth:`IsolationAttention._rows_of`)."""


class IsolationConfig(ControlConfig):
    subjects: list[str] = Field(..., description="the subjects, each a word or phrase of the target prompt, e.g. "
                                                 "['red circle', 'blue square']")
    references: bool = Field(False, description="the call's prompts are [reference_1 … reference_n, target] sets: "
                                                "reference i shows subject i alone (reposition needs them)")
    isolation: bounded(0, 1) = Field(1.0, description="schedule: 1 removes the other subjects' keys from a "
                                                      "subject's queries, 0 leaves them")
    reposition: bounded(0, None) = Field(0.9, description="schedule: weight of the relocated reference keys "
                                                          "(references=True); 0: none")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, allow_inf_nan=False,
                           description="share of a target mask's queries kept off their reference at each step")
    segments: SegmentList = Field(None, description="tokenizer segments to take the words from (clip, t5)")
    sites: str | list[str] = Field("late", description="site selector; 'late': the sites of the second half of "
                                                       "the blocks by depth (IR-Diffusion: the decoder side)")
    seed: int = Field(0, description="seed of the dropout")

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("subjects is empty; name each subject by words of the target prompt, e.g. "
                             "['red circle', 'blue square']")
        return clean_words(v, "subjects", "red circle")

    @model_validator(mode="after")
    def _needs(self) -> IsolationConfig:
        if len(self.subjects) < 2 and not self.references:
            raise ValueError(f"one subject ({self.subjects[0]!r}) has no other subject to be isolated from; name two "
                             "or more, or give references=True to reposition it after its reference")
        # (the default, as to_json writes it, is not "set": a saved control loads back)
        default = str(as_schedule(type(self).model_fields["reposition"].default, lo=0.0))
        off = str(as_schedule(0.0, lo=0.0))  # reposition=0 says "none", which is what references=False does
        if "reposition" in self.model_fields_set and not self.references and str(self.reposition) not in (off, default):
            raise ValueError("reposition is set but references=False, so there is nothing to reposition from; give "
                             "references=True with the prompts [reference_1 … reference_n, target]")
        return self


def late_sites(sites):
    """The sites of the second half of the blocks, by depth; at least one. By block, not by place in the list:
    SD3.5's first blocks hold two sites each (``attn`` and ``attn2``), so half the list reaches back into the first
    half of the model (SD3.5-medium: block 9 of 24)."""
    blocks = list(dict.fromkeys(s.block for s in sites))  # in order of depth
    late = set(blocks[len(blocks) // 2:])
    return [s for s in sites if s.block in late] or sites[-1:]


def _repeats(layouts: list | None, rows: list[int]) -> int:
    """How many consecutive rows each prompt of the call takes (diffusers repeats each prompt
    ``num_images_per_prompt`` times in order), when every prompt takes the same number; else 1."""
    if not layouts or not rows:
        return 1
    runs, last = [], None
    for r in rows:
        if runs and layouts[r] is last:
            runs[-1] += 1
        else:
            runs.append(1)
            last = layouts[r]
    return runs[0] if len(set(runs)) == 1 else 1


@register
class IsolationAttention(Control):
    """Subjects that do not read each other (isolation), each drawn from its reference (reposition)."""

    kind = "isolation"
    Config = IsolationConfig
    named_sites = {"late": late_sites}
    metrics = {"coverage": "the mean share of the image in the target subjects' masks at the step"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reset()

    def prompt_words(self) -> list[str]:
        return list(self.config.subjects)

    gates_from_step = 1  # the masks come from step 0's maps: it steers from step 1 on

    def gate_groups(self) -> list[tuple[str, ...]]:
        return [("isolation", "reposition")] if self.config.references else [("isolation",)]

    def reset(self) -> None:
        self._columns: dict[int, tuple[Any, list[list[int]]]] = {}
        self._sum: torch.Tensor | None = None  # (batch, subjects, N_img): this step's maps
        self._masks: torch.Tensor | None = None  # (batch, subjects, N_img) bool: the previous step's
        self._keep: torch.Tensor | None = None  # (batch, subjects, N_img) bool: queries kept on their reference
        self._plan: dict[str, Any] | None = None  # what the step's masks give every steered call (:meth:`_planned`)
        self._sets: list[tuple[list[int], int]] | None = None  # (reference rows, target row) or ([], target row)
        self._main: tuple[str, ...] | None = None  # the roles of the run's calls the masks are made in (see _rows_of)
        self._row_maps: dict[tuple, Any] = {}  # _rows_of's answer per call roles, worked out once per run
        self._copy_maps: dict[tuple, dict[int, int]] = {}  # _copies' answer per call roles, the same way
        self._own: dict[int, tuple[int, ...]] = {}  # conditional row -> the subjects its prompt shows
        self._parts: dict[tuple, list] = {}  # the probes' columns, rows and subjects (:meth:`_probe_parts`)
        self.calls = 0
        self.reposition_calls = 0
        self._coverage: list[Any] = []  # per step, as a device tensor until read (see coverage)

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self, controller) -> None:
        super().bind(controller)
        if not any(s.kind in JOINT_KINDS for s in self.sites):
            raise SiteError(
                f"IsolationAttention: the sites {self.config.sites!r} have no image-text attention, where the "
                "subjects' masks come from", fix="select joint sites as well, e.g. sites='all' or 'late'")

    def begin_run(self, state: RunState) -> None:
        self.reset()
        self.config.isolation.reset()
        self.config.reposition.reset()

    def end_step(self, state: RunState) -> None:
        # the maps sum over every model call of a denoising step (the midpoint scheduler makes two) and are split
        # once, at its end: the next step's calls all use the same masks and the same dropout
        last_call = (state.step + 1) % max(1, state.calls_per_step) == 0
        if self._sum is None or not last_call:
            return
        self._masks = otsu_masks(self._sum)
        self._sum = None
        self._plan = None
        # one draw for every row, so that a set's image does not depend on the rows before it in the call
        g = torch.Generator().manual_seed((self.config.seed * 1000003 + state.schedule_step[0]) % 2**63)
        keep = torch.rand((1, *self._masks.shape[1:]), generator=g) >= self.config.dropout
        self._keep = keep.to(self._masks.device).expand(self._masks.shape)
        targets = self._target_rows
        if targets:
            self._coverage.append(self._masks[targets].float().mean())  # read when asked: no sync per step
            if self.adaptive:
                self.report({"coverage": float(self._coverage[-1])})

    @property
    def _target_rows(self) -> list[int]:
        """The batch rows whose subjects are isolated (each set's target row)."""
        return [t for _, t in self._sets or []]

    @property
    def coverage(self) -> list[float]:
        """Per step of the last run: the mean share of the image in the target subjects' masks. The masks of a step
        are made when the next one starts; the last step's, from its maps when asked (a run on a stock pipeline
        under :func:`attnctl.attach` has no end the controls see)."""
        self._coverage = [float(c) for c in self._coverage]
        targets = self._target_rows
        if self._sum is None or not targets:
            return list(self._coverage)
        return [*self._coverage, float(otsu_masks(self._sum)[targets].float().mean())]

    # ------------------------------------------------------------------------------ rows and words
    def _words(self, layout, subjects: list[str]) -> list[list[int]]:
        key = (id(layout), tuple(subjects))
        kept = self._columns.get(key)
        if kept is not None and kept[0] is layout:
            return kept[1]
        cols = word_columns(layout, subjects, self.config.segments, None, "IsolationAttention", noun="subject",
                            field="subjects", verb="isolate")
        self._columns[key] = (layout, cols)
        return cols

    def _row_sets(self, state: RunState, batch: int) -> list[tuple[list[int], int]]:
        """(reference rows, target row) per target among the conditional rows: every row is a target, or with
        references consecutive sets of ``n + 1`` rows, ``[reference_1 … reference_n, target]`` (the prompts in
        that order, one image each). Every row's prompt is checked for its subjects' words."""
        rows = state._row_list(("cond",), batch)
        n = len(self.config.subjects)
        if not self.config.references:
            sets = [([], r) for r in rows]
        elif len(rows) % (n + 1):
            raise ConfigError(
                f"IsolationAttention(references=True) has {n} subjects, so the call's prompts must come in sets of "
                f"{n + 1} ([reference_1 … reference_{n}, target]); it has {len(rows)} conditional row(s)",
                fix=f"pass prompt=[{', '.join(f'<{s} alone>' for s in self.config.subjects)}, <the scene>] with one "
                    "image per prompt (repeat the set in the list for more images)")
        else:
            if _repeats(state.row_layouts, rows) > 1:
                raise ConfigError(
                    "IsolationAttention(references=True) takes one image per prompt, and this call repeats a prompt "
                    "on consecutive rows (num_images_per_prompt > 1), so its sets of references and scene are not "
                    "one prompt after another", fix="pass num_images_per_prompt=1; for more images repeat the set in "
                                                    "the prompt list, or call again with another seed")
            sets = [(rows[s:s + n], rows[s + n]) for s in range(0, len(rows), n + 1)]
        self._own = {}  # row -> the subjects its prompt shows
        for refs, target in sets:
            for i, r in enumerate(refs):
                self._own[r] = (i,)
            self._own[target] = tuple(range(n))
        for r, own in self._own.items():
            try:
                self._words(self._layout(state, r), [self.config.subjects[i] for i in own])
            except WordCutOffError:
                raise
            except LayoutError as e:
                if not self.config.references:
                    raise
                raise self._out_of_order(state, rows, r, own, e) from None
        for _, target in sets:
            self._check_apart(self._layout(state, target))
        return sets

    def _check_apart(self, layout) -> None:
        """Refuse subjects that share tokens of the prompt ("red circle" and "circle" on "a red circle and a blue
        circle"): each would hold the other's tokens, their masks would coincide there, and keys in both masks are
        never barred, so the two could not be kept apart."""
        subjects = self.config.subjects
        cols = self._words(layout, subjects)
        for i in range(len(subjects)):
            for j in range(i + 1, len(subjects)):
                if set(cols[i]) & set(cols[j]):
                    common = [w for w in text_words(subjects[i]) if w in text_words(subjects[j])]
                    said = f"the word(s) {', '.join(map(repr, common))}" if common else "some tokens"
                    prompt = f" of the prompt {layout.prompt!r}" if layout is not None and layout.prompt else ""
                    raise ConfigError(
                        f"IsolationAttention: the subjects {subjects[i]!r} and {subjects[j]!r} share {said}{prompt}, "
                        "so their masks would coincide there and neither could be isolated from the other",
                        fix="name each subject by the words where it alone stands in the prompt, e.g. 'red circle' "
                            "and 'blue circle' rather than 'red circle' and 'circle'")

    def _out_of_order(self, state: RunState, rows: list[int], row: int, own: tuple[int, ...],
                      e: LayoutError) -> LayoutError:
        """The error for a prompt of a set that lacks the subjects its place in the set asks for: most often the
        prompts are in another order than ``[reference_1 … reference_n, scene]``."""
        subjects, n = self.config.subjects, len(self.config.subjects)
        at = rows.index(row)
        layout = self._layout(state, row)
        said = f" ({layout.prompt!r})" if layout is not None and layout.prompt is not None else ""
        role = (f"reference {at % (n + 1) + 1} of its set, the prompt of the subject {subjects[own[0]]!r} alone"
                if len(own) == 1 else f"the scene of set {at // (n + 1) + 1}, which names every subject")
        order = ", ".join([*(f"<{s} alone>" for s in subjects), "<the scene>"])
        return LayoutError(
            f"IsolationAttention(references=True): prompt {at + 1} of the call{said} is read as {role}, and "
            f"{e.problem.split(': ', 1)[-1]}",
            fix=f"give each set's prompts in the order [reference_1 … reference_{n}, scene], here [{order}]; or "
                f"{e.fix}")

    @staticmethod
    def _layout(state: RunState, row: int):
        return state.row_layouts[row] if state.row_layouts is not None else state.layout

    # ------------------------------------------------------------------------------ attention
    def contribute(self, call, q, k, v, state: RunState):
        if state.gradient_pass:
            return []
        # the generated image's tokens: FLUX Kontext's input-image tokens follow them, and stay keys every subject reads
        grid = image_grid(state.layout, call.n_image, "IsolationAttention", call.site.name, reference_ok=True)
        img = call.grid_slice(grid[0] * grid[1])
        here = self._rows_of(state, call.batch)
        if here is None:  # no conditional rows: the unconditional branch stays the plain model's
            return []
        out: list = []
        if here is _MAIN and call.n_text:
            out += self._probes(call, state, img)
        if self._masks is not None:
            out += self._steer(call, k, v, state, grid, img, None if here is _MAIN else here,
                               self._copies(state, call.batch))
        return out

    def _copies(self, state: RunState, batch: int) -> dict[int, int]:
        """Each conditional row's perturbed copy in this call (SoftPAG's branch: the ``k``-th perturbed row copies
        the ``k``-th conditional row), worked out once per run and call roles. The copies are steered as their rows
        are, so a guidance that compares the two sees its perturbation only, not this control's effect once more."""
        roles = tuple(state.roles or ())
        if roles not in self._copy_maps:
            pert = [i for i, r in enumerate(roles) if r.split("[")[0] == "perturbed"]
            cond = state._row_list(("cond",), batch)
            self._copy_maps[roles] = dict(zip(cond, pert, strict=True)) if pert and len(pert) == len(cond) else {}
        return self._copy_maps[roles]

    def _rows_of(self, state: RunState, batch: int) -> object | dict[int, int] | None:
        """How this call's rows relate to the masks' rows. The masks are made in the run's first call with
        conditional rows (for CFG, the batched ``[uncond, cond]`` call): :data:`_MAIN` for such a call. A call with
        other rows — SD3's skip-layer pass on the conditional rows alone — is steered like them, its ``k``-th
        conditional row as the ``k``-th of the masks (the dict maps mask rows to its rows); a call without
        conditional rows (FLUX's true-CFG call for the negative prompt) gives ``None``."""
        roles = tuple(state.roles) if state.roles is not None else ("cond",) * batch
        if roles in self._row_maps:
            return self._row_maps[roles]
        self._row_maps[roles] = found = self._relate(state, roles, batch)
        return found

    def _relate(self, state: RunState, roles: tuple[str, ...], batch: int) -> object | dict[int, int] | None:
        cond = state._row_list(("cond",), batch)
        if self._main is None:
            if not cond:
                return None
            self._main, self._sets = roles, self._row_sets(state, batch)
        if roles == self._main:
            return _MAIN
        if not cond:
            return None
        main_cond = [i for i, r in enumerate(self._main) if r.split("[")[0] == "cond"]
        if len(cond) != len(main_cond):
            raise ConfigError(
                f"IsolationAttention: this call has {len(cond)} conditional rows and the run's first call had "
                f"{len(main_cond)}; the subjects' masks are per conditional row of that call",
                fix="run the conditional rows of one prompt set in every call of the run (one pipeline call)")
        return dict(zip(main_cond, cond, strict=True))

    def _probes(self, call, state: RunState, img: slice) -> list[Probe]:
        """Each conditional row's image queries (``img``) on its own subjects' tokens (rows of one prompt and part
        probed together), summed into this step's maps. The maps are cross-attention maps, as ConsiStory and
        IR-Diffusion read them: the plain attention over the text keys alone, so neither this control's bias and
        reference keys nor how much a query reads the image change them."""
        if self._sum is None:
            self._sum = torch.zeros(call.batch, len(self.config.subjects), img.stop - img.start, device=call.device)
        text = call.text_slice()
        return [Probe(cols, lambda p, idx=idx, which=which: self._add(p, idx, which), Selection(idx, img, None),
                      over=text)
                for cols, idx, which in self._probe_parts(call, state)]

    def _add(self, p: torch.Tensor, idx: torch.Tensor, which: torch.Tensor) -> None:
        """``p``: ``(rows, N_img, heads, tokens)`` probabilities over the text, summed over heads and each subject's
        tokens."""
        self._sum.index_add_(0, idx, (p.float().sum(2) @ which).transpose(1, 2))

    def _probe_parts(self, call, state: RunState) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group of rows (one prompt, one part): the text columns, the rows, and which subject each column is
        of — made once per run and text position (the words do not move within a run)."""
        key = (call.text_slice().start, str(call.device))
        if key in self._parts:
            return self._parts[key]
        n, start = len(self.config.subjects), key[0]
        groups: dict[tuple, list[int]] = {}
        for r, own in self._own.items():
            groups.setdefault((id(self._layout(state, r)), own), []).append(r)
        parts = []
        for (_, own), rows in groups.items():
            cols = self._words(self._layout(state, rows[0]), [self.config.subjects[i] for i in own])
            which = torch.zeros(sum(map(len, cols)), n, device=call.device)  # token → subject
            at = 0
            for i, cs in zip(own, cols, strict=True):
                which[at:at + len(cs), i] = 1
                at += len(cs)
            parts.append((state.index([start + c for cs in cols for c in cs], call.device),
                          state.index(rows, call.device), which))
        self._parts[key] = parts
        return parts

    def _steer(self, call, k, v, state: RunState, grid, img: slice | None = None,
               rows: dict[int, int] | None = None, copies: dict[int, int] | None = None) -> list:
        """The step's isolation bias and reposition keys at one call (``img``: the generated image's tokens, by
        default the grid's first tokens of the image stream; ``rows``: the call's row for each row of the masks,
        when the call's rows are not the masks', see :meth:`_rows_of`; ``copies``: a perturbed copy of some of the
        call's rows, steered with its row's masks, its references' keys taken from their own copies)."""
        img = img if img is not None else call.grid_slice(grid[0] * grid[1])
        iso = float(self.config.isolation(*state.schedule_step))
        rep = float(self.config.reposition(*state.schedule_step)) if self.config.references else 0.0
        if iso == 0 and rep == 0:
            return []
        plan = base = self._planned(grid)
        targets, tm, other = plan["targets"], plan["in_mask"], plan["other"]
        if rows is not None:  # the same masks on this call's own rows
            targets = [rows[t] for t in targets]
            if "source" in plan:
                plan = {**plan, "source_rows": [rows[r] for r in plan["source_rows"]]}
                plan["source"] = state.index(plan["source_rows"], call.device)
        if copies and all(t in copies for t in targets):  # each target twice: as itself, and as its copy
            twice = self._twice(base)
            targets = targets + [copies[t] for t in targets]
            tm, other = twice["in_mask"], twice["other"]
            plan = {**plan, **{k: v for k, v in twice.items() if k not in ("in_mask", "other")}}
            if "source" in plan:
                src = plan["source_rows"] + [copies[r] for r in plan["source_rows"]]
                plan.update(source_rows=src, source=state.index(src, call.device))
        n, n_img = len(self.config.subjects), img.stop - img.start
        n_keys = k.shape[1]
        extra_keys = n * n_img if rep > 0 else 0
        contributions = []
        if extra_keys:
            self.reposition_calls += 1
            ek, ev = self._canvases(call, k, v, plan, img)
            contributions.append(ExtraKV(ek, ev, Selection(state.index(targets, call.device), img, None)))
            keep, valid = plan["kept"], plan["valid"]
        iso_bias = math.log1p(-iso) if iso < 1 else float("-inf")
        rep_bias = math.log(rep) if rep > 0 else float("-inf")

        def fn(r0: int, r1: int) -> torch.Tensor:
            out = torch.zeros(len(targets), r1 - r0, 1, n_keys + extra_keys, device=call.device)
            a0, a1 = max(r0, img.start), min(r1, img.stop)
            if a0 >= a1:
                return out
            q_in = tm[:, :, a0 - img.start:a1 - img.start]  # (T, n, rows): query rows in each mask
            if iso > 0:
                barred = torch.einsum("tnr,tnc->trc", q_in, other) > 0  # (T, rows, N_img)
                out[:, a0 - r0:a1 - r0, 0, img] = torch.where(barred, iso_bias, 0.0)
            if extra_keys:
                on = keep[:, :, a0 - img.start:a1 - img.start]  # (T, n, rows)
                allowed = (on[..., None] * valid[:, :, None, :]) > 0  # (T, n, rows, N_img)
                block = torch.where(allowed, rep_bias, float("-inf"))
                out[:, a0 - r0:a1 - r0, 0, n_keys:] = block.permute(0, 2, 1, 3).reshape(len(targets), a1 - a0, -1)
            return out

        self.calls += 1
        contributions.append(DenseBias(fn, Selection(state.index(targets, call.device), None, None)))
        return contributions

    @staticmethod
    def _twice(plan: dict[str, Any]) -> dict[str, Any]:
        """The step's per-target tensors of ``plan`` stacked twice (targets and their perturbed copies), made once per
        step and kept in the step's plan."""
        if "twice" not in plan:
            names = [k for k in ("in_mask", "other", "kept", "index", "valid") if k in plan]
            plan["twice"] = {k: torch.cat([plan[k], plan[k]]) for k in names}
        return plan["twice"]

    def _planned(self, grid) -> dict[str, Any]:
        """What this step's masks give every steered call, made once per step (the masks change only between
        steps): per target its masks ``in_mask`` ``(T, n, N_img)``, the other subjects' keys of each subject
        ``other`` (``c`` in some mask ``j ≠ i`` and not in ``i``), the queries ``kept`` on their reference, and per
        (target, subject) the reference token shown at each canvas token and whether it is ``valid``."""
        if self._plan is not None:
            return self._plan
        masks, h, w = self._masks, *grid
        targets = [t for _, t in self._sets]
        tm = masks[targets].float()
        plan: dict[str, Any] = {"targets": targets, "in_mask": tm,
                                "other": (((tm.sum(1, keepdim=True) - tm) > 0) & (tm == 0)).float(),
                                "kept": self._keep.to(tm.device)[targets].float() * tm}
        if self.config.references:
            index, valid, src = [], [], []
            for refs, t in self._sets:
                for i, r in enumerate(refs):
                    moved = relocation(masks[r, i].view(h, w), masks[t, i].view(h, w))
                    if moved is None:  # an empty mask: nothing of this reference is shown
                        moved = (torch.zeros(h * w, dtype=torch.long, device=masks.device),
                                 torch.zeros(h * w, dtype=torch.bool, device=masks.device))
                    index.append(moved[0])
                    valid.append(moved[1])
                    src.append(r)
            plan["index"] = torch.stack(index)  # (T·n, N_img): reference token shown at each canvas token
            plan["valid"] = torch.stack(valid).view(len(targets), -1, h * w).float()
            plan["source"] = torch.tensor(src, device=masks.device)
            plan["source_rows"] = src
        self._plan = plan
        return plan

    def _canvases(self, call, k, v, plan, img: slice):
        """Per target, each reference's image keys and values (``img``) laid on the target's canvas:
        ``(T, n·N_img, H, d)``."""
        index = plan["index"]
        src = plan["source"][:, None]
        ek = k[:, img][src, index]  # (T·n, N_img, H, d)
        ev = v[:, img][src, index]
        if call.rotary is not None:  # FLUX: a key relocated from reference token index[p] to canvas token p
            cos, sin = (x[img] for x in call.rotary)
            ek = torch.stack([self._turn(e, cos[i], sin[i], cos, sin) for e, i in zip(ek, index, strict=True)])
        shape = (plan["valid"].shape[0], -1, *k.shape[2:])
        return ek.reshape(shape), ev.reshape(shape)

    @staticmethod
    def _turn(key: torch.Tensor, cos_from, sin_from, cos_to, sin_to) -> torch.Tensor:
        """``R(θ_to)·R(−θ_from)·key`` for ``(N, H, d)`` keys (RoPE rotates each pair of channels by its angle)."""
        back = apply_rotary_emb(key[None], (cos_from, -sin_from), sequence_dim=1)
        return apply_rotary_emb(back, (cos_to, sin_to), sequence_dim=1)[0].to(key.dtype)

    def summary(self) -> str | None:
        if not self.calls:
            return None
        cov = f", subject masks {sum(self.coverage) / len(self.coverage):.0%} of the image" if self.coverage else ""
        rep = f" (reposition from references at {self.reposition_calls})" if self.reposition_calls else ""
        return f"isolation of {len(self.config.subjects)} subjects at {self.calls} attention calls{rep}{cov}"
