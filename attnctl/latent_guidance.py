"""Latent guidance: a gradient step on the latents at the start of a step, under the unchanged diffusers loop.

A control with a loss on the attention maps (:class:`~attnctl.controls.layout_guidance.LayoutGuidance`) moves the
latent ``z`` of every image before the step's prediction, as layout guidance does on Stable Diffusion::

    g  = ∇_z L(z)                       a forward of the conditional rows that records the control's maps
    z' = z − η_t · σ_t · g / rms(g)      per image, ``iterations`` times

``η_t`` is the control's schedule; ``σ_t`` scales the step with the noise level, as the flow models' sampler
does; dividing by the root mean square of ``g`` makes ``η`` a step in units of the latent's scale, whatever the
loss's size. The forward stops after the deepest site whose maps enter the loss, so the backward covers that
prefix of the model only.

The loop is not rewritten: the transformer's forward is wrapped. The step's call runs on ``z'`` (its conditional and
unconditional rows alike) and returns ``v' = v(z') + (z' − z) / (σ_{t+1} − σ_t)``. The flow-matching Euler step of
the loop, ``z + (σ_{t+1} − σ_t)·v'``, is then exactly ``z' + (σ_{t+1} − σ_t)·v(z')``: the step taken from the guided
latent. Because the same term is added to every prediction of an image, the loop's CFG line
``(1 − s)·v_u + s·v_c`` carries it unchanged for any ``s``; the later calls of a step (FLUX's true-CFG call for the
negative prompt, SD3's skip-layer pass) run on ``z'`` and get the same term.

On FLUX.1 Kontext the packed latent also carries the input image's tokens after the generated ones; they are the
condition of the edit, so only the generated tokens move (the root mean square is theirs) and the term is zero on
the others.

Under :class:`~attnctl.midpoint.FlowMatchMidpointScheduler` (RF-Solver's second-order step, two calls a step) the
move is made at a step's first call, with ``σ_{t+1}`` the midpoint. The second call's update starts from the step's
first latent, ``z + (σ_{t+1} − σ_t)·v``, so that call returns ``v(z_m) + (z' − z)/(σ_{t+1} − σ_t)`` over the whole
step: the midpoint step taken from ``z'``. Any other scheduler is refused, as is stochastic sampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import ConfigError
from .forward_wrap import (
    BATCHED_LISTS,
    ForwardWrapper,
    batch_of,
    image_rows,
    later_call,
    map_rows,
    sample_of,
    with_sample,
)
from .midpoint import step_anchor

FLOW_STEP_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchMidpointScheduler")
"""Schedulers whose update is ``z_a + (σ_{t+1} − σ_a)·v`` from a known earlier latent ``z_a`` (the call's own for
Euler; the step's first call's at the midpoint scheduler's second call), so a moved latent can be passed through
the prediction."""

_TINY = 1e-12


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the controller after the deepest site a gradient pass needs; the pass catches it."""


def check_scheduler(pipe: Any, who: str) -> None:
    """Refuse a pipeline whose scheduler step is neither the flow-matching Euler step nor attnctl's midpoint step
    (:class:`~attnctl.midpoint.FlowMatchMidpointScheduler`; see the module doc), or that samples stochastically or
    runs its grid from the image up to the noise (``invert_sigmas``)."""
    sched = getattr(pipe, "scheduler", None)
    name = type(sched).__name__
    if name not in FLOW_STEP_SCHEDULERS:
        raise ConfigError(
            f"{who} moves the latents between steps through the loop's Euler or midpoint step, and this pipeline's "
            f"scheduler is {name}",
            fix="use the FlowMatchEulerDiscreteScheduler (the SD3 and FLUX default) or "
                "attnctl.FlowMatchMidpointScheduler (RF-Solver's second-order step): "
                "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)")
    if getattr(sched.config, "stochastic_sampling", False):
        raise ConfigError(f"{who}: the scheduler samples stochastically, so its step is not the Euler step",
                          fix="set stochastic_sampling=False in the scheduler's config")
    if getattr(sched.config, "invert_sigmas", False):
        raise ConfigError(f"{who} follows the pipeline's noise grid from the noise (σ = 1) down to the image (σ = 0), "
                          "and this scheduler has invert_sigmas=True, which runs the grid the other way",
                          fix="set invert_sigmas=False: pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config("
                              "pipe.scheduler.config, invert_sigmas=False)")


@contextlib.contextmanager
def frozen_weights(*modules: torch.nn.Module | None) -> Iterator[None]:
    """The modules' parameters do not require grad inside the block; each parameter's own flag comes back after,
    also when the block raises. The gradient pass wants the latents' gradient only: weights that require grad (as
    ``from_pretrained`` leaves them) make autograd keep activations for weight gradients nobody reads."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


CONTROLNET_ROWS = ("controlnet_cond", "controlnet_mode")
"""ControlNet inputs beside the transformer's (:data:`~attnctl.forward_wrap.BATCHED_INPUTS`) with one entry per
batch row (a list of them under a multi-ControlNet)."""


class ControlNetInputs(ForwardWrapper):
    """Wraps the pipeline's ControlNet while latent guidance runs: records the inputs of its last call (and passes
    the call on), so the guidance can run it again on the moved latent. The diffusers ControlNet loops call the
    ControlNet on the step's latent just before the transformer, with the same latent tensor."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__(controlnet)
        self.last: dict[str, Any] | None = None

    def __exit__(self, *exc: object) -> None:
        self.last = None  # (its tensors are the last step's)
        super().__exit__(*exc)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self.bind(args, kwargs)
        return self.call_original(*args, **kwargs)

    def residuals(self, inputs: dict[str, Any], hidden: torch.Tensor, transformer_kwargs: dict[str, Any],
                  rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
        """The ControlNet call ``inputs`` run on ``hidden`` (with ``rows`` applied to its per-row inputs first), as
        the residual arguments of the transformer call ``transformer_kwargs`` (SD3: ``block_controlnet_hidden_states``;
        FLUX: ``controlnet_block_samples`` and ``controlnet_single_block_samples``)."""
        kwargs = dict(inputs, return_dict=False)
        if rows is not None:
            batch = inputs["hidden_states"].shape[0]
            kwargs = map_rows(kwargs, batch, rows, "latent guidance")
            for name in CONTROLNET_ROWS:
                x = kwargs.get(name)
                if isinstance(x, list | tuple):
                    kwargs[name] = [rows(t) if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == batch else t
                                    for t in x]
                elif isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch:
                    kwargs[name] = rows(x)
        kwargs["hidden_states"] = hidden
        out = self.call_original(**kwargs)
        if "block_controlnet_hidden_states" in transformer_kwargs:
            return {"block_controlnet_hidden_states": out[0]}
        return {"controlnet_block_samples": out[0], "controlnet_single_block_samples": out[1]}


def rms_step(z: torch.Tensor, grad: torch.Tensor, size: float) -> torch.Tensor:
    """``z − size · grad / rms(grad)``, the root mean square taken per image (row), in float32."""
    g = grad.float()
    rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(_TINY).view(-1, *[1] * (g.ndim - 1))
    return (z.float() - size * g / rms).to(z.dtype)


class LatentGuidance(ForwardWrapper):
    """Context manager: wrap ``transformer.forward`` so the first call of a step where the control is active moves
    the latents down the control's loss first (see the module doc). Restored on exit, also when the call raises.

    Args:
        transformer: the pipeline's transformer (SD3 or FLUX).
        controller: the :class:`~attnctl.controller.Controller` installed on it (step, roles, σ of each call).
        control: the control with the loss: ``step_size(step, num_steps)``, ``iterations`` and ``latent_loss()``.
        pipe: the pipeline (its scheduler gives the σ's; it is read at every step, so a scheduler swapped between
            calls is seen and checked). A ControlNet pipeline's ControlNet is wrapped too
            (:class:`ControlNetInputs`): the gradient pass and the step's call run it on the moved latent.
    """

    def __init__(self, transformer: torch.nn.Module, controller: Any, control: Any, pipe: Any) -> None:
        super().__init__(transformer)
        self.controller = controller
        self.control = control
        self.pipe = pipe
        controlnet = getattr(pipe, "controlnet", None)
        self._controlnet = ControlNetInputs(controlnet) if isinstance(controlnet, torch.nn.Module) else None
        self._moved: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, z', shift) of the step's call
        self._moved_residuals: dict[str, Any] | None = None  # the ControlNet's residuals at z' for the later calls
        self._step_controlnet: dict[str, Any] | None = None  # the ControlNet inputs of the step being guided
        self._start: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (call, z, z') of a step's first call
        self.passes = 0  # gradient passes run (for tests and logs)

    def __enter__(self):
        super().__enter__()
        if self._controlnet is not None:
            self._controlnet.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._controlnet is not None:
            self._controlnet.__exit__(*exc)
        super().__exit__(*exc)

    def ensure(self) -> None:
        super().ensure()
        if self._controlnet is not None:
            self._controlnet.ensure()

    def _controlnet_inputs(self, bound: dict) -> dict[str, Any] | None:
        """The inputs of this step's ControlNet call (on the same latent as this transformer call), or ``None`` when
        the call has no ControlNet residuals. Residuals from anywhere else cannot be made again at the moved latent,
        which the step must be taken from: refused."""
        if not any(bound.get(name) is not None for name in BATCHED_LISTS):
            return None
        last = None if self._controlnet is None else self._controlnet.last
        hidden = bound["hidden_states"]
        seen = last is not None and isinstance(last.get("hidden_states"), torch.Tensor) and (
            last["hidden_states"] is hidden or (last["hidden_states"].shape == hidden.shape
                                                and torch.equal(last["hidden_states"], hidden)))
        if not seen:
            raise ConfigError(
                f"{type(self.control).__name__} moves the latent before the step's prediction, and this transformer "
                "call has ControlNet residuals that the pipeline's ControlNet (pipe.controlnet) did not compute from "
                "this call's latent, so they cannot be computed again at the moved latent",
                fix="run a diffusers ControlNet pipeline's own loop (it calls pipe.controlnet on the step's latent), "
                    "or run the guidance without ControlNet residuals")
        self._controlnet.last = None  # used once: the next step's call records its own
        return last

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.controller.state
        roles = list(state.roles or [])
        if later_call(kwargs, roles) is not None:  # SD3's skip-layer pass, FLUX's negative call: the step's z', term
            return self._later_call(args, kwargs, state.step)
        self._moved, self._moved_residuals = None, None
        check_scheduler(self.pipe, type(self.control).__name__)
        anchor = step_anchor(self.pipe.scheduler, state.step)
        if anchor != state.step:  # a midpoint call: carry its step's move, if there was one
            return self._midpoint_call(args, kwargs, state.step)
        self._start = None
        size = float(self.control.step_size(*state.schedule_step))
        sigmas = self._sigmas(state.step) if size and "cond" in roles else None
        if sigmas is None:  # no guidance at this step
            return self.call_original(*args, **kwargs)
        sigma, sigma_next = sigmas
        bound = self.bind(args, kwargs)
        hidden = bound["hidden_states"]
        cond, _ = image_rows(roles, hidden.shape[0], "latent guidance")
        idx = state.index(cond, hidden.device)
        z = hidden.index_select(0, idx)
        controlnet = self._step_controlnet = self._controlnet_inputs(bound)  # (read by _descend)
        try:
            z_new = self._descend(bound, cond, idx, z, size * sigma)
        finally:
            self._step_controlnet = None
        self._start = (state.step, z.float(), z_new.float())
        return self._run_moved(bound, roles, z_new, (z_new.float() - z.float()) / (sigma_next - sigma), state.step,
                               controlnet)

    def _run_moved(self, bound: dict, roles: list, z_run: torch.Tensor, shift: torch.Tensor, step: int,
                   controlnet: dict[str, Any] | None = None) -> Any:
        """The call with every image's rows (conditional and unconditional) on ``z_run`` and ``shift`` added to
        their predictions; kept for the step's later calls. ``controlnet``: the step's ControlNet inputs, run again
        on the moved rows for the call's residuals."""
        state = self.controller.state
        hidden = bound["hidden_states"]
        cond, uncond = image_rows(roles, hidden.shape[0], "latent guidance")
        moved = hidden.clone()
        for rows in (cond, uncond):
            if rows:
                moved.index_copy_(0, state.index(rows, hidden.device), z_run.to(hidden.dtype))
        bound["hidden_states"] = moved
        if controlnet is not None:
            self._moved_residuals = self._controlnet.residuals(controlnet, moved, bound)
            bound.update(self._moved_residuals)
        result = self.call_original(**bound)
        out = sample_of(result)
        for rows in (cond, uncond):
            if rows:
                out = out.index_add(0, state.index(rows, out.device), shift.to(out.dtype))
        self._moved = (step, z_run, shift)
        return with_sample(result, out)

    def _midpoint_call(self, args: tuple, kwargs: dict, step: int) -> Any:
        """The midpoint call of a second-order step: the scheduler's update starts from the step's first latent
        ``z``, so a move ``z → z'`` made there is carried as ``(z' − z)/(σ_{t+1} − σ_t)`` over the whole step."""
        start = self._start
        if start is None or start[0] != step - 1:  # the step moved nothing
            return self.call_original(*args, **kwargs)
        _, z, z_new = start
        sigmas = self.pipe.scheduler.sigmas
        shift = (z_new - z) / (float(sigmas[step + 1]) - float(sigmas[step - 1]))
        bound = self.bind(args, kwargs)
        roles = list(self.controller.state.roles or [])
        cond, _ = image_rows(roles, bound["hidden_states"].shape[0], "latent guidance")
        z_run = bound["hidden_states"].index_select(0, self.controller.state.index(cond, bound["hidden_states"].device))
        return self._run_moved(bound, roles, z_run, shift, step)

    def _sigmas(self, step: int) -> tuple[float, float] | None:
        """``(σ_t, σ_{t+1})`` of ``step`` from the pipeline's scheduler (the next grid entry: the midpoint under the
        midpoint scheduler), or ``None`` when the step moves nothing (``σ_{t+1} = σ_t``)."""
        sigmas = self.pipe.scheduler.sigmas
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        return None if sigma_next == sigma else (sigma, sigma_next)

    def _descend(self, bound: dict, cond: list[int], idx: torch.Tensor, z: torch.Tensor, size: float) -> torch.Tensor:
        """``iterations`` gradient steps of the control's loss on the latents ``z`` of the conditional rows ``cond``
        (``idx``: the same rows as an index tensor). Under a ControlNet pipeline each pass runs the ControlNet on its
        latent too (the step's ControlNet inputs, :meth:`_controlnet_inputs`). The weights do not require grad during
        the passes (:func:`frozen_weights`)."""
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                f"{type(self.control).__name__} needs gradients of the latents, and the pipeline runs under "
                "torch.inference_mode()", fix="call the pipeline under torch.no_grad() (diffusers' default) instead")
        batch = bound["hidden_states"].shape[0]
        def select(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, idx.to(x.device))

        sub = map_rows(bound, batch, select, type(self.control).__name__)
        n = self._generated_tokens(z)
        controlnet = self._step_controlnet
        begin_pass = getattr(self.control, "begin_pass", None)
        weights = (self.transformer, None if self._controlnet is None else self._controlnet.transformer)
        with frozen_weights(*weights):  # the latent's gradient only: no activations kept for the weights
            for _ in range(int(self.control.config.iterations)):
                with torch.enable_grad(), self.controller.gradient_pass(cond):
                    if begin_pass is not None:
                        begin_pass()
                    zz = z.detach().requires_grad_(True)
                    sub["hidden_states"] = zz
                    if controlnet is not None:
                        sub.update(self._controlnet.residuals(controlnet, zz, sub, rows=select))
                    with contextlib.suppress(StopForward):  # raised after the deepest site the loss reads
                        self.call_original(**sub)
                    loss = self.control.latent_loss()
                    if loss is None or not loss.requires_grad:  # nothing to guide (no word of the prompt is boxed)
                        return z
                    (grad,) = torch.autograd.grad(loss.sum(), zz)
                self.passes += 1
                if n is None:
                    z = rms_step(z, grad, size).detach()
                else:  # FLUX Kontext: its input image's tokens (after the generated ones) are a condition, not moved
                    z = torch.cat([rms_step(z[:, :n], grad[:, :n], size), z[:, n:]], dim=1).detach()
        return z

    def _generated_tokens(self, z: torch.Tensor) -> int | None:
        """How many of the packed latent's tokens are the generated image's when a reference image's follow them
        (FLUX Kontext); ``None`` when every token is generated."""
        layout = self.controller.state.layout
        if layout is None or not layout.reference_tokens or z.ndim != 3:
            return None
        if z.shape[1] != layout.n_image + layout.reference_tokens:
            raise ConfigError(f"latent guidance: the latents have {z.shape[1]} tokens and the run's layout "
                              f"{layout.n_image} generated + {layout.reference_tokens} reference ones",
                              fix="run the pipeline's own loop (the layout is read from its image positions)")
        return layout.n_image

    def _later_call(self, args: tuple, kwargs: dict, step: int) -> Any:
        if self._moved is None or self._moved[0] != step:
            return self.call_original(*args, **kwargs)
        _, z_new, shift = self._moved
        if batch_of(args, kwargs) != z_new.shape[0]:
            raise ConfigError(
                f"latent guidance moved {z_new.shape[0]} images at step {step}, and a later call of that step has "
                f"{batch_of(args, kwargs)} rows", fix="run the later calls of a step on the same images")
        bound = self.bind(args, kwargs)
        bound["hidden_states"] = z_new.to(bound["hidden_states"].dtype)
        if self._moved_residuals is not None and any(bound.get(name) is not None for name in BATCHED_LISTS):
            bound.update(self._moved_residuals)  # FLUX's negative call reuses the step's residuals: those at z'
        result = self.call_original(**bound)
        out = sample_of(result)
        return with_sample(result, out + shift.to(out.dtype))
