"""EpipolarAttention: views generated together look at each other, along their epipolar lines.

After the epipolar attention of multi-view and video models (SPAD's hard band, CVD's soft falloff, AnimateAnywhere's
epipolar constraint on 3D attention), moved to MM-DiT joint attention (SD3, SD3.5, FLUX.1). ``docs/epipolar.md`` has
the derivation; in short:

- The images of one prompt (``num_images_per_prompt`` = the number of cameras; image ``i`` is view ``i``) are
  generated in one batch. At every selected site each image query of view ``i`` attends to its own joint sequence,
  as in the stock model, **and** to the image keys of every other view ``j`` of the same prompt and batch role
  (extended attention: extra keys from the other rows of the same forward).
- On the logits of those extra keys (and only there) goes the epipolar bias of the token distance
  ``d_ij(r, c)`` of view ``j``'s token ``c`` from the epipolar line of view ``i``'s token ``r``
  (:mod:`attnctl.epipolar`)::

      hard:  0 if d ≤ band else −∞            soft:  −alpha · max(0, d − band) / band            none:  0
      adaptive:  0 if d ≤ band or A ≥ strong / n else −∞

  plus ``log(scale)``: ``scale`` (a schedule, default 1) weighs the other views' keys against the view's own;
  at 0 the views are generated independently (no extra keys at all, the stock kernel). ``adaptive`` is
  AnimateAnywhere's rule in attnctl's form: a key off the band is removed only where it is also weak, ``A`` being
  the probability the row gives it in the unconstrained extended attention (own keys and every other view's keys,
  the scale included) and ``n`` the row's number of keys, so ``strong / n`` is ``strong`` times an even share; a
  strong correspondence off the line (moving content, an inexact camera) survives.
  A key at an infinite distance (``in_front``: a token whose ray view ``j`` cannot see) gets −∞ from the hard and
  the soft falloff (whatever ``alpha``); for the adaptive rule it is off the band like any other.
- The cameras are given (``cameras``: one :class:`~attnctl.epipolar.Camera` per view) or made from a ``rig``
  (:class:`~attnctl.epipolar.StereoRig`, :class:`~attnctl.epipolar.OrbitRig`) at each run's latent aspect.
- The own keys, the text keys and the text queries are untouched: they stay on the fused kernel. The other views'
  keys are a ``PartialAttention`` (:mod:`attnctl.processors.contributions`) merged in by log-sum-exp; the hard band
  reads them block by block along the pencil of epipolar lines (:meth:`TokenGeometry.band_chunks`), so each query
  block touches a few per cent of them, and no ``N × N`` table or map is held.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..epipolar import BandChunk, Camera, Rig, TokenGeometry, check_baselines
from ..errors import ConfigError, LayoutError
from ..layout import image_grid
from ..processors.attend import (
    MAX_CHUNK_ELEMS,
    fused_attention_with_lse,
    merge_attention,
    softmax_of_logits,
    softmax_part,
)
from ..processors.contributions import PartialAttention, Selection
from ..schedules import bounded
from .base import Control, ControlConfig, RunState, register

CHUNK_QUERIES = 128
"""Queries per block of the hard band: their lines run close together, so a block reads a narrow strip of keys."""


class EpipolarConfig(ControlConfig):
    cameras: list[Camera] | None = Field(None, description="one camera per view, in the order of the images of a "
                                                           "prompt (or give a rig)")
    rig: Rig | None = Field(None, description="the cameras by the rig's shape instead: {\"kind\": \"stereo\", "
                                              "\"roll\": 90} or {\"kind\": \"orbit\", \"views\": 3, \"degrees\": 20}")
    band: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                        description="half-width of the band around each epipolar line, in tokens")
    falloff: Literal["hard", "soft", "none", "adaptive"] = Field(
        "hard", description="hard: keys beyond the band are removed; soft: their logits fall by "
                            "alpha·(d − band)/band; none: plain extended attention (no epipolar constraint); "
                            "adaptive: keys beyond the band are removed where they are also weak (AnimateAnywhere)")
    alpha: float = Field(3.0, ge=0.0, allow_inf_nan=False, description="slope of the soft falloff")
    strong: float = Field(8.0, gt=0.0, allow_inf_nan=False,
                          description="adaptive falloff: a key beyond the band stays where the unconstrained "
                                      "extended attention gives it at least this many times an even share of the "
                                      "row (1 / its number of keys)")
    scale: bounded(0, None) = Field(1.0, description="schedule of the weight of the other views' keys "
                                                     "(0: views independent at that step)")
    in_front: bool = Field(False, description="a line is only its part that images points in front of both cameras "
                                              "(the rest cannot hold a correspondence); false: the whole line, as the "
                                              "papers' epipolar attention")
    sites: str | list[str] = Field("all", description="site selector")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: list[Camera] | None) -> list[Camera] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(f"{len(v)} camera(s): epipolar attention needs at least two views, one camera each")
        sizes = {tuple(c.size) for c in v}
        if len(sizes) > 1:
            raise ValueError(f"the cameras' sizes differ ({sorted(sizes)}); jointly generated views share one "
                             "resolution, so write every K for the same image size")
        check_baselines(v)  # its ConfigError is a ValueError: reported as the field's
        return v

    @model_validator(mode="after")
    def _one_source(self) -> EpipolarConfig:
        if (self.cameras is None) == (self.rig is None):
            raise ValueError("give the views' cameras or a rig, not " + ("both" if self.rig else "neither") +
                             ": e.g. \"rig\": {\"kind\": \"stereo\", \"roll\": 90}")
        return self


@register
class EpipolarAttention(Control):
    """Extended attention across the views of a prompt, restricted to (or weighted toward) the epipolar lines."""

    kind = "epipolar"
    gates = ("scale",)
    Config = EpipolarConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._geometry: dict[tuple, dict[tuple[int, int], TokenGeometry]] = {}
        self._plans: dict[tuple, dict[tuple[int, int], list[BandChunk]]] = {}
        self._made_for: str | None = None  # the cameras' settings the caches above were made for
        self.calls = 0

    @property
    def views(self) -> int:
        cams = self.config.cameras
        return len(cams) if cams is not None else self.config.rig.views

    def cameras(self, grid: tuple[int, int]) -> list[Camera]:
        """The views' cameras for an ``h × w`` token grid: a rig's, made at the grid's aspect; given cameras, checked
        to be written for that aspect (a K for a square image would stretch on a wide one)."""
        h, w = grid
        if self.config.rig is not None:
            return self.config.rig.cameras(size=(float(w), float(h)))
        cams = self.config.cameras
        W, H = cams[0].size
        if abs(math.log((W / H) / (w / h))) > 0.02:
            raise LayoutError(f"EpipolarAttention: the cameras are written for {W:g}×{H:g} images but this run's "
                              f"latent grid is {w}×{h} tokens, another aspect",
                              fix="generate at the cameras' aspect, write K for the run's size, or give a rig")
        return cams

    def begin_run(self, state: RunState) -> None:
        self.config.scale.reset()
        self.calls = 0
        cameras = repr((self.config.rig, self.config.cameras, self.config.in_front))  # assigned since the last run
        if cameras != self._made_for:
            self._geometry.clear()
            self._plans.clear()
            self._made_for = cameras

    def geometry(self, grid: tuple[int, int], device) -> dict[tuple[int, int], TokenGeometry]:
        """The lines of every ordered view pair on ``grid`` (made once per grid and device)."""
        key = (tuple(grid), str(device))
        if key not in self._geometry:
            cams = self.cameras(grid)
            check_baselines(cams)  # again: the list may have changed in place since the config was checked
            self._geometry[key] = {(i, j): TokenGeometry(cams[i], cams[j], grid, device, self.config.in_front)
                                   for i in range(self.views) for j in range(self.views) if i != j}
            if not any(g.sees_common for g in self._geometry[key].values()):
                self._warn_nothing_seen_in_common()
        return self._geometry[key]

    def _warn_nothing_seen_in_common(self) -> None:
        """Cameras back to back (or one behind the other, facing away) see no point in common: their whole lines
        still couple the views, along the images of points behind a camera, which is no geometry; with ``in_front``
        every falloff couples nothing (the hard band's plan says so too, the soft and adaptive ones would not)."""
        what = ("so with in_front=True no key of another view is near a line and the views are made independently; "
                "check the cameras" if self.config.in_front else
                "so the epipolar lines couple the views along the images of points behind a camera; check the "
                "cameras, or give in_front=True to couple only what both can see")
        warnings.warn("EpipolarAttention: no two of the cameras see a point in common (no image token's ray passes in "
                      f"front of another camera), {what}", UserWarning, stacklevel=3)

    def view_groups(self, roles: list[str]) -> list[list[int]]:
        """Batch rows that are the views of one image: per batch role, consecutive runs of ``views`` rows (diffusers
        repeats each prompt ``num_images_per_prompt`` times in order)."""
        by_role: dict[str, list[int]] = {}
        for r, role in enumerate(roles):
            by_role.setdefault(role, []).append(r)
        groups = []
        for role, rows in by_role.items():
            if len(rows) % self.views:
                raise ConfigError(
                    f"EpipolarAttention has {self.views} cameras but this call has {len(rows)} {role!r} rows",
                    fix=f"generate num_images_per_prompt={self.views} images per prompt (attnctl generate --images "
                        f"{self.views}): image i is camera i's view")
            groups += [rows[g:g + self.views] for g in range(0, len(rows), self.views)]
        return groups

    def bias(self, d: torch.Tensor, log_scale: float) -> torch.Tensor:
        """The logit bias of extra keys at token distances ``d`` (module doc)."""
        band, falloff = self.config.band, self.config.falloff
        if falloff == "hard":
            out = torch.where(d <= band, 0.0, float("-inf"))
        elif falloff == "soft":  # a key at infinite distance is out whatever alpha (not −0·∞ = NaN)
            out = torch.where(d.isinf(), float("-inf"), -self.config.alpha * (d - band).clamp_min(0) / band)
        elif falloff == "none":
            out = torch.zeros_like(d)
        else:
            raise ValueError("the adaptive falloff's bias depends on the logits; see pair_attention")
        return out + log_scale if log_scale else out

    def band_plan(self, grid: tuple[int, int], device) -> dict[tuple[int, int], list[BandChunk]]:
        """The hard band of every ordered view pair as blocks of queries and the keys they may read
        (:meth:`~attnctl.epipolar.TokenGeometry.band_chunks`), found on the host once per grid, device and band."""
        key = (tuple(grid), str(device), self.config.band)
        if key not in self._plans:
            geo = self.geometry(grid, "cpu")
            self._plans[key] = {pair: [c.to(device) for c in g.band_chunks(self.config.band, CHUNK_QUERIES)]
                                for pair, g in geo.items()}
            if not any(self._plans[key].values()):  # every line misses the other view: nothing would be coupled
                warnings.warn(
                    f"EpipolarAttention couples nothing on the {grid[0]}×{grid[1]} grid: no image token's epipolar "
                    f"band (band={self.config.band}) reaches another view, so the views are made independently; "
                    "check the cameras (do they see the same scene?) or widen the band", UserWarning, stacklevel=2)
        return self._plans[key]

    def pair_attention(self, q, k, v, pair: tuple[int, int], grid: tuple[int, int], backend,
                       floor: torch.Tensor | None = None):
        """Attention of view ``i``'s image queries ``q`` over view ``j``'s image keys ``k``, values ``v`` (all
        ``(rows, n_img, H, d)``) with the falloff's bias: the output and LSE (:func:`softmax_part`), float32.

        - none: the fused kernel (with its LSE);
        - hard: only the keys of the band, block by block along the pencil of lines (:meth:`band_plan`);
        - soft: every key, in chunks of query rows, the bias from the lines' distances;
        - adaptive: every key, in chunks of query rows; one off the band is kept where its logit ``q·k/√d`` is at
          least the row's ``floor`` ``(rows, n_img, H)`` (:meth:`strong_floor`).
        """
        if self.config.falloff == "none":
            out, lse = fused_attention_with_lse(q, k, v, backend=backend)
            return out.float(), lse
        rows, n, heads, d = q.shape
        qh = q.transpose(1, 2).float() * (1.0 / math.sqrt(d))  # (rows, H, n, d)
        kh, vh = k.transpose(1, 2).float(), v.transpose(1, 2).float()
        out = qh.new_zeros(rows, heads, n, vh.shape[-1])
        lse = qh.new_full((rows, heads, n), float("-inf"))
        if self.config.falloff == "hard":
            for c in self.band_plan(grid, q.device)[pair]:
                kc = kh if c.keys is None else kh.index_select(2, c.keys)
                vc = vh if c.keys is None else vh.index_select(2, c.keys)
                step = max(1, MAX_CHUNK_ELEMS // (rows * heads * kc.shape[2]))
                for t0 in range(0, len(c.queries), step):
                    sel = c.queries[t0:t0 + step]
                    o, lse_c = softmax_part(qh.index_select(2, sel), kc, vc, c.inside[t0:t0 + step])
                    out.index_copy_(2, sel, o)
                    lse.index_copy_(2, sel, lse_c)
        else:
            geo = self.geometry(grid, q.device)[pair]
            floor = floor.transpose(1, 2)[..., None] if floor is not None else None  # (rows, H, n, 1)
            step = max(1, MAX_CHUNK_ELEMS // (rows * heads * n))
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                if floor is None:
                    o, lse_c = softmax_part(qh[:, :, r0:r1], kh, vh, self.bias(geo.distances(r0, r1), 0.0))
                else:  # removed: off the band and weak
                    s = torch.matmul(qh[:, :, r0:r1], kh.transpose(-1, -2))
                    drop = (geo.distances(r0, r1) > self.config.band) & (s < floor[:, :, r0:r1])
                    o, lse_c = softmax_of_logits(s.masked_fill_(drop, float("-inf")), vh)
                out[:, :, r0:r1] = o
                lse[:, :, r0:r1] = lse_c
        return out.transpose(1, 2), lse.transpose(1, 2)

    def strong_floor(self, q_i, others, own_lse: torch.Tensor, log_scale: float, n_keys: int,
                     backend) -> torch.Tensor:
        """The adaptive falloff's threshold on the logits of the other views' keys for view ``i``'s image queries
        ``q_i`` ``(rows, n, H, d)``: ``log(strong / n_keys) + lse_all − log(scale)``, with ``lse_all`` the rows' LSE
        over their own keys (``own_lse``, from the processor) and every other view's image keys (``others``: their
        keys and values), weighed by the scale; a key whose logit reaches it has ``A ≥ strong / n_keys`` in the
        unconstrained extended attention. The other views' LSEs come from the fused kernel."""
        lse_x = torch.stack([fused_attention_with_lse(q_i, k_j, v_j, backend=backend)[1] for k_j, v_j in others])
        lse_all = torch.logaddexp(own_lse.float(), torch.logsumexp(lse_x, dim=0) + log_scale)
        return lse_all + (math.log(self.config.strong / n_keys) - log_scale)

    def contribute(self, call, q, k, v, state: RunState):
        s = float(self.config.scale(*state.schedule_step))
        if s == 0 or state.gradient_pass:
            return []
        grid = image_grid(state.layout, call.n_image, "EpipolarAttention", call.site.name)
        groups = self.view_groups(state.roles or ["cond"] * call.batch)
        img = call.image_slice()
        log_scale = math.log(s)
        # per view: its rows of every group (made once per run, not per call)
        rows = [state.index([g[i] for g in groups], call.device) for i in range(self.views)]

        adaptive = self.config.falloff == "adaptive"
        n_keys = call.seq_len + (self.views - 1) * call.n_image  # what each image query reads, unconstrained

        def view_part(i: int):
            def fn(backend, own_lse=None):
                q_i = q.index_select(0, rows[i])[:, img]
                others = {j: (k.index_select(0, rows[j])[:, img], v.index_select(0, rows[j])[:, img])
                          for j in range(self.views) if j != i}
                floor = (self.strong_floor(q_i, others.values(), own_lse, log_scale, n_keys, backend)
                         if adaptive else None)
                out = lse = None
                for j, (k_j, v_j) in others.items():
                    o, lse_j = self.pair_attention(q_i, k_j, v_j, (i, j), grid, backend, floor)
                    lse_j = lse_j + log_scale
                    out, lse = (o, lse_j) if out is None else merge_attention(out, lse, o, lse_j)
                return out, lse
            return fn

        self.calls += 1
        return [PartialAttention(view_part(i), Selection(rows[i], img, None), reads_lse=adaptive)
                for i in range(self.views)]

    def summary(self) -> str | None:
        if not self.calls:
            return None
        return f"epipolar attention across {self.views} views at {self.calls} attention calls"
