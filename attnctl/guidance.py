"""Perturbed-branch guidance (PAG, SoftPAG) in one batched forward, under the unchanged diffusers loop.

The guided prediction, with ``s`` the CFG scale and ``w`` the perturbation guidance weight::

    with CFG:     ε = ε_uncond + s·(ε_cond − ε_uncond) + w·(ε_cond − ε_ptb)
    without CFG:  ε = ε_cond + w·(ε_cond − ε_ptb)

The diffusers loops already compute ``ε_uncond + s·(ε_cond − ε_uncond)`` (or take ``ε_cond`` as it is). So
instead of rewriting the loop, the transformer call is wrapped: it runs the perturbed rows in the same
batch, ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG), and hands the loop back
``[ε_uncond, ε_cond']`` with::

    ε_cond' = ε_cond + (w / s)·(ε_cond − ε_ptb)          (s = 1 without CFG)

so that the loop's own formula yields the guided ε above: ``ε_uncond + s·(ε_cond' − ε_uncond)`` expands to
exactly that. Everything else of the loop (callbacks, ``mu`` shifting, schedulers, offloading) is untouched.
FLUX's true CFG calls the transformer separately for the conditional and the negative prompt; only the
conditional call gets perturbed rows, with ``s = true_cfg_scale``.

The batch roles come from the controller (its forward pre-hook has just read them off the pipeline); the
wrapper appends a ``"perturbed"`` copy of every ``"cond"`` row and tells the controller, so controls that
act on ``"perturbed"`` rows (:class:`~attnctl.controls.softpag.SoftPAG`) perturb only those. When ``w`` is 0
at a step the perturbed rows are not run at all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import ConfigError

BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
"""Transformer inputs with one entry per batch row (SD3 and FLUX); the perturbed rows copy them."""


# ------------------------------------------------------------------------------------------ the formula


def guided(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, eps_ptb: torch.Tensor, cfg_scale: float,
           weight: float) -> torch.Tensor:
    """The guided prediction written out: ``ε_uncond + s·(ε_cond − ε_uncond) + w·(ε_cond − ε_ptb)``;
    ``eps_uncond=None`` means no CFG: ``ε_cond + w·(ε_cond − ε_ptb)``."""
    base = eps_cond if eps_uncond is None else eps_uncond + cfg_scale * (eps_cond - eps_uncond)
    return base + weight * (eps_cond - eps_ptb)


def fold_into_cond(eps_cond: torch.Tensor, eps_ptb: torch.Tensor, cfg_scale: float, weight: float) -> torch.Tensor:
    """``ε_cond' = ε_cond + (w/s)·(ε_cond − ε_ptb)``: the conditional prediction that makes the loop's own
    CFG formula (scale ``s``; ``s = 1`` without CFG) produce :func:`guided`."""
    if cfg_scale == 0:
        raise ConfigError("perturbed-attention guidance cannot be folded into a CFG scale of 0",
                          fix="use a guidance scale above 1 (CFG) or turn CFG off")
    return eps_cond + (weight / cfg_scale) * (eps_cond - eps_ptb)


# ------------------------------------------------------------------------------------------ the controls


def perturbed_branch_weight(controls: Sequence[Any]) -> Callable[[int, int], float] | None:
    """``w(step, num_steps)`` of the controls that ask for a perturbed branch (``perturbed_branch = True``
    and a ``guidance_weight(step, num_steps)`` method), or ``None`` when none does.

    All of them perturb the same ``"perturbed"`` rows, so there is one ``w``: their ``scale`` schedules
    must agree. ``w`` at a step is 0 when every one of them is inactive there (e.g. ``u = 0``).
    """
    branch = [c for c in controls if getattr(c, "perturbed_branch", False)]
    if not branch:
        return None
    indexed = [c for c in branch if getattr(c.config, "branch", None) is not None]
    if indexed:
        raise ConfigError(
            f"{type(indexed[0]).__name__}(branch={indexed[0].config.branch}) acts on rows 'perturbed[i]' of a batch "
            "its caller builds (e.g. a head search); the pipelines build one perturbed branch",
            fix="drop branch= when passing the control to a pipeline",
        )
    scales = {repr(getattr(c.config, "scale", None)) for c in branch}
    if len(scales) > 1:
        raise ConfigError(
            f"{len(branch)} controls ask for the perturbed branch with different guidance scales ({', '.join(scales)})",
            fix="they share one perturbed branch and one w: give them the same scale= schedule",
        )

    def weight(step: int, num_steps: int) -> float:
        for c in branch:
            w = c.guidance_weight(step, num_steps)
            if w != 0:
                return float(w)
        return 0.0

    return weight


# ------------------------------------------------------------------------------------------ the wrapper


class PerturbedBranch:
    """Context manager: wrap ``transformer.forward`` so each call also runs the perturbed rows and returns
    the folded prediction (see the module doc). Restored on exit, also when the call raises.

    Args:
        transformer: the pipeline's transformer (SD3 or FLUX).
        controller: the :class:`~attnctl.controller.Controller` installed on it; its state gives the step
            and the batch roles of each call.
        weight: ``w(step, num_steps)``, e.g. from :func:`perturbed_branch_weight`.
        cfg_scale: ``cfg_scale(roles) -> s``: the scale the loop will apply to this call's conditional rows
            (1.0 without CFG).
    """

    def __init__(self, transformer: torch.nn.Module, controller: Any, weight: Callable[[int, int], float],
                 cfg_scale: Callable[[list[str]], float]) -> None:
        self.transformer = transformer
        self.controller = controller
        self.weight = weight
        self.cfg_scale = cfg_scale
        self._signature = inspect.signature(type(transformer).forward)
        self._had_own_forward = False
        self._saved_forward: Any = None
        self._original: Any = None
        self.calls = 0  # transformer calls that ran perturbed rows (for tests and logs)
        self._wrapper = self._forward  # one bound-method object, so __exit__ can recognise it

    def __enter__(self) -> PerturbedBranch:
        self._had_own_forward = "forward" in vars(self.transformer)
        self._saved_forward = vars(self.transformer).get("forward")
        self._original = self.transformer.forward  # may already be wrapped (offload hooks): keep the chain
        self.transformer.forward = self._wrapper
        return self

    def __exit__(self, *exc: object) -> None:
        # Only undo our own wrapper: diffusers' offload hooks may have replaced the forward meanwhile
        # (``maybe_free_model_hooks`` re-installs them at the end of a call).
        if vars(self.transformer).get("forward") is self._wrapper:
            if self._had_own_forward:
                self.transformer.forward = self._saved_forward
            else:
                del self.transformer.forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.controller.state
        roles = list(state.roles or [])
        if kwargs.get("skip_layers") is not None:  # SD3's skip-layer guidance pass: conditional rows only
            return self._with_roles(["cond"] * _batch_of(args, kwargs), args, kwargs)
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        w = self.weight(state.step, state.num_steps) if cond else 0.0
        if w == 0:
            return self._original(*args, **kwargs)
        bound = self._signature.bind_partial(None, *args, **kwargs).arguments
        bound.pop(next(iter(self._signature.parameters)))  # self
        bound.update(bound.pop("kwargs", {}))
        batch = bound["hidden_states"].shape[0]
        if len(roles) != batch:
            raise ConfigError(f"the controller knows {len(roles)} batch roles but the transformer got {batch} rows")
        idx = torch.tensor(cond, dtype=torch.long, device=bound["hidden_states"].device)
        for name in BATCHED_INPUTS:
            x = bound.get(name)
            if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == batch:
                bound[name] = torch.cat([x, x.index_select(0, idx.to(x.device))])
        result = self._with_roles(roles + ["perturbed"] * len(cond), (), bound)
        self.calls += 1
        sample = result[0] if isinstance(result, tuple) else result.sample
        eps, eps_ptb = sample[:batch], sample[batch:]
        s = float(self.cfg_scale(roles))
        eps = eps.index_copy(0, idx.to(eps.device), fold_into_cond(eps.index_select(0, idx), eps_ptb, s, w))
        if isinstance(result, tuple):
            return (eps, *result[1:])
        result.sample = eps
        return result

    def _with_roles(self, roles: list[str], args: tuple, kwargs: dict) -> Any:
        state = self.controller.state
        saved = state.roles
        state.roles = roles
        try:
            return self._original(*args, **kwargs)
        finally:
            state.roles = saved


def _batch_of(args: tuple, kwargs: dict) -> int:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return int(x.shape[0])
