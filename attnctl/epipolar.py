"""Epipolar geometry for jointly generated views: cameras in, distances from epipolar lines out.

A pinhole camera maps a world point ``X`` to the pixel ``x ~ K·(R·X + t)`` (``R``, ``t``: world → camera). For two
views ``i`` and ``j`` the relative pose is ``R_ij = R_j·R_iᵀ``, ``t_ij = t_j − R_ij·t_i``, and every point seen by
both satisfies ``x_jᵀ·F_ij·x_i = 0`` with the fundamental matrix

    F_ij = K_j^{-T} · [t_ij]× · R_ij · K_i^{-1}

so a pixel ``u`` of view ``i`` can only correspond to pixels of view ``j`` on the line ``l = F_ij·u``; a pixel
``v`` lies ``|lᵀ·v| / √(l_x² + l_y²)`` pixels from it. :class:`~attnctl.controls.epipolar.EpipolarAttention` turns
these distances, measured between the token centres of two latent grids (:class:`TokenGeometry`, block by block),
into a bias on cross-view attention.

Pixels are those of the image the intrinsics are written for (``Camera.size``); token ``(row, col)`` of an
``h × w`` grid has its centre at ``((col + ½)·W/w, (row + ½)·H/h)``. Distances come back in tokens (pixels over the
token width), so a band of one token means the same at every resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .json_types import ScalarsOfTheirKind

Matrix = list[list[float]]


class Camera(ScalarsOfTheirKind):
    """A pinhole camera: intrinsics ``K`` in pixels of an image of ``size`` = [width, height], and the world →
    camera rotation ``R`` and translation ``t`` (OpenCV convention: x right, y down, z forward)."""

    model_config = ConfigDict(extra="forbid")

    K: Matrix = Field(..., description="3×3 intrinsics in pixels of an image of `size`")
    R: Matrix = Field(default_factory=lambda: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                      description="3×3 world → camera rotation")
    t: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0], description="world → camera translation")
    size: tuple[float, float] = Field(..., description="[width, height] of the image K is written for, in pixels")

    def __init__(self, **data) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # a camera built in code: one readable line, not pydantic's report
            why = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'camera'}: "
                            f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            raise ConfigError(f"invalid camera — {why}") from None

    @field_validator("K", "R")
    @classmethod
    def _three_by_three(cls, v: Matrix) -> Matrix:
        if len(v) != 3 or any(len(row) != 3 for row in v) or not all(math.isfinite(x) for row in v for x in row):
            raise ValueError(f"{v!r} is not a 3×3 matrix of finite numbers; write it as three rows of three")
        return [[float(x) for x in row] for row in v]

    @field_validator("t")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or not all(math.isfinite(x) for x in v):
            raise ValueError(f"t={v!r}: write the translation as three finite numbers")
        return [float(x) for x in v]

    @model_validator(mode="after")
    def _proper(self) -> Camera:
        K = torch.tensor(self.K, dtype=torch.float64)
        if abs(float(torch.linalg.det(K))) < 1e-12:
            raise ValueError("K is singular; intrinsics need focal lengths > 0, e.g. "
                             "[[f, 0, cx], [0, f, cy], [0, 0, 1]]")
        R = torch.tensor(self.R, dtype=torch.float64)
        if not torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-4) or float(torch.linalg.det(R)) < 0:
            raise ValueError("R is not a rotation (R·Rᵀ = I, det R = 1); build it with Camera.look_at or from a "
                             "rotation matrix of your camera rig")
        if not all(math.isfinite(float(x)) and x > 0 for x in self.size):
            raise ValueError(f"size={list(self.size)}: need a finite, positive [width, height] in pixels")
        return self

    @classmethod
    def look_at(cls, eye: list[float], target: list[float], fov: float = 50.0,
                size: tuple[float, float] = (512.0, 512.0), up: list[float] = (0.0, -1.0, 0.0)) -> Camera:
        """A camera at ``eye`` looking at ``target`` with a horizontal field of view ``fov`` (degrees), principal
        point at the image centre. ``up`` is the world direction that appears up in the image (−y by default, so
        that world y points down the image as pixel rows do)."""
        if len(size) != 2 or not all(math.isfinite(float(x)) and float(x) > 0 for x in size):
            raise ConfigError(f"look_at: size={list(size)} is not a finite, positive [width, height] in pixels",
                              fix="give size as [width, height], e.g. (1024, 1024)")
        if not 0 < fov < 180:
            raise ConfigError(f"fov={fov}: the field of view must be between 0 and 180 degrees")
        for name, v in (("eye", eye), ("target", target), ("up", up)):
            if len(v) != 3 or not all(math.isfinite(float(x)) for x in v):
                raise ConfigError(f"look_at: {name}={list(v)} is not a point of 3 finite numbers",
                                  fix=f"give {name} as [x, y, z]")
        eye_, target_, up_ = (torch.tensor(v, dtype=torch.float64) for v in (eye, target, up))
        z = target_ - eye_
        if float(z.norm()) < 1e-12:
            raise ConfigError("look_at: eye and target are the same point; put the target in front of the camera")
        z = z / z.norm()
        x = torch.linalg.cross(z, up_)  # image right: x = y × z with y = −up (x right, y down, z forward)
        if float(x.norm()) < 1e-9:
            raise ConfigError("look_at: the view direction is parallel to up; pass another up vector")
        x = x / x.norm()
        y = torch.linalg.cross(z, x)
        R = torch.stack([x, y, z])  # rows: the camera axes in world coordinates
        t = -R @ eye_
        w, h = size
        f = (w / 2) / math.tan(math.radians(fov) / 2)
        K = [[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]]
        return cls(K=K, R=R.tolist(), t=t.tolist(), size=(float(w), float(h)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K``, ``R``, ``t`` as float64 tensors."""
        return (torch.tensor(self.K, dtype=torch.float64), torch.tensor(self.R, dtype=torch.float64),
                torch.tensor(self.t, dtype=torch.float64))

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Pixels ``(n, 2)`` of world points ``(n, 3)`` (in front of the camera)."""
        K, R, t = self.tensors()
        cam = points.to(torch.float64) @ R.T + t
        pix = cam @ K.T
        return pix[:, :2] / pix[:, 2:3]


class StereoRig(ScalarsOfTheirKind):
    """Two cameras side by side: the second ``baseline`` units to the right of the first, both looking ahead, the
    second rolled by ``roll`` degrees about its view axis. At roll 0 the pair is rectified (the epipolar lines are
    the image rows); a roll tilts the second view's lines by the same angle."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stereo"] = "stereo"
    baseline: float = Field(0.3, gt=0, allow_inf_nan=False, description="distance between the two cameras")
    roll: float = Field(0.0, ge=-180, le=180, description="roll of the second camera, degrees")
    fov: float = Field(50.0, gt=0, lt=180, description="horizontal field of view, degrees")

    @model_validator(mode="before")
    @classmethod
    def _two_views(cls, data: object) -> object:
        if isinstance(data, dict) and "views" in data:
            if data["views"] != 2:
                raise ValueError(f"a stereo rig has two cameras, not {data['views']!r}; for more views use an orbit "
                                 f"rig: {{\"kind\": \"orbit\", \"views\": N}}")
            data = {k: v for k, v in data.items() if k != "views"}
        return data

    @property
    def views(self) -> int:
        return 2

    def cameras(self, size: tuple[float, float] = (512.0, 512.0)) -> list[Camera]:
        a = math.radians(self.roll)
        b = self.baseline
        return [Camera.look_at([0, 0, 0], [0, 0, 1], fov=self.fov, size=size),
                Camera.look_at([b, 0, 0], [b, 0, 1], fov=self.fov, size=size, up=[math.sin(a), -math.cos(a), 0])]


class OrbitRig(ScalarsOfTheirKind):
    """``views`` cameras on a horizontal circle of ``radius`` around the scene centre, ``degrees`` apart, each looking
    at the centre; the middle of the arc faces the scene from the front."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["orbit"] = "orbit"
    views: int = Field(3, ge=2, le=8, description="number of cameras")
    degrees: float = Field(20.0, gt=0, lt=180, description="angle between neighbouring cameras, degrees")
    radius: float = Field(4.0, gt=0, allow_inf_nan=False, description="distance of the cameras from the centre")
    fov: float = Field(50.0, gt=0, lt=180, description="horizontal field of view, degrees")

    @model_validator(mode="after")
    def _open_arc(self) -> OrbitRig:
        if (self.views - 1) * self.degrees >= 360:
            raise ValueError(f"{self.views} cameras {self.degrees:g}° apart go round the circle and meet; keep "
                             "(views − 1)·degrees below 360")
        return self

    def cameras(self, size: tuple[float, float] = (512.0, 512.0)) -> list[Camera]:
        angles = [math.radians(self.degrees * (i - (self.views - 1) / 2)) for i in range(self.views)]
        r = self.radius
        return [Camera.look_at([r * math.sin(a), 0, -r * math.cos(a)], [0, 0, 0], fov=self.fov, size=size)
                for a in angles]


Rig = Annotated[StereoRig | OrbitRig, Field(discriminator="kind")]
"""A camera rig by its shape (``{"kind": "stereo", ...}`` or ``{"kind": "orbit", ...}``): the cameras are made for
each run's image size, so one rig serves every resolution and aspect."""


def skew(t: torch.Tensor) -> torch.Tensor:
    """``[t]×``: the matrix with ``[t]×·x = t × x``."""
    z = torch.zeros((), dtype=t.dtype)
    return torch.stack([torch.stack([z, -t[2], t[1]]), torch.stack([t[2], z, -t[0]]),
                        torch.stack([-t[1], t[0], z])])


def centre(camera: Camera) -> torch.Tensor:
    """The camera's centre in the world, ``C = −Rᵀ·t`` (float64)."""
    _, R, t = camera.tensors()
    return -R.T @ t


def _share_centre(a: Camera, b: Camera) -> bool:
    ca, cb = centre(a), centre(b)
    return float((ca - cb).norm()) < 1e-9 * max(1.0, float(ca.norm()))


SHARED_CENTRE = ("share a camera centre, so they have no epipolar lines (their pixels are related by a homography "
                 "instead)")


def check_baselines(cameras: list[Camera]) -> None:
    """Refuse (:class:`ConfigError`) the first two views, by index, whose cameras stand at one point."""
    for i in range(len(cameras)):
        for j in range(i + 1, len(cameras)):
            if _share_centre(cameras[i], cameras[j]):
                raise ConfigError(f"views {i} and {j} {SHARED_CENTRE}",
                                  f"move camera {j} (or {i}): every two views for epipolar attention need a baseline")


def fundamental(view_i: Camera, view_j: Camera) -> torch.Tensor:
    """``F_ij`` (float64, 3×3) with ``x_jᵀ·F_ij·x_i = 0`` for the pixels of every world point both views see."""
    if _share_centre(view_i, view_j):
        raise ConfigError(f"two views {SHARED_CENTRE}", "move one camera: views for epipolar attention need a baseline")
    Ki, Ri, ti = view_i.tensors()
    Kj, Rj, tj = view_j.tensors()
    R = Rj @ Ri.T
    t = tj - R @ ti
    return torch.linalg.inv(Kj).T @ skew(t) @ R @ torch.linalg.inv(Ki)


def epipole(view_i: Camera, view_j: Camera) -> torch.Tensor:
    """``(3,)``: view ``i``'s camera centre as a homogeneous pixel of view ``j`` (its epipole), ``K_j·(R_j·C_i + t_j)``;
    the third entry is the centre's depth in camera ``j`` (near 0: the epipole is at infinity)."""
    Kj, Rj, tj = view_j.tensors()
    return Kj @ (Rj @ centre(view_i) + tj)


def on_epipole(view_i: Camera, view_j: Camera, u: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """``(n,)`` bool: which pixels ``u`` (``(n, 2)``) of view ``i`` lie on its epipole, their ray running along the
    baseline (towards camera ``j``'s centre or away from it, within ``tol`` radians). Such a pixel has no epipolar
    line (``F·u = 0``): view ``j`` sees its whole ray as one point, view ``j``'s epipole (:func:`epipole`)."""
    Ki, Ri, _ = view_i.tensors()
    hom = torch.cat([u.to(torch.float64), torch.ones(u.shape[0], 1, dtype=torch.float64)], 1)
    rays = hom @ torch.linalg.inv(Ki).T @ Ri  # world directions
    base = (centre(view_j) - centre(view_i)).expand_as(rays)
    sin = torch.linalg.cross(rays, base).norm(dim=1) / (rays.norm(dim=1) * base.norm(dim=1))
    return sin <= tol


def token_centres(grid: tuple[int, int], size: tuple[float, float]) -> torch.Tensor:
    """``(h·w, 2)`` pixel centres (x, y) of the tokens of an ``h × w`` grid, row-major, over an image of ``size``."""
    h, w = grid
    W, H = size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (H / h)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (W / w)
    return torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=1)


def epipolar_lines(F: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(n, 3)``: the epipolar lines ``l = F·u`` in view ``j`` of the pixels ``u`` (``(n, 2)``) of view ``i``,
    scaled so that ``|l·(x, y, 1)|`` is the pixel distance of ``(x, y)`` from the line. A pixel on the epipole
    (:func:`on_epipole`) has no line (``F·u = 0``): its row is about 0, and :class:`TokenGeometry` measures from the
    one point its ray is in view ``j`` instead."""
    lines = torch.cat([u.to(F.dtype), torch.ones(u.shape[0], 1, dtype=F.dtype)], 1) @ F.T
    return lines / lines[:, :2].norm(dim=1, keepdim=True).clamp_min(1e-12)


def visible_spans(view_i: Camera, view_j: Camera, u: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """``(n, 2)``: where along its epipolar line (``lines``, from :func:`epipolar_lines`) view ``j`` can see what
    pixel ``u`` of view ``i`` sees, as an interval ``[lo, hi]`` of the coordinate ``τ = (−l_y, l_x)·(x, y)`` along
    the line (pixels; ``±inf`` for an open end, ``lo > hi`` where nothing is seen).

    The pixel's ray is ``X(s) = C_i + s·d`` with ``s > 0`` (in front of camera ``i``); in view ``j`` it is the
    homogeneous point ``e + s·v`` with ``e = K_j·(R_j·C_i + t_j)`` (the epipole) and ``v = K_j·R_j·d`` (the ray's
    vanishing point), at depth ``z(s) = e_z + s·v_z``, which must be > 0 (in front of camera ``j``). On that interval
    of ``s`` the projection runs monotonically along the line, so its ends are the images of the interval's ends:
    the epipole at ``s = 0`` (if ``e_z > 0``), the vanishing point at ``s → ∞`` (if ``v_z > 0``), or infinity along
    the line where ``z → 0⁺``. The rest of the line is the image of points behind one of the cameras: no
    correspondence lies there (for a rectified pair, the half of the row at negative disparity).

    A pixel on the epipole (:func:`on_epipole`) has a ray that view ``j`` sees as one point, its epipole ``e``: the
    span is that point, ``[τ(e), τ(e)]`` (its line must pass through ``e``, as :class:`TokenGeometry` makes it) if
    some of the ray is in front of both cameras and ``e`` is not at infinity, else empty."""
    Ki, Ri, _ = view_i.tensors()
    Kj, Rj, _ = view_j.tensors()
    hom = torch.cat([u.to(torch.float64), torch.ones(u.shape[0], 1, dtype=torch.float64)], 1)
    d = hom @ torch.linalg.inv(Ki).T @ Ri  # ray directions in the world: Rᵢᵀ·Kᵢ⁻¹·u (depth 1 in camera i)
    e = epipole(view_i, view_j)  # (3,)
    v = d @ Rj.T @ Kj.T  # (n, 3)
    tangent = torch.stack([-lines[:, 1], lines[:, 0]], 1).to(torch.float64)

    def along(p: torch.Tensor) -> torch.Tensor:
        """τ of homogeneous points ``p`` (n, 3) approached from positive depth: ±inf at depth 0 (+inf, not NaN,
        where the line is zero)."""
        num = (tangent * p[:, :2]).sum(1)
        finite = p[:, 2] > 1e-12 * p.norm(dim=1)
        return torch.where(finite, num / torch.where(finite, p[:, 2], 1.0), torch.where(num < 0, -math.inf, math.inf))

    n = u.shape[0]
    ez, vz = float(e[2]), v[:, 2]
    flat = vz.abs() <= 1e-12 * v.norm(dim=1)  # the ray runs parallel to view j's image plane
    at_zero = e + (-ez / torch.where(flat, 1.0, vz))[:, None] * v  # where z(s) = 0 (depth 0: infinity)
    e_rows = e.expand(n, 3)
    # the ends of the visible interval of s, as image points: (start, end)
    start = torch.where(((vz > 0) & (ez < 0) & ~flat)[:, None], at_zero, e_rows)
    end = torch.where(flat[:, None], v * torch.tensor([1.0, 1.0, 0.0], dtype=v.dtype),  # infinity along v
                      torch.where((vz > 0)[:, None], v, at_zero))
    a, b = along(start), along(end)
    seen = torch.where(flat, torch.full_like(vz, ez), torch.where(vz > 0, torch.ones_like(vz), torch.full_like(vz, ez))
                       ) > 0  # some s > 0 with z(s) > 0
    # on the epipole the whole ray is the point e (seen from behind camera j or not, its pixel is e's)
    on = on_epipole(view_i, view_j, u)
    tau_e = along(e_rows * torch.sign(e_rows[:, 2:]))  # inf where e is at infinity
    seen = seen & (~on | tau_e.isfinite())
    lo = torch.where(seen, torch.where(on, tau_e, torch.minimum(a, b)), math.inf)
    hi = torch.where(seen, torch.where(on, tau_e, torch.maximum(a, b)), -math.inf)
    return torch.stack([lo, hi], 1)


def line_distance(F: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(n, m)``: pixel distance of each point ``v`` (``(m, 2)``, view ``j``) from the epipolar line of each
    point ``u`` (``(n, 2)``, view ``i``)."""
    ones_v = torch.ones(v.shape[0], 1, dtype=F.dtype)
    return (epipolar_lines(F, u) @ torch.cat([v.to(F.dtype), ones_v], 1).T).abs()


class TokenGeometry:
    """The epipolar lines of one view pair on one token grid, in token units, to read distances block by block:
    ``distances(r0, r1)`` is ``(r1 − r0, N)`` — how far each of view ``j``'s token centres lies from the line of
    view ``i``'s tokens ``r0:r1`` — so no ``N × N`` table is ever held. Both cameras must share ``size`` (jointly
    generated views have one resolution).

    With ``in_front`` a line is only the part of it that can hold a correspondence, the image of the points in front
    of both cameras (:func:`visible_spans`): the distance of a token beyond an end of that part is its distance from
    the end. Without it (the default, as the papers' epipolar attention), the whole line. A token on the epipole
    has no line (:func:`on_epipole`): view ``j`` sees its ray as one point, the epipole of view ``j``, and the
    distance is to that point (with ``in_front``, only if some of the ray is in front of both cameras; else
    infinite, as it is when that point is at infinity)."""

    def __init__(self, view_i: Camera, view_j: Camera, grid: tuple[int, int], device=None,
                 in_front: bool = False) -> None:
        if tuple(view_i.size) != tuple(view_j.size):
            raise ConfigError(f"the cameras' sizes differ ({list(view_i.size)} vs {list(view_j.size)}); jointly "
                              "generated views share one resolution, so write every K for the same image size")
        W, H = view_i.size
        self.size = (float(W), float(H))
        h, w = grid
        token = math.sqrt((W / w) * (H / h))  # a token's side in pixels (the geometric mean if not square)
        centres = token_centres(grid, view_i.size)
        lines = epipolar_lines(fundamental(view_i, view_j), centres)
        on = on_epipole(view_i, view_j, centres)  # no line: the ray is one point, e, of view j
        e = epipole(view_i, view_j)
        e_far = float(e[2].abs()) <= 1e-12 * float(e.norm())  # e at infinity: no key is near it
        if on.any():  # the line y = e_y through e, along which τ = −x; the span below is τ(e) alone
            lines[on] = torch.tensor([0.0, 0.0, 0.0] if e_far else [0.0, 1.0, -float(e[1] / e[2])], dtype=lines.dtype)
        self.lines = (lines / token).to(torch.float32).to(device)
        self.points = torch.cat([centres, torch.ones(len(centres), 1, dtype=centres.dtype)], 1).to(
            torch.float32).to(device)  # (N, 3) homogeneous pixel centres of view j (same grid)
        spans = visible_spans(view_i, view_j, centres, lines)
        self.sees_common = bool((spans[:, 0] <= spans[:, 1]).any())  # some token's ray is in front of both cameras
        self.spans = None
        if in_front or on.any():  # τ along each line, in tokens, and the part of the line measured from
            if not in_front:  # the whole line, but a token on the epipole is measured from its point
                point = [math.inf, -math.inf] if e_far else [-float(e[0] / e[2])] * 2
                spans = torch.where(on[:, None], torch.tensor(point, dtype=spans.dtype),
                                    torch.tensor([-math.inf, math.inf], dtype=spans.dtype))
            self.tangents = (torch.stack([-lines[:, 1], lines[:, 0], torch.zeros_like(lines[:, 0])], 1) / token
                             ).to(torch.float32).to(device)
            self.spans = (spans / token).to(torch.float32).to(device)

    def distances(self, r0: int, r1: int) -> torch.Tensor:
        """``(r1 − r0, N)`` token distances of view ``j``'s tokens from the lines (or visible parts of the lines) of
        view ``i``'s tokens ``r0:r1``."""
        return self.distances_of(slice(r0, r1))

    def distances_of(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """:meth:`distances` for view ``i``'s tokens ``rows`` (a slice or an index tensor)."""
        d = (self.lines[rows] @ self.points.T).abs()
        if self.spans is None:
            return d
        tau = self.tangents[rows] @ self.points.T
        lo, hi = self.spans[rows, :1], self.spans[rows, 1:]
        past = (lo - tau).clamp_min(0) + (tau - hi).clamp_min(0)  # how far beyond an end of the visible part
        return torch.hypot(d, past)

    def pencil_order(self) -> torch.Tensor:
        """View ``i``'s tokens ordered along the pencil of their epipolar lines, so that consecutive tokens have
        lines that run close together across view ``j``. A line's signed distances from the image's four corners fix
        where it crosses the image (the distance is affine in the point, so lines close at the corners are close
        everywhere inside); the tokens are sorted by the main axis of those four numbers. Tokens on one line (a
        rectified pair's image row) stay together, in row-major order."""
        W, H = self.size
        corners = torch.tensor([[0.0, 0.0, 1.0], [W, 0.0, 1.0], [0.0, H, 1.0], [W, H, 1.0]], dtype=torch.float64)
        signature = self.lines.cpu().double() @ corners.T
        signature = signature - signature.mean(0)
        axis = torch.linalg.svd(signature, full_matrices=False).Vh[0]
        return (signature @ axis).argsort(stable=True)

    def band_chunks(self, band: float, size: int = 128) -> list[BandChunk]:
        """The hard band as blocks: view ``i``'s tokens in runs of ``size`` along the pencil, each with the keys of
        view ``j`` inside the band of any of its lines. A run's lines are close together, so its keys are a narrow
        strip (about 6% of a 64 × 64 grid for a band of one token): attention over the band then reads those keys
        only. Runs whose lines all miss view ``j`` are left out; runs that reach most of it keep every key."""
        order = self.pencil_order()
        chunks = []
        for c0 in range(0, len(order), size):
            queries = order[c0:c0 + size]
            inside = self.distances_of(queries.to(self.lines.device)).cpu() <= band
            reached = inside.any(0)
            if not bool(reached.any()):
                continue
            keys = None if float(reached.float().mean()) > 0.5 else reached.nonzero().squeeze(1)
            chunks.append(BandChunk(queries, keys, inside if keys is None else inside[:, keys]))
        return chunks


@dataclass(frozen=True)
class BandChunk:
    """Queries of view ``i`` whose epipolar lines run close together, the keys of view ``j`` inside the band of any
    of them (``None``: every key), and which query keeps which of those keys."""

    queries: torch.Tensor  # (t,) long: token indices of view i
    keys: torch.Tensor | None  # (u,) long: token indices of view j
    inside: torch.Tensor  # (t, u) bool

    def to(self, device) -> BandChunk:
        keys = None if self.keys is None else self.keys.to(device)
        return BandChunk(self.queries.to(device), keys, self.inside.to(device))
