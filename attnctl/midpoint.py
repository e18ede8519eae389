"""RF-Solver's second-order step as a diffusers scheduler: the explicit midpoint rule on the flow-matching grid.

Rectified-flow models sample ``dz/dσ = v(z, σ)`` from ``σ = 1`` to ``0``. diffusers' Euler step takes one
prediction per step, ``z_{i+1} = z_i + Δ·v(z_i, σ_i)`` with ``Δ = σ_{i+1} − σ_i``, and its error per step is
``O(Δ²)``. RF-Solver (Wang et al., "Taming Rectified Flow for Inversion and Editing", 2024) adds the second Taylor
term, ``½Δ²·v'``, with ``v'`` a finite difference over half a step::

    v_i  = v(z_i, σ_i)
    z_m  = z_i + (Δ/2)·v_i                          the half step, at  m_i = σ_i + Δ/2
    v'   ≈ (v(z_m, m_i) − v_i) / (Δ/2)
    z_{i+1} = z_i + Δ·v_i + ½Δ²·v'  =  z_i + Δ·v(z_m, m_i)

which is the explicit midpoint rule: two predictions per step, error ``O(Δ³)`` per step. Inverting with the same
rule (:func:`attnctl.inversion.midpoint_invert`) and sampling with it makes the round trip second order too.

:class:`FlowMatchMidpointScheduler` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (same config, shifts, custom
``sigmas`` and FLUX's ``mu``) with the midpoints put between the steps: ``sigmas = σ_0, m_0, σ_1, m_1, …, σ_n`` and
one timestep per prediction, ``order = 2``. The stock SD3 and FLUX pipelines run it unchanged::

    pipe.scheduler = FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)

The pipeline then calls the transformer ``2n`` times for ``num_inference_steps=n``. A pipeline window that compares
the loop index with a fraction of ``n`` (SD3's ``skip_layer_guidance_start`` / ``stop``) then covers half the share
of the run it names, as with diffusers' own second-order schedulers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

# A saved pipeline names this module for its scheduler, and diffusers' loader looks the loading base class up *on
# this module* (``getattr(module, "SchedulerMixin")``), so it must stay a module attribute.
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import ConfigError

__all__ = ["SOLVERS", "FlowMatchMidpointScheduler", "SchedulerMixin", "is_midpoint", "step_anchor", "use_solver"]


class FlowMatchMidpointScheduler(FlowMatchEulerDiscreteScheduler):
    """The flow-matching grid of diffusers' Euler scheduler, stepped by the midpoint rule (RF-Solver, module doc).

    Call ``k`` of the loop predicts at ``sigmas[k]``: even calls at a grid point ``σ_i``, odd calls at the midpoint
    ``m_i``. An even call returns the half step ``z_i + (m_i − σ_i)·v``; the odd call after it returns the whole step
    ``z_i + (σ_{i+1} − σ_i)·v(z_m)`` from the ``z_i`` it kept.
    """

    order = 2

    _anchor: torch.Tensor | None = None  # z_i of the step under way, kept by its first call

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """The Euler scheduler's grid for these arguments, with the midpoint of every step put after its start."""
        if timesteps is not None:
            raise ConfigError("the midpoint scheduler takes its timesteps from the sigmas",
                              fix="pass sigmas=... (or neither) instead of timesteps=...")
        if self.config.stochastic_sampling:
            raise ConfigError("the midpoint scheduler is a deterministic solver and its config samples "
                              "stochastically", fix="set stochastic_sampling=False in the scheduler's config")
        if self.config.invert_sigmas:
            raise ConfigError("the midpoint scheduler does not support invert_sigmas (a Mochi-only setting)",
                              fix="use FlowMatchEulerDiscreteScheduler for this model")
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        self._sigmas_given = sigmas is not None
        grid = self.sigmas  # σ_0 … σ_n, σ_n = 0
        mids = (grid[:-1] + grid[1:]) / 2
        self.sigmas = torch.stack([grid[:-1], mids], dim=1).flatten().contiguous()
        self.sigmas = torch.cat([self.sigmas, grid[-1:]])
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._anchor = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where an img2img run starts. A pipeline that passed its own sigmas (FLUX img2img, inpaint, Fill; SD3
        img2img given ``sigmas=``) read its step count back from ``len(timesteps)``, which here counts two calls per
        step, and so computed its strength's start twice over: refused rather than started at the wrong noise."""
        if begin_index and getattr(self, "_sigmas_given", False):
            raise ConfigError(
                "this img2img pipeline passes its own sigmas and counts the midpoint scheduler's two calls per step "
                "as steps, so its strength would start the run at the wrong noise level",
                fix="use FlowMatchEulerDiscreteScheduler for this img2img call (or strength=1.0), or edit the image "
                    "with attnctl.edit(..., solver='midpoint'), which inverts it")
        super().set_begin_index(begin_index)

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next call starts a step (diffusers' name for it on its second-order schedulers)."""
        return self._anchor is None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             *args: Any, per_token_timesteps: torch.Tensor | None = None, return_dict: bool = True,
             **kwargs: Any) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One call's update (class doc). ``s_churn``-style arguments are accepted and ignored, as the Euler
        scheduler does without stochastic sampling."""
        if per_token_timesteps is not None:
            raise ConfigError("the midpoint scheduler steps every token at one noise level",
                              fix="use FlowMatchEulerDiscreteScheduler for per-token timesteps")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ConfigError("step() takes one of scheduler.timesteps, not an integer index",
                              fix="pass the t of `for t in scheduler.timesteps`")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        v = model_output.float()
        if k % 2 == 0:  # a grid point σ_i: keep z_i, go half a step
            self._anchor = sample.float()
            prev = self._anchor + (self.sigmas[k + 1] - self.sigmas[k]) * v
        else:  # the midpoint m_i: the whole step from z_i with v(z_m)
            if self._anchor is None:
                raise ConfigError(f"call {k} of the loop is a midpoint and no step was started before it",
                                  fix="step the scheduler through its timesteps in order from a grid point")
            prev = self._anchor + (self.sigmas[k + 1] - self.sigmas[k - 1]) * v
            self._anchor = None
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def is_midpoint(scheduler: Any) -> bool:
    """Whether ``scheduler`` steps by the midpoint rule (its calls alternate grid points and midpoints)."""
    return isinstance(scheduler, FlowMatchMidpointScheduler)


def step_anchor(scheduler: Any, call: int) -> int:
    """The loop call whose input latent the update of ``call`` starts from: the loop's next latent is
    ``z_anchor + (σ_{call+1} − σ_anchor)·v`` with ``v`` this call's prediction. Euler: the call itself; midpoint: the
    call itself at a grid point, the call before at a midpoint."""
    return call - 1 if is_midpoint(scheduler) and call % 2 else call


SOLVERS = ("euler", "midpoint")
"""The solvers a front end offers: the pipeline's own (Euler) step, or the midpoint step of this module."""


@contextlib.contextmanager
def use_solver(pipe: Any, solver: str) -> Iterator[Any]:
    """Run the block with ``pipe`` stepping by ``solver``: "euler" leaves the pipeline's own scheduler (a midpoint one,
    as a pipeline saved with it has, is swapped for diffusers' Euler scheduler of its config), "midpoint" puts a
    :class:`FlowMatchMidpointScheduler` made from its config in its place. The pipeline's scheduler is put back on
    exit, also when the block raises."""
    if solver not in SOLVERS:
        raise ConfigError(f"the solver is {solver!r}", fix=f"choose one of {', '.join(SOLVERS)}")
    own = pipe.scheduler
    if solver == "midpoint":
        pipe.scheduler = FlowMatchMidpointScheduler.from_config(own.config)
    elif isinstance(own, FlowMatchMidpointScheduler):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = own
