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

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, LayoutError, SiteError, UnsupportedModelError
from ..processors.contributions import KeyBias, Selection
from ..schedules import bounded
from ..sites import Site, select_sites
from .base import Control, ControlConfig, RunState, register

JOINT_KINDS = ("sd3_joint", "flux_double", "flux_single")
"""Site kinds whose attention mixes image and text tokens (SD3.5 ``attn2`` is image-only)."""

TEXT_CHUNK_ELEMS = 1 << 22
"""Bound on the float32 logits held at once by the text log-sum-exp pass (16 MiB)."""

_TINY = 1e-30


class RegulationConfig(ControlConfig):
    targets: list[str] = Field(..., description="words whose attention is regulated, e.g. ['circle', 'square']")
    segments: list[str] | None = Field(None, description="tokenizer segments to take the words from (clip, t5); "
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
    per_head: bool = Field(False, description="one bias per head (else one shared by all heads)")
    roles: list[str] = Field(["cond"], description="batch roles the control acts on")
    seed: int = Field(0, description="seed of the U[0,1) initialisation of W")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets is an empty list; name at least one word of the prompt, "
                             "e.g. targets=['circle', 'square']")
        cleaned = [w.strip() for w in v]
        if any(not w for w in cleaned):
            raise ValueError("targets holds an empty word; give words of the prompt such as 'circle'")
        lowered = [w.lower() for w in cleaned]
        dup = sorted({w for w in lowered if lowered.count(w) > 1})
        if dup:
            raise ValueError(f"targets names {', '.join(map(repr, dup))} more than once; list each word once")
        return cleaned

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
    def _roles(self) -> RegulationConfig:
        if not self.roles:
            raise ValueError("roles is empty; the control acts on batch rows of these roles (default ['cond'])")
        return self


# --------------------------------------------------------------------------------------------- math


def gaussian_basis(h: int, w: int, grid: int = 7, sigma: float = 1 / 16, device=None) -> torch.Tensor:
    """``grid²`` Gaussian bumps (peak 1) over an ``h × w`` token grid, ``(grid², h·w)`` float32, row-major.

    Centres sit at the centres of a ``grid × grid`` tiling of the image; the widths are ``sigma·h`` and
    ``sigma·w`` tokens (``σ = width/16`` on square images), so non-square grids get stretched bumps.
    """
    ys = torch.arange(h, dtype=torch.float32, device=device)
    xs = torch.arange(w, dtype=torch.float32, device=device)
    cy = -0.5 + (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * h / grid
    cx = -0.5 + (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * w / grid
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * (sigma * h) ** 2))  # (grid, h)
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * (sigma * w) ** 2))  # (grid, w)
    return (gy[:, None, :, None] * gx[None, :, None, :]).reshape(grid * grid, h * w)


@dataclass
class RowMass:
    """Per-row facts of the plain attention the maps need, all ``(batch, rows, heads)`` float32 logs.

    ``log_rest``: mass outside the target and special columns; ``log_special``: mass of the special
    columns (−inf when none); ``log_text_rest``: mass of the other text columns (text normalisation only).
    """

    log_rest: torch.Tensor
    log_special: torch.Tensor
    log_1m_special: torch.Tensor
    log_text_rest: torch.Tensor | None


def row_mass(p_targets: torch.Tensor, p_special: torch.Tensor | None,
             log_text_rest: torch.Tensor | None) -> RowMass:
    """Build :class:`RowMass` from the plain probabilities of the target and special columns."""
    pt = p_targets.sum(-1)
    ps = p_special.sum(-1) if p_special is not None and p_special.shape[-1] else torch.zeros_like(pt)
    return RowMass(
        log_rest=torch.log((1.0 - pt - ps).clamp_min(_TINY)),
        log_special=torch.log(ps),  # log(0) = -inf: no special column
        log_1m_special=torch.log((1.0 - ps).clamp_min(_TINY)),
        log_text_rest=log_text_rest,
    )


def biased_maps(a: torch.Tensor, mass: RowMass, onehot: torch.Tensor, normalize: str = "text",
                restore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-softmax maps of the target words under a bias, and the log-normaliser of the row.

    ``a = s_c − lse + b_c`` are the biased logits of the target columns relative to the plain LSE,
    ``(batch, rows, heads, cols)``; ``onehot`` ``(cols, words)`` sums columns into words. Returns
    ``maps (batch, rows, heads, words)`` and ``log Z''`` ``(batch, rows, heads)``: with ``restore`` the
    special columns get the bias ``log Z''`` so that their final probability equals the plain one.
    All in log space, so large biases do not overflow.
    """
    e = torch.logsumexp(a, dim=-1)  # log Σ_c p_c e^{b_c}
    if restore:
        log_z = torch.logaddexp(mass.log_rest, e) - mass.log_1m_special
        special_term = mass.log_special + log_z
    else:
        log_z = torch.logaddexp(torch.logaddexp(mass.log_rest, mass.log_special), e)
        special_term = mass.log_special
    if normalize == "joint":
        log_den = log_z
    else:
        if mass.log_text_rest is None:
            raise ValueError("text normalisation needs the log-mass of the other text columns")
        log_den = torch.logsumexp(torch.stack([mass.log_text_rest, e, special_term]), dim=0)
    m = torch.exp(a - log_den[..., None])
    return m @ onehot, log_z


def map_loss(maps: torch.Tensor, cfg: RegulationConfig, n: int) -> torch.Tensor:
    """The quantile and mean terms of the loss per batch row, for maps ``(batch, rows, heads', words)``."""
    tau = cfg.tau if cfg.tau is not None else min(1.0, 0.2 * n)
    qv = torch.quantile(maps, cfg.q_level, dim=1)  # (batch, heads', words)
    mean = maps.mean(dim=1)
    return (cfg.w_quantile * ((qv - cfg.q) ** 2).mean(dim=(1, 2))
            + cfg.w_mean * ((mean - tau / n) ** 2).mean(dim=(1, 2)))


# --------------------------------------------------------------------------------------------- records


@dataclass
class RegulationRecord:
    """What the inner optimisation did at one site and step (mean over the regulated batch rows)."""

    site: str
    step: int
    losses: list[float]  # L(W_0), ..., L(W_iterations)
    best: int  # index of the iterate applied
    map_loss: float  # quantile + mean terms of the applied iterate (before smoothing)
    max_bias: float  # largest |bias| applied (after smoothing and decay)


@dataclass
class _Targets:
    positions: list[int]  # text-relative positions of the target columns
    word_of: list[int]  # index of the word of each column
    words: list[str]  # the words present
    special: list[int]  # text-relative positions of the restored columns


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
    Config = RegulationConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._steps = self.config.steps
        self._basis: dict[tuple, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.records: list[RegulationRecord] = []
        self._prev: dict[str, dict[str, Any]] = {}
        self._layout = None
        self._targets: _Targets | None = None

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self, controller) -> None:
        if controller.family not in self.families:
            raise UnsupportedModelError(
                f"AttentionRegulation supports {', '.join(self.families)} models, not {controller.family}; "
                "remove it from the controls of this pipeline")
        sel = self.config.sites
        sites = mid_depth_sites(controller.sites) if sel == "mid" else select_sites(controller.sites, sel)
        if not any(s.kind in JOINT_KINDS for s in sites):
            raise SiteError(
                f"AttentionRegulation: the sites {sel!r} have no image-text attention (image-only sites such as "
                "SD3.5's attn2 have no text columns to regulate)",
                fix="select joint sites, e.g. sites='mid' or 'transformer_blocks.4:8'")
        self.sites = sites
        self._site_names = frozenset(s.name for s in sites)

    def begin_run(self, state: RunState) -> None:
        self.reset()
        if isinstance(self._steps, object) and hasattr(self._steps, "reset"):
            self._steps.reset()
        layout = state.layout
        if layout is not None and any(seg.words for seg in layout.segments):
            self._resolve(layout, layout.text_len)  # fail early on absent words

    def _resolve(self, layout, n_text: int) -> _Targets:
        if self._targets is not None and self._layout is layout:
            return self._targets
        cfg = self.config
        if layout is None or not any(seg.words for seg in layout.segments):
            raise LayoutError(
                "AttentionRegulation needs the run's prompt to find its target words, and this run has none "
                "(no prompt, or several different prompts in one call)",
                fix="run through attnctl.attach(pipe, ...) or an attnctl pipeline with one prompt per call, or "
                    "give Controller(..., layout=TokenLayout(...)) with word positions")
        segs = tuple(cfg.segments) if cfg.segments else None
        positions, word_of, words = [], [], []
        for w in cfg.targets:
            try:
                pos = layout.word_tokens(w, segs)
            except LayoutError:
                if cfg.missing == "ignore":
                    continue
                known = ", ".join(layout.words()[:20])
                where = f"the prompt {layout.prompt!r}" if layout.prompt is not None else "this run's prompt"
                seg_note = f" (segments {', '.join(segs)})" if segs else ""
                raise LayoutError(
                    f"AttentionRegulation: the target word {w!r} is not in {where}{seg_note}",
                    fix=f"name only words of the prompt in targets=[...] (this prompt has: {known}), or pass "
                        "missing='ignore' to regulate the targets that are present") from None
            positions.extend(pos)
            word_of.extend([len(words)] * len(pos))
            words.append(w)
        bad = [p for p in positions if not 0 <= p < n_text]
        if bad:
            raise LayoutError(f"AttentionRegulation: token positions {bad} are outside the {n_text} text tokens",
                              fix="check that the layout matches the transformer's text length")
        if cfg.special_tokens is not None:
            special = [p for p in cfg.special_tokens if p not in positions]
            if any(p >= n_text for p in special):
                raise ConfigError(f"AttentionRegulation: special_tokens {special} reach past the {n_text} text "
                                  "tokens", fix="give text-relative positions below the text length")
        else:
            special = special_positions(layout) if cfg.restore_special else []
            special = [p for p in special if p not in positions and p < n_text]
        self._layout, self._targets = layout, _Targets(positions, word_of, words, sorted(set(special)))
        return self._targets

    # ------------------------------------------------------------------------------ per call
    def contribute(self, call, q, k, v, state: RunState):
        if not call.n_text:
            return []
        if self._steps(state.step, state.num_steps) <= 0:
            return []
        batch = state.rows_with(self.config.roles, call.batch, call.device)
        if batch is not None and len(batch) == 0:
            return []
        tg = self._resolve(state.layout, call.n_text)
        if not tg.positions:  # missing='ignore' and no target in this prompt
            return []
        grid = state.layout.grid if state.layout is not None else None
        if grid is None or grid[0] * grid[1] != call.n_image:
            raise LayoutError(
                f"AttentionRegulation: {call.site.name} has {call.n_image} image tokens but the run's image grid "
                f"is {grid}", fix="pass height/width the model supports, or a layout whose grid matches")
        start = call.text_slice().start
        special = tg.special if self.config.restore_special else []
        cols = torch.tensor([start + p for p in tg.positions + special], dtype=torch.long, device=call.device)
        img = call.image_slice()
        n_t = len(tg.positions)

        def bias_fn(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
            return self._bias(call, state, q, k, batch, img, tg, n_t, grid, logits, lse)

        return [KeyBias(cols, bias_fn, Selection(batch, img, None))]

    def _bias(self, call, state, q, k, batch, img, tg: _Targets, n_t: int, grid, logits, lse) -> torch.Tensor:
        cfg = self.config
        nb, n_img, heads, n_cols = logits.shape
        if cfg.iterations == 0:
            rec = RegulationRecord(call.site.name, state.step, [], -1, float("nan"), 0.0)
            self.records.append(rec)
            return torch.zeros((1, 1, 1, n_cols), dtype=torch.float32, device=logits.device)
        with torch.inference_mode(False):
            logits, lse = logits.detach().clone(), lse.detach().clone()
            rel = logits - lse[..., None]  # log p of the selected columns
            s_t, s_s = rel[..., :n_t], rel[..., n_t:]
            log_text_rest = None
            if cfg.normalize == "text":
                log_text_rest = _text_rest_lse(q, k, batch, img, call.text_slice(),
                                               tg.positions + tg.special, lse)
            mass = row_mass(torch.exp(s_t), torch.exp(s_s) if s_s.shape[-1] else None, log_text_rest)
            n_words = len(tg.words)
            onehot = torch.zeros(n_t, n_words, device=logits.device)
            onehot[torch.arange(n_t), torch.tensor(tg.word_of)] = 1.0
            word_of = torch.tensor(tg.word_of, device=logits.device)
            key = (grid, cfg.grid, cfg.sigma, str(logits.device))
            if key not in self._basis:
                self._basis[key] = gaussian_basis(grid[0], grid[1], cfg.grid, cfg.sigma, logits.device)
            basis = self._basis[key]
            hb = heads if cfg.per_head else 1
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + call.site.index * 1009 + state.step)
            w = torch.rand((nb, hb, n_words, basis.shape[0]), generator=gen).to(logits.device)
            restore = bool(tg.special) and cfg.restore_special

            def loss_of(w_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                b = torch.einsum("bhtk,kn->bnht", w_, basis)  # (nb, N, hb, words)
                maps, _ = biased_maps(s_t + b[..., word_of], mass, onehot, cfg.normalize, restore)
                if not cfg.per_head:
                    maps = maps.mean(dim=2, keepdim=True)
                ml = map_loss(maps, cfg, n_words)
                return ml + cfg.w_reg * (w_ ** 2).mean(dim=(1, 2, 3)), ml

            losses, best_w = [], w.clone()
            best_loss = torch.full((nb,), float("inf"), device=logits.device)
            best_ml = torch.zeros(nb, device=logits.device)
            best_idx = torch.zeros(nb, dtype=torch.long, device=logits.device)
            for i in range(cfg.iterations + 1):
                last = i == cfg.iterations
                with torch.set_grad_enabled(not last):
                    w_ = w.requires_grad_(not last)
                    loss, ml = loss_of(w_)
                    grad = None if last else torch.autograd.grad(loss.sum(), w_)[0]
                loss, ml = loss.detach(), ml.detach()
                losses.append(loss.mean())
                better = (loss < best_loss) if cfg.keep_best else torch.ones_like(loss, dtype=torch.bool)
                best_loss = torch.where(better, loss, best_loss)
                best_ml = torch.where(better, ml, best_ml)
                best_idx = torch.where(better, torch.full_like(best_idx, i), best_idx)
                best_w = torch.where(better[:, None, None, None], w.detach(), best_w)
                if grad is not None:
                    w = (w.detach() - cfg.lr * grad).detach()
            new = torch.einsum("bhtk,kn->bnht", best_w, basis)  # (nb, N, hb, words)
            applied = self._smooth(call.site.name, state.step, new) * cfg.decay ** state.step
            b_cols = applied[..., word_of].expand(nb, n_img, heads, n_t)
            if restore:
                _, log_z = biased_maps(s_t + b_cols, mass, onehot, cfg.normalize, restore)
                bias = torch.cat([b_cols, log_z[..., None].expand(nb, n_img, heads, n_cols - n_t)], dim=-1)
            else:
                bias = torch.cat([b_cols, torch.zeros(nb, n_img, heads, n_cols - n_t, device=logits.device)], -1)
            best = int(best_idx.float().mean().round().item()) if nb else 0
            self.records.append(RegulationRecord(call.site.name, state.step, torch.stack(losses).tolist(), best,
                                                 float(best_ml.mean()), float(applied.abs().max())))
        return bias.detach()

    def _smooth(self, site: str, step: int, new: torch.Tensor) -> torch.Tensor:
        """``smoothing · previous step's bias + (1 − smoothing) · new`` (the first time: ``new``), per site."""
        entry = self._prev.get(site)
        prev = None
        if entry is not None:
            prev = entry["bias"] if entry["step"] < step else entry["before"]
        if prev is not None and prev.shape == new.shape and self.config.smoothing > 0:
            out = self.config.smoothing * prev + (1.0 - self.config.smoothing) * new
        else:
            out = new
        before = entry["bias"] if entry is not None and entry["step"] < step else (entry or {}).get("before")
        self._prev[site] = {"step": step, "bias": out, "before": before}
        return out

    # ------------------------------------------------------------------------------ results
    def losses(self) -> list[list[float]]:
        """The inner loss curve of every regulated call of the last run."""
        return [r.losses for r in self.records]


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


def _text_rest_lse(q, k, batch, img: slice, text: slice, exclude: list[int], lse: torch.Tensor,
                   max_elems: int = TEXT_CHUNK_ELEMS) -> torch.Tensor:
    """``log Σ_{text \\ exclude} exp(s − lse)`` for the selected image rows, ``(batch, rows, heads)``, in chunks."""
    kt = k[:, text]
    if batch is not None:
        kt = kt.index_select(0, batch)
    kt = kt.float()
    nb, n_text, heads, d = kt.shape
    mask = torch.zeros(n_text, device=kt.device)
    if exclude:
        mask[torch.tensor(exclude, device=kt.device)] = float("-inf")
    if len(exclude) >= n_text:
        return torch.full_like(lse, float("-inf"))
    scale = 1.0 / math.sqrt(d)
    n_img = img.stop - img.start
    chunk = max(1, max_elems // max(1, nb * heads * n_text))
    out = []
    for r0 in range(0, n_img, chunk):
        r1 = min(n_img, r0 + chunk)
        qc = q[:, img.start + r0 : img.start + r1]
        if batch is not None:
            qc = qc.index_select(0, batch)
        s = torch.einsum("brhd,bthd->brht", qc.float(), kt) * scale + mask
        out.append(torch.logsumexp(s, dim=-1))
    return torch.cat(out, dim=1) - lse
