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

  plus ``log(scale)``: ``scale`` (a schedule, default 1) weighs the other views' keys against the view's own;
  at 0 the views are generated independently (no extra keys at all, the stock kernel).
- The cameras are given (``cameras``: one :class:`~attnctl.epipolar.Camera` per view) or made from a ``rig``
  (:class:`~attnctl.epipolar.StereoRig`, :class:`~attnctl.epipolar.OrbitRig`) at each run's latent aspect.
- The own keys, the text keys and the text queries are untouched. The processor forms the logits in chunks of
  query rows (``DenseBias`` / ``ExtraKV`` of :mod:`attnctl.processors.contributions`), and the distances of each
  chunk are computed from the cameras' fundamental matrices on the fly: no ``N × N`` table or map is held.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..epipolar import Camera, Rig, TokenGeometry
from ..errors import ConfigError, LayoutError
from ..processors.contributions import DenseBias, ExtraKV, Selection
from ..schedules import bounded
from .base import Control, ControlConfig, RunState, register


class EpipolarConfig(ControlConfig):
    cameras: list[Camera] | None = Field(None, description="one camera per view, in the order of the images of a "
                                                           "prompt (or give a rig)")
    rig: Rig | None = Field(None, description="the cameras by the rig's shape instead: {\"kind\": \"stereo\", "
                                              "\"roll\": 90} or {\"kind\": \"orbit\", \"views\": 3, \"degrees\": 20}")
    band: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                        description="half-width of the band around each epipolar line, in tokens")
    falloff: Literal["hard", "soft", "none"] = Field(
        "hard", description="hard: keys beyond the band are removed; soft: their logits fall by "
                            "alpha·(d − band)/band; none: plain extended attention (no epipolar constraint)")
    alpha: float = Field(3.0, ge=0.0, allow_inf_nan=False, description="slope of the soft falloff")
    scale: bounded(0, None) = Field(1.0, description="schedule of the weight of the other views' keys "
                                                     "(0: views independent at that step)")
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
    Config = EpipolarConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._geometry: dict[tuple, dict[tuple[int, int], TokenGeometry]] = {}
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

    def geometry(self, grid: tuple[int, int], device) -> dict[tuple[int, int], TokenGeometry]:
        """The lines of every ordered view pair on ``grid`` (made once per grid and device)."""
        key = (tuple(grid), str(device))
        if key not in self._geometry:
            cams = self.cameras(grid)
            self._geometry[key] = {(i, j): TokenGeometry(cams[i], cams[j], grid, device)
                                   for i in range(self.views) for j in range(self.views) if i != j}
        return self._geometry[key]

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
        elif falloff == "soft":
            out = -self.config.alpha * (d - band).clamp_min(0) / band
        else:
            out = torch.zeros_like(d)
        return out + log_scale if log_scale else out

    def contribute(self, call, q, k, v, state: RunState):
        s = float(self.config.scale(state.step, state.num_steps))
        if s == 0 or state.gradient_pass:
            return []
        grid = state.layout.grid if state.layout is not None else None
        if grid is None or grid[0] * grid[1] != call.n_image:
            raise LayoutError(
                f"EpipolarAttention: {call.site.name} has {call.n_image} image tokens but the run's image grid is "
                f"{grid}", fix="pass height/width the model supports, or a layout whose grid matches")
        groups = self.view_groups(state.roles or ["cond"] * call.batch)
        rows = [r for g in groups for r in g]
        view = {r: i for g in groups for i, r in enumerate(g)}
        others = [[g[j] for j in range(self.views) if j != view[r]] for g in groups for r in g]  # per row, in order
        img = call.image_slice()
        n_img, n_keys = call.n_image, k.shape[1]
        k_img, v_img = k[:, img], v[:, img]
        idx = state.index([o for row in others for o in row], k.device)  # made once per run, not per call
        shape = (len(rows), (self.views - 1) * n_img, *k.shape[2:])
        ek = k_img.index_select(0, idx).reshape(shape)
        ev = v_img.index_select(0, idx).reshape(shape)
        batch = state.index(rows, call.device)
        geo = self.geometry(grid, k.device)
        log_scale = math.log(s) if s != 1 else 0.0
        pairs = [[(view[r], view[o]) for o in row_others] for r, row_others in zip(rows, others, strict=True)]

        def fn(r0: int, r1: int) -> torch.Tensor:
            out = torch.zeros(len(rows), r1 - r0, 1, n_keys + shape[1], device=k.device)
            a0, a1 = max(r0, img.start), min(r1, img.stop)
            if a0 >= a1:
                return out
            blocks: dict[tuple[int, int], torch.Tensor] = {}  # one distance block per view pair and chunk
            for n, row_pairs in enumerate(pairs):
                for m, pair in enumerate(row_pairs):
                    if pair not in blocks:
                        blocks[pair] = self.bias(geo[pair].distances(a0 - img.start, a1 - img.start), log_scale)
                    c0 = n_keys + m * n_img
                    out[n, a0 - r0:a1 - r0, 0, c0:c0 + n_img] = blocks[pair]
            return out

        self.calls += 1
        return [ExtraKV(ek, ev, Selection(batch, img, None)), DenseBias(fn, Selection(batch, None, None))]

    def summary(self) -> str | None:
        if not self.calls:
            return None
        return f"epipolar attention across {self.views} views at {self.calls} attention calls"
