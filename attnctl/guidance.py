"""Perturbed-branch guidance (PAG, SoftPAG) in one batched forward, under the unchanged diffusers loop.

The guided prediction, with ``s`` the CFG scale and ``w`` the perturbation guidance weight::

    with CFG:     ε = ε_uncond + s·(ε_cond − ε_uncond) + w·(ε_cond − ε_ptb)
    without CFG:  ε = ε_cond + w·(ε_cond − ε_ptb)

The diffusers loops already compute ``ε_uncond + s·(ε_cond − ε_uncond)`` (or take ``ε_cond`` as it is). So
instead of rewriting the loop, the transformer call is wrapped: it runs the perturbed rows in the same
batch, ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG), and adds one shift to every prediction
of the same image::

    δ = w·(ε_cond − ε_ptb)          ε_cond' = ε_cond + δ,   ε_uncond' = ε_uncond + δ

The loop's CFG line is an affine combination whose weights sum to one, ``(1 − s)·ε_uncond + s·ε_cond``, so it
carries the shift through unchanged: ``ε_uncond' + s·(ε_cond' − ε_uncond')`` is exactly the guided ε above, for
any ``s`` (the wrapper never needs to know it). The same holds for the calls a loop makes apart from the batched
one, which get the ``δ`` of their step's conditional call: FLUX's true CFG calls the transformer for the negative
prompt after the conditional prompt, and SD3's skip-layer guidance calls it again on the conditional rows; shifted,
its term ``ε_cond' − ε_skip'`` stays ``ε_cond − ε_skip``. Everything else of the loop (callbacks, ``mu`` shifting,
schedulers, offloading) is untouched.

The batch roles come from the controller (its forward pre-hook has just read them off the pipeline); the
wrapper appends a ``"perturbed"`` copy of every ``"cond"`` row and tells the controller, so controls that
act on ``"perturbed"`` rows (:class:`~attnctl.controls.softpag.SoftPAG`) perturb only those. When ``w`` is 0
at a step the perturbed rows are not run at all. A search may instead give every image of a call its own
branch (controls with ``branch=j``; see :class:`Branches`): image ``j`` is then guided by control ``j``. A
:class:`~attnctl.controller.Controller` that follows a pipeline installs the wrapper itself when one of its
controls asks for a perturbed branch (``attnctl.attach``, ``set_attn_processor(ctl.processors())``, the attnctl
pipelines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .forward_wrap import ForwardWrapper, image_rows, later_call, map_rows, sample_of, with_sample
from .schedules import adaptive_parts

# ------------------------------------------------------------------------------------------ the formula


def guided(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, eps_ptb: torch.Tensor, cfg_scale: float,
           weight: float) -> torch.Tensor:
    """The guided prediction written out: ``ε_uncond + s·(ε_cond − ε_uncond) + w·(ε_cond − ε_ptb)``;
    ``eps_uncond=None`` means no CFG: ``ε_cond + w·(ε_cond − ε_ptb)``."""
    base = eps_cond if eps_uncond is None else eps_uncond + cfg_scale * (eps_cond - eps_uncond)
    return base + weight * (eps_cond - eps_ptb)


def guidance_shift(eps_cond: torch.Tensor, eps_ptb: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """``δ = w·(ε_cond − ε_ptb)``: added to every prediction of an image (conditional, unconditional, skip-layer),
    it turns the loop's own guidance formula into that formula plus the perturbation term, whatever its CFG scale.
    ``weight`` may be a tensor broadcasting over the rows (one ``w`` per image)."""
    return weight * (eps_cond - eps_ptb)


# ------------------------------------------------------------------------------------------ the controls


@dataclass(frozen=True)
class Branches:
    """The perturbed branch(es) a set of controls asks for.

    ``count is None``: one shared branch — every ``"cond"`` row gets one ``"perturbed"`` copy and all rows
    share ``w``. ``count = B``: per-image branches for a search — the controls carry ``branch=0..B-1`` and
    the ``j``-th conditional row of a call gets the role ``"perturbed[j mod B]"`` and that branch's ``w``
    (with one prompt and ``num_images_per_prompt=B``, image ``j`` is guided by the control with
    ``branch=j``). ``weights(step, num_steps)`` gives one ``w`` per branch (one entry when shared).
    """

    count: int | None
    weights: Callable[[int, int], list[float]]

    def role(self, j: int) -> str:
        """The role of the perturbed copy of the ``j``-th conditional row."""
        return "perturbed" if self.count is None else f"perturbed[{j % self.count}]"

    def weight(self, j: int, ws: Sequence[float]) -> float:
        return ws[0] if self.count is None else ws[j % self.count]


def perturbed_branches(controls: Sequence[Any]) -> Branches | None:
    """The perturbed branch(es) of the controls that ask for one (``perturbed_branch = True`` and a
    ``guidance_weight(step, num_steps)`` method), or ``None`` when none does.

    Without ``branch=`` they all perturb the same ``"perturbed"`` rows, so there is one ``w``: their
    ``scale`` schedules must agree; ``w`` at a step is 0 when every one of them is inactive there (e.g.
    ``u = 0``). With ``branch=`` every such control needs one, and the indices must be ``0..B-1`` (several
    controls may share an index, and then a scale).
    """
    branch = [c for c in controls if getattr(c, "perturbed_branch", False)]
    if not branch:
        return None
    index = [getattr(c.config, "branch", None) for c in branch]
    if any(i is not None for i in index):
        if any(i is None for i in index):
            raise ConfigError(
                "some perturbed-branch controls have branch= and some do not",
                fix="give every one a branch index (one image per branch) or none (one shared branch)",
            )
        count = max(index) + 1
        if set(index) != set(range(count)):
            missing = sorted(set(range(count)) - set(index))
            raise ConfigError(f"branch indices must be 0..{count - 1}; missing {missing}",
                              fix="number the candidate controls 0, 1, 2, ... without gaps")
        groups = [[c for c, i in zip(branch, index, strict=True) if i == j] for j in range(count)]
        for group in groups:
            _same_scale(group)
        return Branches(count, lambda step, n: [_weight_of(g, step, n) for g in groups])
    _same_scale(branch)
    return Branches(None, lambda step, n: [_weight_of(branch, step, n)])


def _same_scale(group: Sequence[Any]) -> None:
    scales = [getattr(c.config, "scale", None) for c in group]
    if len({repr(s) for s in scales}) == 1:
        return
    if all(s is not None and not adaptive_parts(s) for s in scales):  # written differently, the same values
        runs = {tuple(tuple(s.values(n)) for n in range(1, 129)) for s in scales}  # ("2" and "window(2, 0, 1)")
        if len(runs) == 1:
            return
    raise ConfigError(
        f"{len(group)} controls ask for the same perturbed branch with different guidance scales "
        f"({', '.join(sorted({repr(s) for s in scales}))})",
        fix="they share one perturbed branch and one w: give them the same scale= schedule",
    )


def _weight_of(group: Sequence[Any], step: int, num_steps: int) -> float:
    for c in group:
        w = c.guidance_weight(step, num_steps)
        if w != 0:
            return float(w)
    return 0.0


# ------------------------------------------------------------------------------------------ the wrapper


class PerturbedBranch(ForwardWrapper):
    """Context manager: wrap ``transformer.forward`` so each call also runs the perturbed rows and returns
    the shifted predictions (see the module doc). Restored on exit, also when the call raises.

    Args:
        transformer: the pipeline's transformer (SD3 or FLUX).
        controller: the :class:`~attnctl.controller.Controller` installed on it; its state gives the step
            and the batch roles of each call.
        branches: the perturbed branch(es) and their ``w`` per step, from :func:`perturbed_branches`.
    """

    def __init__(self, transformer: torch.nn.Module, controller: Any, branches: Branches) -> None:
        super().__init__(transformer)
        self.controller = controller
        self.branches = branches
        self._shift: tuple[int, torch.Tensor] | None = None  # (step, δ) of the last conditional call
        self.calls = 0  # transformer calls that ran perturbed rows (for tests and logs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.controller.state
        if state.gradient_pass:  # latent guidance's pass for its loss: the maps of the conditional rows only
            return self.call_original(*args, **kwargs)
        roles = list(state.roles or [])
        ws = self.branches.weights(*state.schedule_step)
        later = later_call(kwargs, roles)
        if later is not None:  # SD3's skip-layer pass, FLUX's negative-prompt call: the step's δ
            result = self.call_original(*args, **kwargs)
            return self._shifted(result, later) if any(ws) else result
        if not any(ws) or "cond" not in roles:  # no guidance at this step, or no conditional rows to guide
            self._shift = None
            return self.call_original(*args, **kwargs)
        bound = self.bind(args, kwargs)
        batch = bound["hidden_states"].shape[0]
        cond, uncond = image_rows(roles, batch, "the perturbed branch")
        if self.branches.count is not None and len(cond) % self.branches.count:
            raise ConfigError(
                f"{self.branches.count} perturbed branches (branch=0..{self.branches.count - 1}) but the call has "
                f"{len(cond)} conditional rows",
                fix=f"generate {self.branches.count} images per prompt (num_images_per_prompt="
                    f"{self.branches.count}): image j is guided by the control with branch=j",
            )
        idx = state.index(cond, bound["hidden_states"].device)  # made once per run (no host copy per call)
        bound = map_rows(bound, batch, lambda x: torch.cat([x, x.index_select(0, idx.to(x.device))]), "SoftPAG")
        extra = [self.branches.role(j) for j in range(len(cond))]
        result = self._with_roles(roles + extra, cond, (), bound)
        self.calls += 1
        sample = sample_of(result)
        eps, eps_ptb = sample[:batch], sample[batch:]
        w: float | torch.Tensor = ws[0]
        if self.branches.count is not None:  # one w per image
            w = torch.tensor([self.branches.weight(j, ws) for j in range(len(cond))], device=eps.device)
            w = w.view(-1, *[1] * (eps.ndim - 1)).to(eps.dtype)
        delta = guidance_shift(eps.index_select(0, idx.to(eps.device)), eps_ptb, w)
        self._shift = (state.step, delta)
        for rows in (cond, uncond):
            if rows:
                eps = eps.index_add(0, state.index(rows, eps.device), delta.to(eps.dtype))
        return with_sample(result, eps)

    def _shifted(self, result: Any, what: str) -> Any:
        """A call apart from the batched one (every row an image's): its predictions get the step's ``δ``."""
        sample = sample_of(result)
        step = self.controller.state.step
        if self._shift is None or self._shift[0] != step or self._shift[1].shape != sample.shape:
            raise ConfigError(
                f"the perturbed branch met {what} at step {step} before the conditional call of that step, so it "
                "has no guidance term to add to it",
                fix="call the transformer for the conditional prompt first in every step, as the diffusers SD3 and "
                    "FLUX loops do")
        return with_sample(result, sample + self._shift[1].to(sample.dtype))

    def _with_roles(self, roles: list[str], copies: Sequence[int], args: tuple, kwargs: dict) -> Any:
        """The original forward with the batch ``roles``, its rows after the call's own copying the rows ``copies``
        (each reads the prompt of the row it copies, when the call has several prompts)."""
        state = self.controller.state
        saved = state.roles, state.row_layouts
        state.roles = roles
        if state.row_layouts is not None:
            state.row_layouts = [*state.row_layouts, *(state.row_layouts[i] for i in copies)]
        try:
            return self.call_original(*args, **kwargs)
        finally:
            state.roles, state.row_layouts = saved
