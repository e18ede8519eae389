"""AttentionRegulation: every named word gets its share of the image's attention.

After "Enhancing Semantic Fidelity in Text-to-Image Synthesis: Attention Regulation in Diffusion Models"
(Zhang et al.), moved from SD1.x/2.x cross-attention to the joint attention of MM-DiT (SD3, SD3.5, FLUX.1).
``docs/regulation.md`` has the derivation; in short, at every selected site and step, on the conditional
batch rows only:

1. the image-query × target-token logits get a bias ``b_t(r) = Σ_k W[t, k] · G_k(r)``, a weighted sum of
   ``grid × grid`` Gaussian bumps over the image token grid (``r`` an image token, ``t`` a target word;
   every token of the word, in every tokenizer segment, gets the word's bias);
2. ``W`` starts at ``U[0, 1)`` (seeded) and takes ``iterations`` plain gradient steps of size ``lr`` on

       L(W) = w_quantile · mean_t (quantile_{q_level}(m_t) − q)² + w_mean · mean_t (mean(m_t) − τ/n)²
              + w_reg · mean(W²),   τ = min(1, 0.2 · n) for n targets,

   where ``m_t`` is the attention map of word ``t`` after the softmax (averaged over heads) — by default its
   share of the row's *text* attention, which is what the original's cross-attention softmax over the text
   tokens gives; ``normalize="joint"`` uses the joint probability instead. The best iterate is kept;
3. the applied bias is smoothed over steps, ``0.25 · previous + 0.75 · new``, and scaled by ``0.99^step``;
4. "restore special": the start/end-of-text columns keep their *unedited* probabilities. In the joint
   softmax this is one more key bias ``β = log Z''`` on those columns, where ``Z''`` is the row's new
   normaliser; every other key keeps its biased relative weight and shares the remaining ``1 − P_special``.

Memory: the image-key part of a row's log-sum-exp does not depend on ``W``, so the optimisation needs only
the plain logits of the few target and special columns and one LSE per row — the ``f(logits, lse)`` form of
:class:`~attnctl.processors.contributions.KeyBias` — plus (text normalisation) one more log-sum-exp per row
over the other text keys, computed in bounded chunks. The stock fused kernel computes the layer itself.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, LayoutError, SiteError
from ..layout import image_grid
from ..processors.attend import chunked_lse, fused_attention_with_lse, mask_logits
from ..processors.contributions import KeyBias, Selection, index_tensor
from ..schedules import bounded
from ..sites import Site
from .base import Control, ControlConfig, Roles, RunState, SegmentList, clean_words, register, word_columns

attend_module = importlib.import_module("..processors.attend", __package__)  # the module (the package exports
# its function of the same name), read at use: where its host check is turned off, so is this one

JOINT_KINDS = ("sd3_joint", "flux_double", "flux_single")
"""Site kinds whose attention mixes image and text tokens (SD3.5 ``attn2`` is image-only)."""

TEXT_CHUNK_ELEMS = 1 << 20
"""Bound on the query elements per chunk of the text log-sum-exp pass (4 MiB in float32)."""

BASIS_FLOOR = 1e-20
"""Gaussian-bump values below this are set to zero (far below any bias's resolution; no denormals)."""

_TINY = 1e-30


class RegulationConfig(ControlConfig):
    targets: list[str] = Field(..., description="words whose attention is regulated, e.g. ['circle', 'square']; a "
                                                "phrase ('blue square') is one target over its words' tokens where "
                                                "it stands in the prompt")
    segments: SegmentList = Field(None, description="tokenizer segments to take the words from (clip, t5); "
                                                         "None: every segment of the model")
    missing: Literal["error", "ignore"] = Field("error", description="a target absent from the prompt: raise, "
                                                                     "or regulate the words that are present")
    sites: str | list[str] = Field("mid", description="site selector; 'mid': the middle third of the joint "
                                                      "(image-text) sites by depth")
    steps: bounded(0, None) = Field("window(1, 0, 0.5)", description="schedule; the control acts at steps "
                                                                     "where it is > 0 (default: first half)")
    iterations: int = Field(20, description="inner gradient steps per site and step (0: no regulation)")
    lr: float = Field(1e2, description="step size of the inner gradient descent")
    grid: int = Field(7, description="grid × grid Gaussian bumps over the image")
    sigma: float = Field(1 / 16, description="bump width as a fraction of the image side (width/16)")
    q: float = Field(0.9, description="target value of the map's quantile")
    q_level: float = Field(0.9, description="which quantile of the map the quantile term looks at")
    w_quantile: float = 1.0
    w_mean: float = 80.0
    w_reg: float = 0.09
    tau: float | None = Field(None, description="total mean share of the targets; None: min(1, 0.2·n)")
    smoothing: float = Field(0.25, description="weight of the previous step's bias (the new one gets 1 − this)")
    decay: float = Field(0.99, description="the applied bias is scaled by decay**step")
    keep_best: bool = Field(True, description="apply the best iterate (else the last)")
    restore_special: bool = Field(True, description="start/end-of-text columns keep their unedited probability")
    special_tokens: list[int] | None = Field(None, description="text positions to restore; None: found from "
                                                               "the prompt (start and end token of each segment)")
    normalize: Literal["text", "joint"] = Field("text", description="maps as the share of the row's text "
                                                                    "attention (cross-attention-like) or joint")
    bias_scope: Literal["joint", "text"] = Field(
        "joint", description="where the bias acts: in the joint softmax (a word's gain is taken from the image "
                             "keys too), or inside the text part only (each image query keeps its total text "
                             "attention, as in a cross-attention softmax; needs normalize='text')")
    per_head: bool = Field(False, description="one bias per head (else one shared by all heads)")
    roles: Roles = Field(["cond", "perturbed"], description="batch roles the control acts on (SoftPAG's perturbed "
                                                                 "rows too: they copy the conditional rows)")
    seed: int = Field(0, description="seed of the U[0,1) initialisation of W")
    init: Literal["random", "previous"] = Field(
        "random", description="W's starting point at each step: U[0,1) (the paper), or the iterate this site "
                              "applied at the previous regulated step (warm start; the first step is random)")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets is an empty list; name at least one word of the prompt, "
                             "e.g. targets=['circle', 'square']")
        return clean_words(v, "targets", "circle")

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"iterations={v} is negative; give 0 (no regulation) or the number of inner "
                             "gradient steps (default 20)")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"grid={v}: need at least one Gaussian bump per side (default 7)")
        return v

    @field_validator("lr", "sigma")
    @classmethod
    def _positive(cls, v: float, info) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name}={v!r} must be a positive finite number")
        return v

    @field_validator("w_quantile", "w_mean", "w_reg")
    @classmethod
    def _weight(cls, v: float, info) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{info.field_name}={v!r} must be a finite number >= 0")
        return v

    @field_validator("q", "q_level")
    @classmethod
    def _unit(cls, v: float, info) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{info.field_name}={v!r} is not in [0, 1]; it is a probability level")
        return v

    @field_validator("tau")
    @classmethod
    def _tau(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"tau={v!r} is the targets' total mean share and must be in (0, 1]; None: min(1, 0.2·n)")
        return v

    @field_validator("smoothing")
    @classmethod
    def _smoothing(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"smoothing={v!r} must be in [0, 1): the weight of the previous step's bias")
        return v

    @field_validator("decay")
    @classmethod
    def _decay(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"decay={v!r} must be in (0, 1]; the bias is scaled by decay**step")
        return v

    @field_validator("special_tokens")
    @classmethod
    def _special(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(p < 0 for p in v):
            raise ValueError("special_tokens are text-relative positions (>= 0)")
        return v

    @model_validator(mode="after")
    def _scope(self) -> RegulationConfig:
        if self.bias_scope == "text" and self.normalize != "text":
            raise ValueError("bias_scope='text' keeps each row's text attention, so its maps are shares of the text "
                             "attention: use normalize='text' with it, or bias_scope='joint'")
        return self


# --------------------------------------------------------------------------------------------- math


def gaussian_basis(h: int, w: int, grid: int = 7, sigma: float = 1 / 16, device=None,
                   floor: float = BASIS_FLOOR) -> torch.Tensor:
    """``grid²`` Gaussian bumps (peak 1) over an ``h × w`` token grid, ``(grid², h·w)`` float32, row-major.

    Centres sit at the centres of a ``grid × grid`` tiling of the image; the widths are ``sigma·h`` and
    ``sigma·w`` tokens (``σ = width/16`` on square images), so non-square grids get stretched bumps.
    Tails below ``floor`` are zero: they move no bias, and denormal floats slow CPU matmuls several-fold.
    """
    ys = torch.arange(h, dtype=torch.float32, device=device)
    xs = torch.arange(w, dtype=torch.float32, device=device)
    cy = -0.5 + (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * h / grid
    cx = -0.5 + (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * w / grid
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * (sigma * h) ** 2))  # (grid, h)
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * (sigma * w) ** 2))  # (grid, w)
    g = (gy[:, None, :, None] * gx[None, :, None, :]).reshape(grid * grid, h * w)
    return g.masked_fill(g < floor, 0.0)


@dataclass
class RowTerms:
    """What the maps of one regulated call depend on, per ``(batch, image row, head)``; float32 logs.

    Every token of a word gets the word's bias, so only the plain mass of each word matters:
    ``log_p[..., t] = log Σ_{c ∈ t} p_c``. With ``x_t = P_t · e^{b_t}`` the word's post-softmax map is

        M_t = x_t / (α + γ · Σ_t' x_t')

    where ``α`` and ``γ`` do not depend on the bias (see :func:`row_terms`); ``log Z''`` — the bias of the
    restored columns — is ``log(rest + Σ x) − log(1 − P_special)``.
    """

    log_p: torch.Tensor  # (batch, rows, heads, words)
    log_alpha: torch.Tensor  # (batch, rows, heads)
    log_gamma: torch.Tensor
    log_rest: torch.Tensor  # mass outside the target and special columns
    log_1m_special: torch.Tensor

    @property
    def gamma(self) -> torch.Tensor:
        return torch.exp(self.log_gamma)


def row_terms(rel_targets: torch.Tensor, word_of: list[int], n_words: int, rel_special: torch.Tensor | None,
              log_text_rest: torch.Tensor | None, normalize: str = "text", restore: bool = True) -> RowTerms:
    """:class:`RowTerms` from the plain logits relative to the LSE (``s − lse``) of the target and special
    columns, ``(batch, rows, heads, cols)``, and (``normalize="text"``) ``log Σ exp(s − lse)`` over the other
    text columns.

    ``α, γ`` by case (``P_T``: plain target mass, ``P_S``: special mass, ``R``: other text mass)::

        joint, restore:   α = (1 − P_T − P_S) / (1 − P_S)        γ = 1 / (1 − P_S)
        joint:            α = 1 − P_T                           γ = 1
        text,  restore:   α = R + P_S (1 − P_T − P_S)/(1 − P_S)  γ = 1 / (1 − P_S)
        text:             α = R + P_S                           γ = 1
    """
    # the columns of each word, chosen on the host (a boolean mask on the device would sync, and fails on meta)
    log_p = torch.stack([torch.logsumexp(rel_targets[..., [c for c, w in enumerate(word_of) if w == t]], dim=-1)
                         for t in range(n_words)], dim=-1)
    p_t = torch.exp(log_p).sum(-1)
    has_special = rel_special is not None and rel_special.shape[-1] > 0
    p_s = torch.exp(rel_special).sum(-1) if has_special else torch.zeros_like(p_t)
    log_s = torch.log(p_s)  # -inf without special columns
    log_rest = torch.log((1.0 - p_t - p_s).clamp_min(_TINY))
    log_1ms = torch.log((1.0 - p_s).clamp_min(_TINY))
    if normalize == "joint":
        log_alpha = log_rest - log_1ms if restore else torch.log((1.0 - p_t).clamp_min(_TINY))
    else:
        if log_text_rest is None:
            raise ValueError("text normalisation needs the log-mass of the other text columns")
        log_alpha = torch.logaddexp(log_text_rest, log_s + log_rest - log_1ms if restore else log_s)
    log_gamma = -log_1ms if restore else torch.zeros_like(log_1ms)
    return RowTerms(log_p, log_alpha, log_gamma, log_rest, log_1ms)


def word_maps(terms: RowTerms, bias: torch.Tensor) -> torch.Tensor:
    """Post-softmax maps ``M_t`` ``(batch, rows, heads, words)`` of the words under a per-word ``bias``
    ``(batch, rows, heads or 1, words)``; in log space, so large biases do not overflow. The plain reference of
    the maps (the inner loop computes them in :func:`loss_and_grad`)."""
    lx = terms.log_p + bias
    log_den = torch.logaddexp(terms.log_alpha, terms.log_gamma + torch.logsumexp(lx, dim=-1))
    return torch.exp(lx - log_den[..., None])


def restore_bias(terms: RowTerms, bias: torch.Tensor) -> torch.Tensor:
    """``log Z''`` ``(batch, rows, heads)``: the bias that gives the special columns their plain probability."""
    return torch.logaddexp(terms.log_rest, torch.logsumexp(terms.log_p + bias, dim=-1)) - terms.log_1m_special


def map_loss(maps: torch.Tensor, cfg: RegulationConfig, n: int) -> torch.Tensor:
    """The quantile and mean terms of the loss per batch row, for maps ``(batch, rows, heads', words)``: the
    plain reference (``torch.quantile``) of what :func:`loss_and_grad` computes for the inner loop."""
    tau = cfg.tau if cfg.tau is not None else min(1.0, 0.2 * n)
    qv = torch.quantile(maps, cfg.q_level, dim=1)  # (batch, heads', words), linear interpolation
    mean = maps.mean(dim=1)
    return (cfg.w_quantile * ((qv - cfg.q) ** 2).mean(dim=(1, 2))
            + cfg.w_mean * ((mean - tau / n) ** 2).mean(dim=(1, 2)))


@dataclass
class _WordMajor:
    """:class:`RowTerms` laid out ``(batch, heads, words, rows)`` once per call, so that every reduction of the
    inner loop over image rows runs on the last, contiguous dimension and ``W @ G`` needs no permute."""

    log_p: torch.Tensor  # (batch, heads, words, rows)
    log_alpha: torch.Tensor  # (batch, heads, 1, rows)
    gamma: torch.Tensor

    @classmethod
    def of(cls, terms: RowTerms) -> _WordMajor:
        def rows_last(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 1)[:, :, None, :].contiguous()

        return cls(terms.log_p.permute(0, 2, 3, 1).contiguous(), rows_last(terms.log_alpha),
                   torch.exp(rows_last(terms.log_gamma)))


def loss_and_grad(terms: RowTerms | _WordMajor, w: torch.Tensor, basis: torch.Tensor, cfg: RegulationConfig,
                  grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The regulation loss of ``W`` ``(batch, heads or 1, words, K)`` per batch row, its map part, and
    ``∂L/∂W`` in closed form (no autograd graph: a few small tensor ops per iteration).

    With ``g_t(r) = ∂L/∂map_t(r)`` and ``∂M_t/∂b_u = M_t (δ_tu − γ M_u)``::

        ∂L/∂b_u(r) = mean_h M_u (g_u − γ Σ_t g_t M_t)        (shared bias; per head: no mean)
        ∂L/∂W[u, k] = Σ_r ∂L/∂b_u(r) · G_k(r) + 2 w_reg W[u, k] / |W|

    ``g_t`` is the mean term's ``2 w_mean (mean_t − τ/n) / (|map| · N)`` at every pixel plus the quantile term's
    ``2 w_quantile (q_t − q) / |map|`` on the one or two pixels the quantile interpolates between. The inner
    loop runs this 20 times per site and step on small tensors, so it is written for few tensor operations.
    """
    t = terms if isinstance(terms, _WordMajor) else _WordMajor.of(terms)
    nb, hb, n, k = w.shape
    lx = t.log_p + w @ basis  # (batch, H, words, N): log x_t = log P_t + b_t
    # M_t = x_t / (α + γ Σ x), every exponent shifted by the largest of log α and log x_t: no overflow, and
    # the denominator stays ≥ min(1, γ) > 0
    top_log = torch.maximum(lx.amax(dim=2, keepdim=True), t.log_alpha)
    e = torch.exp(lx - top_log)
    m = e / (torch.exp(t.log_alpha - top_log) + t.gamma * e.sum(dim=2, keepdim=True))
    heads = m.shape[1]
    maps = m if cfg.per_head else m.mean(dim=1, keepdim=True)  # (batch, H', words, N)
    n_img = maps.shape[-1]
    tau = cfg.tau if cfg.tau is not None else min(1.0, 0.2 * n)
    pos = cfg.q_level * (n_img - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    # the (lo+1)-th and (lo+2)-th smallest values: the last two of the n_img − lo largest, in descending order
    top, top_i = maps.topk(n_img - lo, dim=-1)
    qv = top[..., -1] if frac == 0 else torch.lerp(top[..., -1], top[..., -2], frac)  # (batch, H', words)
    dq = qv - cfg.q
    dm = maps.mean(dim=-1) - tau / n
    map_part = (cfg.w_quantile * dq.square() + cfg.w_mean * dm.square()).mean(dim=(1, 2))
    loss = torch.add(map_part, w.square().mean(dim=(1, 2, 3)), alpha=cfg.w_reg)
    if not grad:
        return loss, map_part, None
    norm = maps.shape[1] * n * (1 if cfg.per_head else heads)  # |map|, and the mean over heads
    gq = ((2 * cfg.w_quantile / norm) * dq)[..., None]
    g = torch.zeros_like(maps).scatter_(-1, top_i[..., -1:], gq if frac == 0 else (1 - frac) * gq)  # lo+1
    if frac > 0:
        g.scatter_add_(-1, top_i[..., -2:-1], frac * gq)  # lo+2
    g += ((2 * cfg.w_mean / (norm * n_img)) * dm)[..., None]
    gm = g * m  # (batch, H, words, N)
    gb = gm - m * (t.gamma * gm.sum(dim=2, keepdim=True))
    if not cfg.per_head:
        gb = gb.sum(dim=1, keepdim=True)
    gw = torch.add(gb @ basis.T, w, alpha=2 * cfg.w_reg / (hb * n * k))  # (batch, hb, words, K)
    return loss, map_part, gw


def descend(terms: RowTerms | _WordMajor, w: torch.Tensor, basis: torch.Tensor, cfg: RegulationConfig
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cfg.iterations`` plain gradient steps ``W ← W − lr·∂L/∂W`` from ``w``.

    Returns the iterates ``W_0 … W_iterations`` stacked ``(iterations + 1, batch, heads or 1, words, K)`` and
    their losses and map parts ``(iterations + 1, batch)``; the caller picks the iterate to apply."""
    t = terms if isinstance(terms, _WordMajor) else _WordMajor.of(terms)
    ws, losses, parts = [], [], []
    for i in range(cfg.iterations + 1):
        loss, part, gw = loss_and_grad(t, w, basis, cfg, grad=i < cfg.iterations)
        ws.append(w)
        losses.append(loss)
        parts.append(part)
        if gw is not None:
            w = torch.add(w, gw, alpha=-cfg.lr)
    return torch.stack(ws), torch.stack(losses), torch.stack(parts)


# --------------------------------------------------------------------------------------------- records


RowId = tuple[str, int]
"""Who a regulated batch row is: its role (without a branch index) and its place among the rows of that role and
prompt in the call, e.g. ``("cond", 1)`` for a prompt's second image, ``("perturbed", 1)`` for SoftPAG's copy of it."""


def row_ids(roles: list[str] | None, rows: list[int]) -> tuple[RowId, ...]:
    """The :data:`RowId` of each of ``rows`` (one prompt's rows of a call, in batch order). The ``k``-th perturbed row
    copies the ``k``-th conditional row (the perturbed branch appends the copies in that order)."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        role = "cond" if roles is None else roles[r].split("[")[0]
        out.append((role, seen.get(role, 0)))
        seen[role] = out[-1][1] + 1
    return tuple(out)


class StepMemory:
    """Per key (a site and prompt), the value kept at its latest step and at the step before, one row per regulated
    batch row, with the :data:`RowId` of each row. ``earlier(key, step, ids)`` reads the latest step before ``step``,
    so several calls at one step all see the same earlier value (the last call at a step is the one kept); a row
    gets the kept row of its own id, or, for a perturbed copy kept nowhere yet, its conditional row's."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, list[tuple[int, torch.Tensor, tuple[RowId, ...]]]] = {}

    def earlier(self, key: Hashable, step: int, ids: tuple[RowId, ...]
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(value, have)``: ``value[i]`` is the earlier value of row ``ids[i]``; ``have`` is ``None`` when every row
        has one, else a boolean per row (rows without one hold another row's value, to be replaced). ``(None, None)``
        when no row has one."""
        kept = next(((value, kept_ids) for s, value, kept_ids in reversed(self._kept.get(key, [])) if s < step), None)
        if kept is None:
            return None, None
        value, kept_ids = kept
        if kept_ids == ids:
            return value, None
        place = {rid: i for i, rid in enumerate(kept_ids)}
        found = [place.get(rid, place.get(("cond", rid[1])) if rid[0] == "perturbed" else None) for rid in ids]
        if all(i is None for i in found):
            return None, None
        picked = value.index_select(0, index_tensor([0 if i is None else i for i in found], value.device))
        if all(i is not None for i in found):
            return picked, None
        return picked, torch.tensor([i is not None for i in found], device=value.device)

    def keep(self, key: Hashable, step: int, value: torch.Tensor, ids: tuple[RowId, ...]) -> None:
        before = [entry for entry in self._kept.get(key, []) if entry[0] < step][-1:]
        self._kept[key] = [*before, (step, value, ids)]


def _rows_where(have: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` in the rows ``have`` marks (every row when ``have`` is ``None``), ``b`` in the others."""
    return a if have is None else torch.where(have.view(-1, *[1] * (a.ndim - 1)), a, b)


@dataclass
class RegulationRecord:
    """What the inner optimisation did at one site and step (mean over the regulated batch rows)."""

    site: str
    step: int
    losses: list[float]  # L(W_0), ..., L(W_iterations), mean over the rows
    best: list[int]  # per regulated batch row: index of the iterate applied
    best_loss: float  # L of the applied iterates (mean over the rows)
    map_loss: float  # quantile + mean terms of the applied iterates (before smoothing)
    max_bias: float  # largest |bias| applied (after smoothing and decay)
    plain_map_loss: float = float("nan")  # quantile + mean terms of the plain maps (no bias)
    applied_map_loss: float = float("nan")  # ... of the maps under the bias applied (after smoothing and decay)
    prompt: str | None = None  # the prompt of the rows regulated (a call with several prompts has one record each)


@dataclass
class _Targets:
    positions: list[int]  # text-relative positions of the target columns
    word_of: list[int]  # index of the word of each column
    words: list[str]  # the words present
    special: list[int]  # text-relative positions of the restored columns
    rest: list[int]  # text-relative positions of every other text column (for the text-normalised maps)


# --------------------------------------------------------------------------------------------- control


def mid_depth_sites(sites: list[Site]) -> list[Site]:
    """The middle third (by depth) of the sites where image and text attend jointly; at least one."""
    joint = [s for s in sites if s.kind in JOINT_KINDS]
    n = len(joint)
    if n == 0:
        return []
    picked = [s for i, s in enumerate(joint) if n / 3 <= i + 0.5 <= 2 * n / 3]
    return picked or [joint[(n - 1) // 2]]


@register
class AttentionRegulation(Control):
    """Balance the attention of image tokens over the target words by an optimised spatial logit bias."""

    kind = "regulation"
    gates = ("steps",)
    Config = RegulationConfig
    named_sites = {"mid": mid_depth_sites}
    metrics = {"loss": "the loss's map terms under the bias applied, mean over the step's regulated calls",
               "plain_loss": "the same terms of the plain maps"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._calls_per_step = 1  # the run's model calls per denoising step (the summary counts steps)
        self._basis: dict[tuple, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self._records: list[RegulationRecord] = []
        self._pending: list[tuple] = []  # (site, step, prompt, device tensors) of calls not yet read
        self._step_numbers: list[tuple] = []  # the same numbers of the current model call, for end_step's report
        self._smoothed_w = StepMemory()  # the smoothed W, before decay
        self._applied_w = StepMemory()  # the W applied (init="previous")
        self._targets: dict[int, tuple[Any, _Targets]] = {}  # id(layout) -> (layout, its targets)

    # ------------------------------------------------------------------------------ lifecycle
    def prompt_words(self) -> list[str]:
        return list(self.config.targets) if self.config.missing == "error" else []

    def named_words(self) -> list[str]:
        return list(self.config.targets)

    def bind(self, controller) -> None:
        super().bind(controller)
        if not any(s.kind in JOINT_KINDS for s in self.sites):
            raise SiteError(
                f"AttentionRegulation: the sites {self.config.sites!r} have no image-text attention (image-only sites "
                "such as SD3.5's attn2 have no text columns to regulate)",
                fix="select joint sites, e.g. sites='mid' or 'transformer_blocks.4:8'")

    def begin_run(self, state: RunState) -> None:
        self.reset()
        self.config.steps.reset()  # (read from the config at each use: a new schedule assigned there takes effect)
        self._calls_per_step = state.calls_per_step
        layouts = [state.layout] if state.row_layouts is None else [lay for lay in state.row_layouts if lay]
        known = [lay for lay in layouts if lay is not None and any(seg.words for seg in lay.segments)]
        found = [self._resolve(layout, layout.text_len).words for layout in known]  # fail early on absent words
        if known and not any(found):  # only with missing="ignore": said, not silently a no-op
            warnings.warn(f"AttentionRegulation: none of the targets {list(self.config.targets)} is in the run's "
                          "prompt, so nothing is regulated (missing='ignore')", UserWarning, stacklevel=2)

    def _resolve(self, layout, n_text: int) -> _Targets:
        kept = self._targets.get(id(layout))
        if kept is not None and kept[0] is layout:
            return kept[1]
        cfg = self.config
        found = word_columns(layout, cfg.targets, cfg.segments, cfg.missing, "AttentionRegulation",
                             noun="target word", field="targets=[...]", verb="regulate")
        positions: list[int] = []
        word_of: list[int] = []
        words: list[str] = []
        for w, cols in zip(cfg.targets, found, strict=True):  # a phrase ("blue square") is one target: its words'
            shared = [p for p in cols if p in positions]  # tokens share one bias and one map
            if shared:
                other = words[word_of[positions.index(shared[0])]]
                raise LayoutError(
                    f"AttentionRegulation: the targets {other!r} and {w!r} share tokens in the prompt "
                    f"{layout.prompt!r}, and a token can take one target's bias only",
                    fix=f"drop one of them, or name {w!r} by words {other!r} does not hold")
            if not cols:  # missing="ignore": not in this prompt
                continue
            positions.extend(cols)
            word_of.extend([len(words)] * len(cols))
            words.append(w)
        bad = [p for p in positions if not 0 <= p < n_text]
        if bad:
            raise LayoutError(f"AttentionRegulation: token positions {bad} are outside the {n_text} text tokens",
                              fix="check that the layout matches the transformer's text length")
        if not cfg.restore_special:
            special = []
        elif cfg.special_tokens is not None:
            special = [p for p in cfg.special_tokens if p not in positions]
            if any(p >= n_text for p in special):
                raise ConfigError(f"AttentionRegulation: special_tokens {special} reach past the {n_text} text "
                                  "tokens", fix="give text-relative positions below the text length")
        else:
            special = [p for p in special_positions(layout) if p not in positions and p < n_text]
        targeted = set(positions) | set(special)
        rest = [i for i in range(n_text) if i not in targeted]
        targets = _Targets(positions, word_of, words, sorted(set(special)), rest)
        self._targets[id(layout)] = (layout, targets)
        return targets

    def end_step(self, state: RunState) -> None:
        numbers = [n for step, n in self._step_numbers if step == state.step]
        self._step_numbers.clear()  # (apart from _pending, which reading the records empties)
        # on the host the check is free; on a GPU it would wait for the device at every step, so there the records
        # say it when read (below)
        if numbers and attend_module._on_host(numbers[0][4]) and not all(bool(n[4].isfinite()) for n in numbers):
            raise ConfigError(*self._diverged(f"step {state.schedule_step[0]}", "would be"))
        if numbers and self.adaptive:  # (the records read every value later; here only this step's two)
            self.report({"loss": sum(float(n[6]) for n in numbers) / len(numbers),
                         "plain_loss": sum(float(n[5]) for n in numbers) / len(numbers)})

    def _diverged(self, where: str, image: str) -> tuple[str, str]:
        """The problem and the way out when the applied bias is not finite at ``where``."""
        return (f"AttentionRegulation's bias is not finite at {where}: W diverged in the inner gradient steps "
                f"(lr={self.config.lr}), and the image {image} NaN",
                "lower lr (default 100), or keep keep_best=True (the default): it keeps the best finite iterate")

    # ------------------------------------------------------------------------------ per call
    def contribute(self, call, q, k, v, state: RunState):
        if not call.n_text:
            return []
        if self.config.steps(*state.schedule_step) <= 0:
            return []
        groups = state.rows_by_prompt(self.config.roles, call.batch, call.device)
        if not any(host_rows for _, _, host_rows in groups):
            return []
        # the generated image's queries (FLUX Kontext's reference tokens follow them, as keys of the softmax only)
        grid = image_grid(state.layout, call.n_image, "AttentionRegulation", call.site.name, reference_ok=True)
        start = call.text_slice().start
        img = call.grid_slice(grid[0] * grid[1])
        out = []
        for layout, rows, host_rows in groups:  # one group per prompt of the call: its own columns, bias and memory
            tg = self._resolve(layout, call.n_text)
            if not tg.positions:  # missing='ignore' and no target in this prompt
                continue
            cols = state.index([start + p for p in tg.positions + tg.special], call.device)
            prompt = layout.prompt if layout is not None else None
            memory = (call.site.name, *_texts(layout))
            ids = row_ids(state.roles, host_rows)

            def bias_fn(logits: torch.Tensor, lse: torch.Tensor, rows=rows, tg=tg, memory=memory, prompt=prompt,
                        ids=ids) -> torch.Tensor:
                return self._bias(call, state, q, k, rows, img, tg, grid, logits, lse, memory, prompt, ids)

            within = call.text_slice() if self.config.bias_scope == "text" else None
            out.append(KeyBias(cols, bias_fn, Selection(rows, img, None), within=within))
        return out

    def _bias(self, call, state, q, k, batch, img, tg: _Targets, grid, logits, lse, memory: Hashable,
              prompt: str | None, ids: tuple[RowId, ...]) -> torch.Tensor:
        """The bias of one call on one prompt's rows; ``memory`` keys the per-site state (smoothing, warm start) of
        the prompt, ``ids`` names its rows there."""
        n_t = len(tg.positions)
        cfg = self.config
        nb, n_img, heads, n_cols = logits.shape
        if cfg.iterations == 0:
            rec = RegulationRecord(call.site.name, state.step, [], [], float("nan"), float("nan"), 0.0, prompt=prompt)
            if not state.skip_layer_pass:
                self.records.append(rec)
            return torch.zeros((1, 1, 1, n_cols), dtype=torch.float32, device=logits.device)
        dev = logits.device
        # log p of the selected columns; with bias_scope="text" the core passes the text keys' LSE, so these are
        # log shares of the text attention and the text softmax is the whole softmax the bias acts in
        rel = logits.detach() - lse.detach()[..., None]
        log_text_rest = None
        normalize = "joint" if cfg.bias_scope == "text" else cfg.normalize
        if normalize == "text":
            rest = state.index(tg.rest, k.device) if tg.rest else None
            log_text_rest = _text_rest_lse(q, k[:, call.text_slice()], batch, img, rest, lse,
                                           attn_mask=call.attn_mask, text_start=call.text_slice().start)
        n_words = len(tg.words)
        restore = bool(tg.special)
        terms = row_terms(rel[..., :n_t], tg.word_of, n_words, rel[..., n_t:], log_text_rest, normalize, restore)
        key = (grid, cfg.grid, cfg.sigma, str(dev))
        if key not in self._basis:
            self._basis[key] = gaussian_basis(grid[0], grid[1], cfg.grid, cfg.sigma, dev)
        basis = self._basis[key]
        hb = heads if cfg.per_head else 1
        step = state.schedule_step[0]  # the denoising step: the midpoint scheduler's two calls share its W's start,
        # decay, smoothing; modulo 2**64: any seed fits the generator, which reads a negative seed as this too
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + call.site.index * 1009 + step) % 2**64)
        shape = (nb, hb, n_words, basis.shape[0])
        w, have = self._applied_w.earlier(memory, step, ids) if cfg.init == "previous" else (None, None)
        if w is None or have is not None:  # one draw for every row: a row's image does not depend on its place
            fresh = torch.rand((1, *shape[1:]), generator=gen).to(dev).expand(shape)
            w = fresh.contiguous() if w is None else _rows_where(have, w, fresh)
        lean = _WordMajor.of(terms)
        ws, losses, map_parts = descend(lean, w, basis, cfg)
        if cfg.keep_best:  # the first iterate of least loss per batch row (a NaN loss is never best)
            best_idx = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=0)
        else:
            best_idx = torch.full((nb,), cfg.iterations, dtype=torch.long, device=dev)
        rows = torch.arange(nb, device=dev)
        best_w, best_loss, best_ml = ws[best_idx, rows], losses[best_idx, rows], map_parts[best_idx, rows]
        # SD3's skip-layer pass comes after the step's main call: it is regulated as that call was, from the same
        # earlier W, but what it finds is not kept (the next step starts from the main call's) nor recorded
        main = not state.skip_layer_pass
        if cfg.init == "previous" and main:
            self._applied_w.keep(memory, step, best_w, ids)
        # the bias is linear in W, so smoothing and decay act on W (a few numbers per word, not a map)
        applied_w = self._smooth(memory, step, best_w, ids=ids, keep=main) * cfg.decay**step
        applied = (applied_w @ basis).permute(0, 3, 1, 2)  # (batch, N, hb, words)
        word_of = state.index(tg.word_of, dev)
        parts = [applied[..., word_of].expand(nb, n_img, heads, n_t)]
        if restore:
            parts.append(restore_bias(terms, applied)[..., None].expand(nb, n_img, heads, n_cols - n_t))
        plain_ml = loss_and_grad(lean, torch.zeros_like(applied_w), basis, cfg, grad=False)[1]
        applied_ml = loss_and_grad(lean, applied_w, basis, cfg, grad=False)[1]
        # the record's numbers stay on the device until read (no sync per call on a GPU)
        numbers = (losses.mean(dim=1), best_idx, best_loss.mean(), best_ml.mean(), applied.abs().max(),
                   plain_ml.mean(), applied_ml.mean())
        if main:
            numbers = tuple(t.detach() for t in numbers)
            self._pending.append((call.site.name, state.step, prompt, numbers))
            self._step_numbers.append((state.step, numbers))
        return torch.cat(parts, dim=-1)

    def _smooth(self, memory: Hashable, step: int, new: torch.Tensor, ids: tuple[RowId, ...],
                keep: bool = True) -> torch.Tensor:
        """``smoothing · previous step's W + (1 − smoothing) · new`` per row (a row's first time: ``new``), per site
        and prompt."""
        prev, have = self._smoothed_w.earlier(memory, step, ids)
        out = new
        if prev is not None and self.config.smoothing > 0:
            out = _rows_where(have, self.config.smoothing * prev + (1.0 - self.config.smoothing) * new, new)
        if keep:
            self._smoothed_w.keep(memory, step, out, ids)
        return out

    # ------------------------------------------------------------------------------ results
    @property
    def records(self) -> list[RegulationRecord]:
        """One :class:`RegulationRecord` per regulated call (and prompt) of the last run, in call order."""
        for site, step, prompt, numbers in self._pending:
            losses, best, best_loss, best_ml, max_bias, plain_ml, applied_ml = (_host(t) for t in numbers)
            diverged = not math.isfinite(max_bias) and numbers[4].device.type != "meta"  # (meta: no values)
            if diverged and all(math.isfinite(r.max_bias) for r in self._records):
                warnings.warn("; ".join(self._diverged(f"{site}, step {step}", "is")), UserWarning, stacklevel=2)
            self._records.append(RegulationRecord(site, step, losses, best, best_loss, best_ml, max_bias, plain_ml,
                                                  applied_ml, prompt))
        self._pending.clear()
        return self._records

    def resolved_targets(self) -> list[_Targets]:
        """The targets as found in the last run's prompt(s), one entry per prompt: text-relative token positions,
        the word of each, the words present and the restored start/end columns."""
        return [t for _, t in self._targets.values()]

    def summary(self) -> str | None:
        """How many calls were regulated and how far the bias moved the loss's map terms, on average (over the
        records: one per call and prompt)."""
        recs = [r for r in self.records if r.losses]
        if not recs:
            return None
        plain = sum(r.plain_map_loss for r in recs) / len(recs)
        applied = sum(r.applied_map_loss for r in recs) / len(recs)
        calls = len({(r.site, r.step) for r in recs})  # a call with several prompts has a record for each
        pairs = f" ({len(recs)} regulated (call, prompt) pairs)" if len(recs) != calls else ""
        steps = len({r.step // self._calls_per_step for r in recs})  # denoising steps, not the loop's calls
        return (f"regulation of {', '.join(map(repr, self.config.targets))}: {calls} attention "
                f"call{'s' if calls != 1 else ''} at {steps} step{'s' if steps != 1 else ''}{pairs}; the loss's map "
                f"terms {plain:.3g} (plain) → {applied:.3g} (regulated)")

    def losses(self) -> list[list[float]]:
        """The inner loss curve of every regulated call of the last run."""
        return [r.losses for r in self.records]


def _host(t: torch.Tensor) -> Any:
    """A device tensor as Python numbers (a list, or a float for one value); NaN on the meta device."""
    if t.device.type == "meta":
        return float("nan") if t.dim() == 0 else [float("nan")] * t.shape[0]
    return t.tolist() if t.dim() else float(t)


def _texts(layout) -> tuple:
    """The texts a prompt's tokens read: the prompt and, per tokenizer segment, its own text (SD3's ``prompt_2``,
    ``prompt_3``, FLUX's ``prompt_2``). Two images of one ``prompt`` and different T5 texts are different prompts."""
    if layout is None:
        return (None,)
    read = ((s.name, s.text if s.text is not None else layout.prompt, s.also) for s in layout.segments)
    return (layout.prompt, *read)


def special_positions(layout) -> list[int]:
    """Text-relative positions of each segment's start-of-text token (when position 0 holds no word) and
    end-of-text token (right after the last word), found from the layout's word positions."""
    out: list[int] = []
    for seg in layout.segments:
        pos = sorted({p for ps in seg.words.values() for p in ps})
        if not pos:
            continue
        if pos[0] > 0:
            out.append(seg.start)
        if pos[-1] + 1 < seg.length:
            out.append(seg.start + pos[-1] + 1)
    return out


def _text_rest_lse(q, k_text, batch, img: slice, rest: torch.Tensor | None, lse: torch.Tensor,
                   max_elems: int = TEXT_CHUNK_ELEMS, attn_mask: torch.Tensor | None = None,
                   text_start: int = 0) -> torch.Tensor:
    """``log Σ_{rest} exp(s − lse)`` for the selected image rows, ``(batch, rows, heads)``; ``k_text``: the keys of
    the text tokens (from ``text_start`` in the call's sequence), ``rest``: the positions among them that are not
    targeted (``None``: there are none). A key the attention mask removes (FLUX's padding) is no part of the sum.

    The fused kernel over the remaining text keys gives their log-sum-exp (its output is discarded); with a mask,
    :func:`~attnctl.processors.attend.chunked_lse` over those keys, the mask cut to the rows and keys (``O(N_img·T)``).
    Query rows go in chunks of at most ``max_elems`` elements, so the extra memory stays bounded.
    """
    if rest is None:
        return torch.full_like(lse, float("-inf"))
    kt = k_text.index_select(1, rest)
    if batch is not None:
        kt = kt.index_select(0, batch)
    if attn_mask is not None:
        qi = q[:, img] if batch is None else q[:, img].index_select(0, batch)
        m = mask_logits(attn_mask, Selection(batch, img, None), q.shape[1], q.shape[0], kt.shape[2], rest + text_start)
        return chunked_lse(qi, kt, m.transpose(1, 2), max_elems) - lse  # (the dispatcher's (B, H, rows, keys))
    nb, _, heads, d = kt.shape
    n_img = img.stop - img.start
    chunk = max(1, max_elems // max(1, nb * heads * d))
    out = []
    for r0 in range(0, n_img, chunk):
        qc = q[:, img.start + r0 : img.start + min(n_img, r0 + chunk)]
        if batch is not None:
            qc = qc.index_select(0, batch)
        out.append(fused_attention_with_lse(qc, kt, kt)[1])
    return torch.cat(out, dim=1) - lse
