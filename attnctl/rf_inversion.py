"""RF-Inversion's two controllers: steer the inversion toward a noise sample, and the edit back toward the image.

Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic Differential Equations" (ICLR 2025),
write each pass of an edit as the model's flow plus a pull along a straight line. In attnctl's ``σ`` notation
(``σ = 1`` noise, ``σ = 0`` image, ``dz/dσ = v``):

- **inversion** (``σ`` rising, the image latent ``y_0`` up to noise) follows

      v_γ(z, σ) = v(z, σ) + γ·(u(z, σ) − v(z, σ)),     u(z, σ) = (y_1 − z)/(1 − σ)

  where ``u`` is the velocity of the straight line from ``z`` to a fixed Gaussian sample ``y_1`` at ``σ = 1``.
  ``γ = 0`` is plain inversion; ``γ = 1`` ends exactly on ``y_1``. In between the inverted noise is nearer a typical
  Gaussian sample, which the paper shows makes the edit follow the new prompt more readily;
- **the edit** (``σ`` falling) follows

      v_η(z, σ) = v(z, σ) + η_t·(w(z, σ) − v(z, σ)),   w(z, σ) = (z − y_0)/σ

  on the target rows, with ``w`` the straight line from ``z`` down to the image latent ``y_0`` at ``σ = 0``. ``η_t``
  is a schedule over the steps: on for the first steps it keeps the image's layout, off afterwards it lets the
  new prompt draw.

Both are affine in ``v`` with weights that sum to one, so applying ``v_η`` to every row a step combines (CFG's
conditional and unconditional rows, FLUX's negative-prompt call, SD3's skip-layer pass) gives ``v_η`` of the
combined prediction. :class:`RFInversion` holds the settings (γ, the η schedule and the seed of ``y_1``);
:func:`attnctl.invert` takes ``gamma`` and ``seed``, and :func:`attnctl.edit` takes ``rf=RFInversion()``. The
defaults are the paper's editing example (γ = 0.5, η = 0.9 over the first quarter of the steps). The paper inverts
with an empty prompt; attnctl keeps the source prompt, as its plain inversion does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ConfigDict, Field, ValidationError

from .errors import ConfigError
from .json_types import ScalarsOfTheirKind
from .schedules import bounded

if TYPE_CHECKING:  # attnctl.inversion imports this module
    from .inversion import Velocity


class RFInversion(ScalarsOfTheirKind):
    """RF-Inversion's settings for :func:`attnctl.edit` (module doc); JSON round trip with :meth:`to_json`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    gamma: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="γ: how strongly the inversion is pulled toward the noise sample y_1 (0: plain "
                                     "inversion; 1: it ends on y_1)")
    eta: bounded(0, 1) = Field("window(0.9, 0, 0.25)",
                               description="η_t: schedule of the pull of the edited image toward the source image "
                                           "over the steps (0: off)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the noise sample y_1 the inversion is pulled toward")

    def __init__(self, **kwargs: Any) -> None:
        try:
            super().__init__(**kwargs)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) + ': ' if err['loc'] else ''}"
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            fix = None if "Fix:" in problems else ("give gamma in [0, 1], eta as a schedule in [0, 1] (e.g. "
                                                   "'window(0.9, 0, 0.25)') and seed from 0 to 2**63 - 1")
            raise ConfigError(f"RF-Inversion settings: {problems}", fix=fix) from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def canonical(self) -> RFInversion | None:
        """The same edit in one spelling: the seed set to 0 when ``gamma`` is 0 (no noise sample is drawn then), and
        ``None`` when neither controller can act (``gamma`` 0 and ``eta`` 0 at every step). Batch runs hash this, so
        settings that change nothing do not redo an edit or its inversion."""
        if self.gamma:
            return self
        if self.eta._range(0.0, 1.0) == (0.0, 0.0):
            return None
        return self.model_copy(update={"seed": 0})

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RFInversion:
        if not isinstance(data, Mapping):
            raise ConfigError(f"RF-Inversion settings are a JSON object, got {type(data).__name__}",
                              fix='pass e.g. {"gamma": 0.5, "eta": "window(0.9, 0, 0.25)"}, or {} for the defaults')
        return cls(**data)


def noise_sample(like: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed Gaussian sample ``y_1`` (drawn on the CPU, so a seed gives the same sample on every device)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.device, like.dtype)


def toward_noise(velocity: Velocity, y1: torch.Tensor, gamma: float) -> Velocity:
    """``v_γ``: the inversion's velocity pulled toward the straight line to ``y1`` at ``σ = 1`` (module doc)."""
    gamma = float(gamma)
    if gamma == 0.0:
        return velocity

    def steered(z: torch.Tensor, sigma: float) -> torch.Tensor:
        if not sigma < 1.0:
            raise ConfigError(f"RF-Inversion's inversion pull is undefined at σ = {sigma} (it divides by 1 − σ)",
                              fix="invert over the scheduler's grid, whose velocities are taken below σ = 1")
        v = velocity(z, sigma)  # on the model's device and dtype; the line is taken there too
        u = (y1.to(v.device, v.dtype) - z.to(v.device, v.dtype)) / (1.0 - sigma)
        return v + gamma * (u - v)

    return steered


def toward_image(v: torch.Tensor, z: torch.Tensor, y0: torch.Tensor, sigma: float, eta: float) -> torch.Tensor:
    """``v_η``: the edit's prediction ``v`` at ``(z, σ)`` pulled toward the straight line to ``y0`` at ``σ = 0``
    (module doc); ``v`` may hold several rows that share ``z``."""
    if eta == 0.0:
        return v
    if not sigma > 0.0:
        raise ConfigError(f"RF-Inversion's edit pull is undefined at σ = {sigma} (it divides by σ)",
                          fix="use a scheduler whose loop predicts above σ = 0 (every flow-matching one does)")
    w = (z.to(v.device, v.dtype) - y0.to(v.device, v.dtype)) / sigma
    return v + eta * (w - v)
