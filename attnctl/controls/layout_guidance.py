"""LayoutGuidance: put each named word where its box says, by a gradient step on the latents.

After the inter-token and self-attention constraints of CSG ("Training-free Composite Scene Generation for
Layout-to-Image Synthesis") and the layout guidance it builds on, moved from SD1.x cross-attention to the joint
attention of MM-DiT (SD3, SD3.5, FLUX.1). ``docs/layout.md`` has the derivation; in short:

1. At each step where the schedule ``scale`` (``η_t``) is above zero, one forward of the conditional rows records,
   at every selected joint site, the map of each word ``t`` (a phrase: all its words' tokens)::

       A_t(r) = mean over heads of  Σ_{c ∈ tokens(t)} softmax_over_text_keys(q_r·k_c/√d)

   for every image token ``r``: the image→text slice of the joint attention renormalised over the text keys, as
   in a cross-attention softmax. Only image-query × text-key logits are formed, never the image×image block.
2. The loss, per image, averaged over the sites (``loss="ratio"``, layout guidance)::

       L = mean_t (1 − Σ_r m_t(r)·A_t(r) / Σ_r A_t(r))²

   with ``m_t(r)`` the fraction of token ``r``'s cell inside box ``t``. ``loss="csg"`` takes CSG's selective form:
   the ``k = max(1, ⌊0.8·|box|⌋)`` largest in-box values, a random half ``r`` of them against the ``r`` largest
   outside values, ``L_intra = (1 − S_in/(S_in + S_out))²``, plus ``50·L_inter``, where
   ``L_inter = (min(mean_in − 0.1, M) − M)²`` and ``M`` is the largest mean map of another word at those pixels
   (non-zero only when another word comes within the margin ``0.1``).

   ``self_weight > 0`` adds CSG's self-attention constraint, ``self_weight · L_self``: for each box ``b`` (and the
   background, the image outside every box) the mean self-attention map of the image tokens inside it,
   ``S_b(j) = Σ_r w_b(r) · softmax_over_image_keys(q_r·k_j/√d)`` (``w_b`` the cells' coverage, summing to 1; heads
   averaged), enters the same ratio (or CSG form, without the inter-token term) as a word map over keys ``j``:
   a box's pixels should look at their own box. Only chunks of image-query × image-key logits are formed, each
   recomputed in the backward; the ``N_img × N_img`` map is never held.
3. :mod:`attnctl.latent_guidance` then steps ``z ← z − η_t·σ_t·∇L/rms(∇L)`` (``iterations`` times) and runs the
   step from the moved latent under the unchanged diffusers loop.

Outside the gradient pass the control adds nothing to the attention: every site stays on the stock fused kernel.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, field_validator
from torch.utils.checkpoint import checkpoint

from ..errors import LayoutError, SiteError
from ..layout import image_grid
from ..processors.contributions import index_tensor
from ..schedules import bounded
from .base import Control, ControlConfig, RunState, SegmentList, clean_words, register, word_columns
from .regulation import JOINT_KINDS, mid_depth_sites

CSG_SAMPLE = 0.8
"""CSG's selective sampling: the top ``0.8·|box|`` in-box values ..."""
CSG_KEEP = 0.5
"""... of which a random half enters the ratio."""
CSG_MARGIN = 0.1
"""Inter-token constraint: another word's mean map may come no closer than this to the word's own."""
CSG_INTER_WEIGHT = 50.0
"""Weight of the inter-token term against the intra-token one (CSG's 5·(ΣL_intra + 50·ΣL_inter); the overall 5
does not matter here, the step is normalised)."""
MAP_CHUNK_ELEMS = 1 << 24
"""Bound on the logits of one chunk of image rows in the word maps (64 MiB in float32; chunks are recomputed in the
backward, so the gradient pass holds only a few at a time)."""
_TINY = 1e-12


class LayoutConfig(ControlConfig):
    boxes: dict[str, list[float]] = Field(
        ..., description="word (or phrase) -> [x0, y0, x1, y1], fractions of the image width and height from the "
                         "top left, e.g. {'circle': [0.05, 0.1, 0.45, 0.5]}")
    segments: SegmentList = Field(None, description="tokenizer segments to take the words from (clip, t5); "
                                                         "None: every segment of the model")
    missing: Literal["error", "ignore"] = Field("error", description="a word absent from the prompt: raise, or "
                                                                     "guide the words that are present")
    sites: str | list[str] = Field("all", description="site selector; 'all': every joint (image-text) site, "
                                                      "'mid': the middle third by depth")
    scale: bounded(0, None) = Field("window(0.15, 0, 0.3)", description="schedule of the step size η (in units of "
                                                                        "the latent's scale, times σ_t); 0: no step")
    iterations: int = Field(1, description="gradient steps per guided step")
    loss: Literal["ratio", "csg"] = Field("ratio", description="ratio: layout guidance's in-box share; csg: CSG's "
                                                               "selective intra- and inter-token constraints")
    seed: int = Field(0, description="seed of CSG's random half of the sampled in-box values")
    self_weight: float = Field(
        0.0, ge=0.0, allow_inf_nan=False,
        description="weight of CSG's self-attention constraint (each box's pixels attend to their own box, the "
                    "background to the background); 0: off")

    @field_validator("boxes")
    @classmethod
    def _boxes(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        if not v:
            raise ValueError("boxes is empty; give at least one word and its box, e.g. "
                             "boxes={'circle': [0.05, 0.1, 0.45, 0.5]}")
        words = clean_words(list(v), "boxes", "circle")  # (as the other word controls: no punctuation-only key)
        return {w: checked_box(box, f"the box of {w!r}") for w, box in zip(words, v.values(), strict=True)}

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        return guided_iterations(v)


def checked_box(box: Any, what: str) -> list[float]:
    """``box`` as ``[x0, y0, x1, y1]`` floats, fractions of the image from the top left with positive area; a
    ``ValueError`` naming ``what`` otherwise (config validators turn it into the control's error)."""
    if not isinstance(box, list | tuple) or len(box) != 4 or \
            not all(isinstance(x, int | float) and math.isfinite(x) for x in box):
        raise ValueError(f"{what} is {box!r}; write [x0, y0, x1, y1] as four finite numbers")
    x0, y0, x1, y1 = (float(x) for x in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"{what} is {box!r}; need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                         "(fractions of the image from the top left)")
    return [x0, y0, x1, y1]


def in_backward() -> bool:
    """Autograd is running a backward on this thread: a checkpointed block (``enable_gradient_checkpointing``) is
    computing its forward again. A control's loss made there is the one already counted, and must be made again
    only for the gradient. (torch's record of the running backward: -1 outside one.)"""
    return torch._C._current_graph_task_id() != -1


def guided_iterations(v: int) -> int:
    """The gradient steps per guided step of a latent-guidance control: at least one."""
    if v < 1:
        raise ValueError(f"iterations={v}: need at least one gradient step per guided step (default 1); "
                         "set scale=0 to turn the guidance off")
    return v


# --------------------------------------------------------------------------------------------- math


def box_coverage(boxes: list[list[float]], grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(h·w, S)``: the fraction of each image token's cell (row-major) that lies inside each box."""
    h, w = grid
    # in float64, rounded to 1e-9: a cell a box covers whole is exactly 1 on any grid (float32 gave 0.9999995 on
    # grids that are not a power of two, which left a phantom background of every cell)
    ys = torch.arange(h + 1, dtype=torch.float64, device=device) / h
    xs = torch.arange(w + 1, dtype=torch.float64, device=device) / w
    cols = []
    for x0, y0, x1, y1 in boxes:
        fy = ((ys[1:].clamp(max=y1) - ys[:-1].clamp(min=y0)).clamp(min=0) * h)  # (h,) fraction of each row band
        fx = ((xs[1:].clamp(max=x1) - xs[:-1].clamp(min=x0)).clamp(min=0) * w)
        cols.append((fy[:, None] * fx[None, :]).reshape(-1))
    return (torch.stack(cols, dim=1) * 1e9).round().div(1e9).float()


def word_maps(q_img: torch.Tensor, k_text: torch.Tensor, columns: list[list[int]],
              max_elems: int = MAP_CHUNK_ELEMS) -> torch.Tensor:
    """``(batch, N_img, S)``: each word's share of the image tokens' text attention, averaged over heads.

    ``q_img`` ``(batch, N_img, heads, d)``, ``k_text`` ``(batch, T, heads, d)``; ``columns[t]`` the text positions of
    word ``t`` (an empty list gives a zero map). The softmax runs over the text keys only. Query rows go in chunks of
    at most ``max_elems`` logits, each recomputed in the backward instead of kept (activation checkpointing), so the
    memory of the logits and their gradients stays within a few chunks whatever the image size."""
    b, n, h, _ = q_img.shape
    rows = max(1, max_elems // max(1, b * h * k_text.shape[1]))
    scaled = q_img.float() * (1.0 / math.sqrt(q_img.shape[-1]))  # on q, not on the N_img·T logits
    k = k_text.float()
    if n <= rows:
        return _chunk_maps(scaled, k, columns)
    chunks = [checkpoint(_chunk_maps, scaled[:, r0:r0 + rows], k, columns, use_reentrant=False)
              for r0 in range(0, n, rows)]
    return torch.cat(chunks, dim=1)


def _chunk_maps(q: torch.Tensor, k: torch.Tensor, columns: list[list[int]]) -> torch.Tensor:
    p = torch.einsum("bnhd,bthd->bhnt", q, k).softmax(dim=-1)
    maps = [p[..., cols].sum(-1) if cols else p.new_zeros(p.shape[:-1]) for cols in columns]
    return torch.stack(maps, dim=-1).mean(dim=1)


def self_maps(q_img: torch.Tensor, k_img: torch.Tensor, weights: torch.Tensor,
              max_elems: int = MAP_CHUNK_ELEMS) -> torch.Tensor:
    """``(batch, N_img, B)``: each box's mean self-attention map over the image keys, averaged over heads.

    ``S_b(j) = Σ_r weights[r, b] · softmax_over_image_keys(q_r·k_j/√d)`` with ``weights`` ``(N_img, B)`` (columns
    summing to 1). The keys sit on the token axis, so the word maps' losses apply unchanged. Query rows go in
    checkpointed chunks of at most ``max_elems`` logits (as :func:`word_maps`): the image×image map is never held."""
    b, n, h, _ = q_img.shape
    rows = max(1, max_elems // max(1, b * h * k_img.shape[1]))
    scaled = q_img.float() * (1.0 / math.sqrt(q_img.shape[-1]))
    k, w = k_img.float(), weights.to(torch.float32)
    if n <= rows:
        return _chunk_self(scaled, k, w)
    total = None
    for r0 in range(0, n, rows):
        part = checkpoint(_chunk_self, scaled[:, r0:r0 + rows], k, w[r0:r0 + rows], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _chunk_self(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    p = torch.einsum("bnhd,bmhd->bhnm", q, k).softmax(dim=-1)
    return torch.einsum("bhnm,nc->bmc", p, w) / p.shape[1]


def self_boxes(cover: torch.Tensor) -> torch.Tensor:
    """The boxes of the self-attention term: the word boxes' cell coverage plus, when any cell is left, the
    background (the part of each cell outside every box, read as ``1 − max_b cover_b``: exact unless two boxes
    share a cell only in part)."""
    background = (1 - cover.amax(dim=1, keepdim=True)).clamp_min(0)
    return torch.cat([cover, background], dim=1) if float(background.sum()) > 0 else cover


def ratio_loss(maps: torch.Tensor, cover: torch.Tensor, present: list[bool]) -> torch.Tensor:
    """Layout guidance, per image ``(batch,)``: ``mean_t (1 − Σ_r m_t·A_t / Σ_r A_t)²`` over the present words."""
    inside = (maps * cover).sum(1) / maps.sum(1).clamp_min(_TINY)  # (batch, S)
    weight = torch.tensor([float(p) for p in present], device=maps.device)
    return ((1 - inside) ** 2 * weight).sum(-1) / max(1, sum(present))


def box_tokens(cover: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Per box, the image tokens inside it and outside it, for CSG's sampling (on the host, once per grid): a token
    is inside when at least half its cell is; a box that holds no token this way takes the token it covers most."""
    cover = cover.detach().cpu()
    out = []
    for t in range(cover.shape[1]):
        inside = cover[:, t] >= 0.5
        if not bool(inside.any()):
            inside[int(cover[:, t].argmax())] = True
        out.append((inside.nonzero().flatten().tolist(), (~inside).nonzero().flatten().tolist()))
    return out


def csg_loss(maps: torch.Tensor, tokens: list[tuple[list[int], list[int]]], present: list[bool],
             generator: torch.Generator | None, sample: float = CSG_SAMPLE, keep: float = CSG_KEEP,
             margin: float = CSG_MARGIN, inter_weight: float = CSG_INTER_WEIGHT) -> torch.Tensor:
    """CSG's selective intra-token ratio plus its inter-token constraint, per image ``(batch,)`` (module doc);
    ``tokens`` from :func:`box_tokens` (lists, or index tensors already on the maps' device)."""
    total = maps.new_zeros(maps.shape[0])
    for t, (idx_in, idx_out) in enumerate(tokens):
        if not present[t]:
            continue
        idx_in, idx_out = (torch.as_tensor(x, dtype=torch.long, device=maps.device) for x in (idx_in, idx_out))
        vals_in = maps[:, idx_in, t]
        k = max(1, int(sample * len(idx_in)))
        r = max(1, round(keep * k))
        top = vals_in.topk(k, dim=1).indices  # (b, k) positions among the in-box tokens
        pick = torch.randperm(k, generator=generator)[:r].to(top.device)
        chosen = top.index_select(1, pick)  # (b, r)
        s_in = vals_in.gather(1, chosen).sum(1)
        if len(idx_out):
            s_out = maps[:, idx_out, t].topk(min(r, len(idx_out)), dim=1).values.sum(1)
        else:
            s_out = torch.zeros_like(s_in)
        total = total + (1 - s_in / (s_in + s_out).clamp_min(_TINY)) ** 2
        others = [u for u in range(len(tokens)) if u != t and present[u]] if inter_weight else []
        if others:
            pixels = idx_in[chosen]  # (b, r) image tokens
            mean_in = maps[:, :, t].gather(1, pixels).mean(1)
            m_other = torch.stack([maps[:, :, u].gather(1, pixels).mean(1) for u in others], dim=1).amax(1)
            total = total + inter_weight * (torch.minimum(mean_in - margin, m_other) - m_other) ** 2
    return total


# --------------------------------------------------------------------------------------------- control


class _Boxes(NamedTuple):
    """The boxes at one grid and device: the words' cell coverage and CSG tokens; for the self-attention term the
    same for the boxes of the words present in the prompt, with the background (outside those boxes) appended, and
    the coverage normalised per box as query weights (None: term off)."""

    cover: torch.Tensor
    tokens: list
    own: torch.Tensor | None
    own_weights: torch.Tensor | None
    own_tokens: list


@register
class LayoutGuidance(Control):
    """Words go into their boxes: a latent-gradient step per guided step on a loss of the word maps."""

    kind = "layout"
    gates = ("scale",)
    Config = LayoutConfig
    named_sites = {"mid": mid_depth_sites}
    metrics = {"loss": "the layout loss of the step's gradient pass, mean over the rows"}
    latent_guidance = True  # the controller wraps the forward with attnctl.latent_guidance.LatentGuidance

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reset()

    def reset(self) -> None:
        self._columns: dict[int, tuple[Any, list[list[int]]]] = {}  # id(layout) -> (layout, columns per word)
        self._cover: dict[tuple, _Boxes] = {}
        self._loss_sum: torch.Tensor | None = None
        self._sites_seen = 0
        self._step = 0
        self._history: list[tuple[int, Any]] = []  # (step, loss as a device tensor until read: see history)
        self._reported = 0  # entries of the history given to the Adaptive schedules
        self._none_present = False  # missing="ignore" and no boxed word in the run's prompts: nothing to guide

    # ------------------------------------------------------------------------------ lifecycle
    def select_sites(self, sites):
        return [s for s in super().select_sites(sites) if s.kind in JOINT_KINDS]  # the sites with word maps

    def prompt_words(self) -> list[str]:
        return list(self.config.boxes) if self.config.missing == "error" else []

    def named_words(self) -> list[str]:
        return list(self.config.boxes)

    def bind(self, controller) -> None:
        super().bind(controller)
        if not self.sites:
            raise SiteError(
                f"LayoutGuidance: the sites {self.config.sites!r} have no image-text attention (image-only sites such "
                "as SD3.5's attn2 have no word maps)",
                fix="select joint sites, e.g. sites='all' or 'transformer_blocks.2:6'")

    def begin_run(self, state: RunState) -> None:
        self.reset()
        self.config.scale.reset()  # read from the config at use: a scale assigned after construction counts
        layouts = [state.layout] if state.row_layouts is None else [lay for lay in state.row_layouts if lay]
        known = [lay for lay in layouts if lay is not None and any(seg.words for seg in lay.segments)]
        found = [any(self._resolve(layout)) for layout in known]  # fail early on absent words
        if known and not any(found):  # only with missing="ignore": said, not silently a no-op
            self._none_present = True
            warnings.warn(f"LayoutGuidance: none of the boxed words {list(self.config.boxes)} is in the run's prompt, "
                          "so nothing is guided (missing='ignore')", UserWarning, stacklevel=2)

    def end_step(self, state: RunState) -> None:
        if self.adaptive:  # the descent steps since the last report (the history counts denoising steps)
            losses = [float(loss) for _, loss in self._history[self._reported:]]
            self._reported = len(self._history)
            if losses:
                self.report({"loss": sum(losses) / len(losses)})

    def step_size(self, step: int, num_steps: int) -> float:
        """``η`` at ``step`` (0: no gradient pass)."""
        return 0.0 if self._none_present else float(self.config.scale(step, num_steps))

    def _resolve(self, layout) -> list[list[int]]:
        kept = self._columns.get(id(layout))
        if kept is not None and kept[0] is layout:
            return kept[1]
        columns = word_columns(layout, list(self.config.boxes), self.config.segments, self.config.missing,
                               "LayoutGuidance", noun="boxed word", field="the keys of boxes", verb="guide")
        self._columns[id(layout)] = (layout, columns)
        return columns

    def _coverage(self, grid: tuple[int, int], device, present: list[bool]) -> _Boxes:
        """The boxes on ``device`` for this grid and these words present (``missing="ignore"``: an absent word's box
        leaves the background alone), made once each (module doc)."""
        key = (grid, str(device), tuple(present))
        if key not in self._cover:
            cover = box_coverage(list(self.config.boxes.values()), grid)  # on the host: the values decide errors
            empty = [w for w, c in zip(self.config.boxes, cover.sum(0).tolist(), strict=True) if c <= 0]
            if empty:
                raise LayoutError(f"LayoutGuidance: the boxes of {empty} cover no image token",
                                  fix="give boxes of positive area inside [0, 1]")
            csg = self.config.loss == "csg"

            def tokens(c: torch.Tensor) -> list:  # on the device once per grid, not at every site
                return [(index_tensor(i, device), index_tensor(o, device)) for i, o in box_tokens(c)] if csg else []

            own = self_boxes(cover[:, present]) if self.config.self_weight > 0 else None
            self._cover[key] = _Boxes(
                cover.to(device), tokens(cover),
                None if own is None else own.to(device),
                None if own is None else (own / own.sum(0)).to(device),
                [] if own is None else tokens(own))
        return self._cover[key]

    # ------------------------------------------------------------------------------ per call
    def contribute(self, call, q, k, v, state: RunState):
        if not state.gradient_pass or not call.n_text:
            return []  # the control adds nothing to the attention itself
        # the generated image's queries and keys (FLUX Kontext's reference tokens follow them, and are not placed)
        grid = image_grid(state.layout, call.n_image, "LayoutGuidance", call.site.name, reference_ok=True)
        img = call.grid_slice(grid[0] * grid[1])
        losses = q.new_zeros(call.batch, dtype=torch.float32)
        csg = self.config.loss == "csg"
        step = state.schedule_step[0]  # the denoising step (the midpoint scheduler's two calls share it)
        for layout, rows, host_rows in state.rows_by_prompt(("cond",), call.batch, q.device):
            if not host_rows:
                continue
            # CSG's random half: a generator of its own per prompt, seeded the same for each, so an image's draws
            # do not depend on the other prompts of the call
            gen = torch.Generator().manual_seed((self.config.seed + 7919 * step) % 2**63) if csg else None
            columns = self._resolve(layout)
            present = [bool(c) for c in columns]
            if not any(present):
                continue
            boxes = self._coverage(grid, q.device, present)
            qi, kt = q[:, img], k[:, call.text_slice()]
            if rows is not None:
                qi, kt = qi.index_select(0, rows), kt.index_select(0, rows)
            maps = word_maps(qi, kt, columns)
            loss = csg_loss(maps, boxes.tokens, present, gen) if csg else ratio_loss(maps, boxes.cover, present)
            if boxes.own is not None:  # the self-attention constraint: each box's pixels look at their own box
                ki = k[:, img] if rows is None else k[:, img].index_select(0, rows)
                own_present = [True] * boxes.own.shape[1]  # the present words' boxes and the background
                smaps = self_maps(qi, ki, boxes.own_weights)
                own = csg_loss(smaps, boxes.own_tokens, own_present, gen, inter_weight=0.0) if csg \
                    else ratio_loss(smaps, boxes.own, own_present)
                loss = loss + self.config.self_weight * own
            losses = losses + loss if rows is None else losses.index_add(0, rows, loss)
        if in_backward():  # a checkpointed block recomputed in the backward: its loss was counted in the forward
            return []
        self._loss_sum = losses if self._loss_sum is None else self._loss_sum + losses
        self._sites_seen += 1
        self._step = step
        return []

    def begin_pass(self) -> None:
        """A gradient pass starts: nothing of an earlier pass (one that raised, say) is summed into its loss."""
        self._loss_sum, self._sites_seen = None, 0

    def latent_loss(self) -> torch.Tensor | None:
        """The loss of the gradient pass that just ran, per batch row, averaged over the sites; then cleared."""
        if self._loss_sum is None:
            return None
        loss = self._loss_sum / self._sites_seen
        self._loss_sum, self._sites_seen = None, 0
        if loss.device.type != "meta":
            self._history.append((self._step, loss.detach().mean()))  # read when asked: no sync per step
        return loss

    @property
    def history(self) -> list[tuple[int, float]]:
        """``(step, loss)`` of every descent step of the last run: the loss at the guided latent before the step."""
        self._history = [(step, float(loss)) for step, loss in self._history]
        return self._history

    def summary(self) -> str | None:
        if self._none_present:
            return f"layout guidance: none of the boxed words {list(self.config.boxes)} is in the prompt: none guided"
        if not self.history:
            return None
        first, last = self.history[0][1], self.history[-1][1]
        steps = len({s for s, _ in self.history})
        return f"layout loss {first:.3f} → {last:.3f} over {steps} guided steps"
