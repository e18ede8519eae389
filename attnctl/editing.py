"""Editing a real image by a text change: the source branch replays the inversion, the target branch is steered.

:func:`edit` inverts the image under the source prompt (:func:`attnctl.invert`) and calls the pipeline once with
``[source prompt, target prompt]`` from the inverted noise, under :class:`EditBranches`, which wraps the transformer's
forward for the run:

- **source rows** (conditional and unconditional alike) return ``v^s = (z^s_{t+1} − z_t)/(σ_{t+1} − σ_t)``, with
  ``z^s`` the inversion path and ``z_t`` the loop's latent, so the loop's Euler step lands exactly on the path: the
  source branch reconstructs the image, and its attention at step ``t`` is the source image's. They are not run
  through the model at all in the step's call (only in the gradient pass, where their maps are the reference);
- **target rows**: at a guided step one gradient pass over ``[z^s_t, z_t]`` (stopping after the deepest selected
  site) gives the control's two losses; :meth:`~attnctl.controls.unify_edit.UnifyEdit.direction` balances their
  gradients and ``z_t`` moves to ``z'_t``. The step's call then runs the target rows on ``z'_t`` and returns
  ``v(z'_t) + (z'_t − z_t)/(σ_{t+1} − σ_t)``, so the loop's Euler step is the step from the moved latent; the same
  term on the conditional and unconditional rows leaves CFG's combination of them carrying it unchanged.

Later calls of a step (SD3's skip-layer pass, FLUX's true-CFG call for the negative prompt) get the same terms.

With :class:`~attnctl.controls.value_sharing.ValueSharing` in the run, a step whose sharing weight is above 0 runs
the source rows too, on their path latent ``z^s_t`` beside the target rows (in the step's call, its later calls and
its gradient pass), so the target rows' attention can read their values; the source rows' outputs are dropped.

With :class:`~attnctl.midpoint.FlowMatchMidpointScheduler` (RF-Solver's second-order step) the loop makes two calls a
step and the path holds the midpoints too. The first call of a step is the one above, with ``σ_{t+1}`` the midpoint.
The second call's update starts from the step's first latent, ``z_t + (σ_{t+1} − σ_t)·v``, so there the source rows
return ``(z^s_{t+1} − z^s_t)/(σ_{t+1} − σ_t)`` and the target rows carry the first call's move as
``(z'_t − z_t)/(σ_{t+1} − σ_t)``, both over the whole step: the step is then the midpoint step from ``z'_t``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .controls.unify_edit import UnifyEdit, differing_words
from .controls.value_sharing import ValueSharing
from .errors import ConfigError, LayoutError
from .forward_wrap import ForwardWrapper, image_rows, later_call, map_rows, sample_of, with_sample
from .inversion import (
    _how_made,
    acting_controller,
    check_path,
    check_steps_and_guidance,
    has_guidance_embedding,
    image_array,
    invert,
    text_length,
)
from .latent_guidance import StopForward, check_scheduler, frozen_weights
from .layout import absent_words, layout_for_pipeline
from .midpoint import is_midpoint, step_anchor
from .rf_inversion import RFInversion, toward_image
from .sites import family_of


class EditBranches(ForwardWrapper):
    """Context manager: the transformer's forward runs the source and target branches of an edit (module doc).

    Args:
        transformer: the pipeline's transformer (SD3 or FLUX).
        controller: the :class:`~attnctl.controller.Controller` installed on it.
        control: the :class:`~attnctl.controls.unify_edit.UnifyEdit` control, with its source path set.
        pipe: the pipeline (its scheduler gives the σ's).
    """

    def __init__(self, transformer: torch.nn.Module, controller: Any, control: UnifyEdit, pipe: Any) -> None:
        super().__init__(transformer)
        self.controller = controller
        self.control = control
        self.pipe = pipe
        self.sharing = next((c for c in controller.controls if isinstance(c, ValueSharing)), None)  # or None
        self._step_terms: tuple[Any, ...] | None = None  # step, z', shift, v^s, RF-Inversion's pull, sharing
        self._anchor: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # a step's start
        self.passes = 0  # gradient passes run (for tests and logs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.controller.state
        roles = list(state.roles or [])
        path = self._path(state.num_steps)
        step = state.step
        check_scheduler(self.pipe, "UnifyEdit")
        sigmas = self.pipe.scheduler.sigmas
        anchor = step_anchor(self.pipe.scheduler, step)  # the call whose latent this call's update starts from
        per_step = state.calls_per_step  # the schedules count denoising steps, under either scheduler
        sigma, sigma_next = float(sigmas[anchor]), float(sigmas[step + 1])
        share = self._sharing(path, step, per_step, state.num_steps)
        bound = self.bind(args, kwargs)
        hidden = bound["hidden_states"]
        batch = hidden.shape[0]
        if later_call(kwargs, roles) is not None:
            return self._later_call(bound, batch, step)
        self._step_terms = None
        cond, uncond = image_rows(roles, batch, "UnifyEdit")
        if len(cond) != 2:
            raise ConfigError(
                f"UnifyEdit runs a source and a target image in one batch, and this call has {len(cond)} images",
                fix="call pipe([source_prompt, target_prompt], latents=..., num_images_per_prompt=1), or use "
                    "attnctl.edit(pipe, image, source_prompt, target_prompt)")
        source_rows = sorted([cond[0], *uncond[:1]])
        target_rows = sorted([cond[1], *uncond[1:]])
        z_loop = hidden[cond[0]:cond[0] + 1]
        z = hidden[cond[1]:cond[1] + 1]
        if anchor == step:  # a step starts here: the target may move, and the step's base latents are these
            z_src = path[step].to(hidden.device, hidden.dtype)
            size = float(self.control.step_size(step // per_step, state.num_steps // per_step))
            z_new = self._descend(bound, batch, [cond[0], cond[1]], z_src, z, size * sigma, share) if size else z
            self._anchor = (step, z_loop.float(), z.float(), z_new.float())
            base_source, base_target, moved, z_run = z_loop.float(), z.float(), z_new.float(), z_new
        else:  # the midpoint call of a second-order step: the update starts from the anchor call's latents
            if self._anchor is None or self._anchor[0] != anchor:
                raise ConfigError(f"call {step} of the loop is a midpoint and its step's first call did not run",
                                  fix="run the pipeline's own loop from its first timestep")
            _, base_source, base_target, moved = self._anchor
            z_run = z
        shift = (moved - base_target) / (sigma_next - sigma)
        v_source = (path[step + 1].to(hidden.device, torch.float32) - base_source) / (sigma_next - sigma)
        pull = self._pull(anchor // per_step, state.num_steps // per_step, z_run, float(sigmas[step]), path[-1])
        result, v_target = self._run_target(bound, batch, target_rows, z_run, share and (source_rows, *share))
        out = self._assemble(v_target, batch, source_rows, target_rows, v_source, shift, pull)
        self._step_terms = (step, z_run, shift, v_source, pull, share)
        return with_sample(result, out)

    def _sharing(self, path: list[torch.Tensor], step: int, per_step: int, num_steps: int
                 ) -> tuple[torch.Tensor, float, int] | None:
        """Value sharing at this call: ``(z^s, w, denoising step)`` with ``z^s = path[step]`` the source rows'
        latent, or ``None`` when the run has no :class:`ValueSharing` or its weight is 0 at this step."""
        if self.sharing is None:
            return None
        weight = self.sharing.weight_at(step // per_step, num_steps // per_step)
        return (path[step], weight, step // per_step) if weight else None

    def _pull(self, step: int, num_steps: int, z: torch.Tensor, sigma: float, y0: torch.Tensor
              ) -> tuple[float, torch.Tensor, float, torch.Tensor] | None:
        """RF-Inversion's pull of the target rows toward the source image at this call (``η`` of denoising step
        ``step`` of ``num_steps``; the target's latent ``z`` and ``σ`` of this call), or ``None`` when ``η`` is 0
        here."""
        eta = self.control.source_eta
        value = 0.0 if eta is None else float(eta(step, num_steps))
        return (value, z, sigma, y0.to(z.device)) if value else None

    def _path(self, num_steps: int) -> list[torch.Tensor]:
        path = self.control.source_path
        if path is None:
            raise ConfigError("UnifyEdit has no source path to replay",
                              fix="use attnctl.edit(...), or invert the image before attaching the control: "
                                  "control.set_source(attnctl.invert(pipe, image, source_prompt, steps)), then "
                                  "attnctl.attach(pipe, [control])")
        if len(path) != num_steps + 1:
            raise ConfigError(f"the source path holds {len(path)} latents and this run's loop makes {num_steps} "
                              f"calls, which replay {num_steps + 1} (one latent per call and the image's)",
                              fix=self._length_fix(path, num_steps))
        made, solver = _how_made(path), "midpoint" if is_midpoint(self.pipe.scheduler) else "euler"
        if made is not None and made[0] != solver:  # the same length, other noise levels (4 Euler steps, 2 midpoint)
            raise ConfigError(f"the source path is a {made[1]}-step {made[0]} inversion, and this run takes {solver} "
                              "steps: the source branch would replay its latents at other noise levels",
                              fix=self._length_fix(path, num_steps))
        return path

    def _length_fix(self, path: list[torch.Tensor], calls: int) -> str:
        """The way out of a path whose length does not fit a run of ``calls`` calls: the num_inference_steps that
        replay it on this scheduler (``calls_per_step`` calls a step), or the steps to invert the image with."""
        per_step = self.controller.state.calls_per_step
        steps, odd = divmod(len(path) - 1, per_step)
        solver = "midpoint" if is_midpoint(self.pipe.scheduler) else "euler"
        invert_with = f"invert the image with num_inference_steps={calls // per_step} and this pipeline's scheduler"
        made = _how_made(path)  # known for a path attnctl.invert returned in this process
        if made is not None and made[0] != solver:
            return f"{invert_with} (the path is a {made[1]}-step {made[0]} inversion, and this run takes {solver} " \
                   "steps)"
        if steps < 1 or odd:
            return f"{invert_with} (a path of {len(path)} latents is no whole number of its steps of {per_step} calls)"
        return f"call the pipeline with num_inference_steps={steps}, the steps the path was inverted with, or " \
               + invert_with

    def _run_target(self, bound: dict, batch: int, rows: list[int], z_new: torch.Tensor,
                    source: tuple[list[int], torch.Tensor, float, int] | None = None) -> tuple[Any, torch.Tensor]:
        """The call on the target ``rows``, every one on the moved latent ``z_new``: the result and the target rows'
        prediction. With ``source = (rows, z^s, w, step)`` (value sharing) the source rows run too, on ``z^s``, and
        each target row reads the values of the source row of its role (in order: unconditional, conditional)."""
        state = self.controller.state
        sources = [] if source is None else list(source[0])
        run = sorted([*rows, *sources])
        idx = state.index(run, bound["hidden_states"].device)
        sub = map_rows(bound, batch, lambda x: x.index_select(0, idx.to(x.device)), "UnifyEdit")
        dtype = bound["hidden_states"].dtype
        device = bound["hidden_states"].device
        latents = [(source[1] if r in sources else z_new).to(device, dtype) for r in run]
        sub["hidden_states"] = torch.cat(latents)
        pairing = self._paired(run, rows, sources, source)  # the call's roles, before the subset renumbers them
        with self.controller.row_subset(run), pairing:
            result = self.call_original(**sub)
        if not sources:
            return result, sample_of(result)
        keep = state.index([run.index(r) for r in rows], idx.device)
        return result, sample_of(result).index_select(0, keep.to(sample_of(result).device))

    def _paired(self, run: list[int], targets: list[int], sources: list[int],
                source: tuple[Any, ...] | None) -> Any:
        """The value-sharing control's pairing for a forward of the batch rows ``run`` (positions in ``run``), or a
        context that does nothing without sharing."""
        if source is None:
            return contextlib.nullcontext()
        roles = self.controller.state.roles or ["cond"] * (max(run) + 1)
        if [roles[t] for t in targets] != [roles[s] for s in sources]:
            raise ConfigError(f"value sharing pairs target rows {targets} with source rows {sources}, and their roles "
                              f"differ ({[roles[t] for t in targets]} vs {[roles[s] for s in sources]})",
                              fix="run the edit through attnctl.edit(...), which lays out the two branches")
        return self.sharing.pairing([run.index(t) for t in targets], [run.index(s) for s in sources], source[2],
                                    source[3])

    @staticmethod
    def _assemble(v_target: torch.Tensor, batch: int, source_rows: list[int], target_rows: list[int],
                  v_source: torch.Tensor, shift: torch.Tensor,
                  pull: tuple[float, torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
        """The full batch's prediction: ``v^s`` on the source rows, ``v(z') + shift`` on the target rows (with
        ``v(z')`` pulled toward the source image first when RF-Inversion's ``pull`` is on)."""
        out = v_target.new_empty((batch, *v_target.shape[1:]))
        if pull is not None:
            eta, z, sigma, y0 = pull
            v_target = toward_image(v_target, z, y0, sigma, eta)
        out[target_rows] = v_target + shift.to(v_target.dtype)
        out[source_rows] = v_source.to(v_target.dtype).expand(len(source_rows), *v_source.shape[1:])
        return out

    def _descend(self, bound: dict, batch: int, rows: list[int], z_src: torch.Tensor, z: torch.Tensor,
                 size: float, share: tuple[torch.Tensor, float, int] | None = None) -> torch.Tensor:
        """``iterations`` balanced gradient steps on the target latent ``z`` (the source's ``z_src`` fixed); with
        value ``share`` the target reads the source's values in the pass too, as in the step's call."""
        if torch.is_inference_mode_enabled():
            raise ConfigError("UnifyEdit needs gradients of the latents, and the pipeline runs under "
                              "torch.inference_mode()", fix="call it under torch.no_grad() (diffusers' default)")
        idx = self.controller.state.index(rows, z.device)
        sub = map_rows(bound, batch, lambda x: x.index_select(0, idx.to(x.device)), "UnifyEdit")
        with frozen_weights(self.transformer):  # the latent's gradient only: no activations kept for the weights
            for _ in range(int(self.control.config.iterations)):
                # each loss is differentiated on its own (the gradient pass keeps compiled graphs differentiable twice)
                with torch.enable_grad(), self.controller.gradient_pass(rows), self._gradient_pairing(share):
                    zz = z.detach().requires_grad_(True)
                    sub["hidden_states"] = torch.cat([z_src.detach(), zz])
                    with contextlib.suppress(StopForward):  # raised after the deepest site the losses read
                        self.call_original(**sub)
                    losses = self.control.edit_losses()
                    terms = [n for n, loss in losses.items() if loss is not None and loss.requires_grad]
                    grads = {n: torch.autograd.grad(losses[n], zz, retain_graph=i + 1 < len(terms))[0]
                             for i, n in enumerate(terms)}
                self.passes += 1
                direction = self.control.direction(losses, grads, self._latent_mask(z)) if grads else None
                if direction is None:
                    return z
                z = (z.float() - size * direction).to(z.dtype).detach()
        return z

    def _gradient_pairing(self, share: tuple[torch.Tensor, float, int] | None) -> Any:
        """In the gradient pass over ``[source, target]``, row 1 reads row 0's values when sharing."""
        if share is None:
            return contextlib.nullcontext()
        return self.sharing.pairing([1], [0], share[1], share[2])

    def _latent_mask(self, z: torch.Tensor) -> torch.Tensor | None:
        """The control's last edit mask (token grid ``h×w``) on the latent ``z``: FLUX's packed latent has one row
        per token; SD3's ``(C, H, W)`` latent has ``patch × patch`` pixels per token."""
        mask = self.control.mask
        if mask is None:
            return None
        m = mask.to(z.device, torch.float32)
        if z.ndim == 3:  # FLUX: (1, h·w, C)
            return m.reshape(1, -1, 1)
        rows, cols = z.shape[-2] // m.shape[0], z.shape[-1] // m.shape[1]
        return m.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[None, None]

    def _later_call(self, bound: dict, batch: int, step: int) -> Any:
        """SD3's skip-layer pass or FLUX's negative-prompt call: rows ``[source, target]``, given the step's terms."""
        if self._step_terms is None or self._step_terms[0] != step:
            raise ConfigError(f"a later call of step {step} came before the step's batched call",
                              fix="run the pipeline's own loop; UnifyEdit follows the diffusers call order")
        if batch != 2:
            raise ConfigError(f"a later call of step {step} has {batch} rows, and an edit has two images",
                              fix="call the pipeline with [source_prompt, target_prompt] and one image each")
        _, z_new, shift, v_source, pull, share = self._step_terms
        result, v_target = self._run_target(bound, batch, [1], z_new, share and ([0], *share))
        return with_sample(result, self._assemble(v_target, batch, [0], [1], v_source, shift, pull))


@dataclass
class EditResult:
    """What :func:`edit` returns: the edited image, the source branch's reconstruction, and the run's record."""

    edited: Any
    source: Any
    path: list[torch.Tensor]
    control: UnifyEdit


def check_words(control: UnifyEdit, source_prompt: str, target_prompt: str) -> None:
    """The words the edit needs, checked against the prompts' text before anything runs: edit words (default: the
    target's words that differ) in the target prompt, and, where the losses need a mask without a box, mask words
    (default: the source's words that differ) in the source prompt."""
    cfg = control.config
    src, tgt = differing_words(source_prompt, target_prompt)
    if cfg.edit_words is None and not tgt and not src:
        raise ConfigError(f"the target prompt {target_prompt!r} is the source prompt: there is nothing to edit",
                          fix="change the words of the target prompt, or name UnifyEdit(edit_words=[...], "
                              "mask_words=[...]) (or box=[...] for the mask)")
    if cfg.ca_weight > 0 and cfg.edit_words is None and not tgt:
        raise ConfigError(f"the target prompt {target_prompt!r} adds no word to the source {source_prompt!r} for the "
                          "edit to draw", fix="name the target's words to draw in edit_words=[...]")
    needs_mask = (cfg.ca_weight > 0 or cfg.sa_region != "all") and cfg.box is None
    if needs_mask and cfg.mask_words is None and not src:
        raise ConfigError(f"the target prompt {target_prompt!r} replaces no word of the source {source_prompt!r}, "
                          "where the edit's mask comes from", fix="name the source's words of the region to edit in "
                                                                 "mask_words=[...], or give box=[x0, y0, x1, y1]")
    for field, words, prompt in (("edit_words", (cfg.edit_words or tgt) if cfg.ca_weight > 0 else [], target_prompt),
                                 ("mask_words", (cfg.mask_words or src) if needs_mask else [], source_prompt)):
        absent = absent_words(words, prompt)
        if absent:
            raise LayoutError(f"UnifyEdit: {field} {absent} are not words of the prompt {prompt!r}",
                              fix=f"name words of the {'target' if field == 'edit_words' else 'source'} prompt in "
                                  f"{field}")


def check_not_attached(pipe: Any) -> None:
    """Refuse an edit of a pipeline another attnctl controller is on: the edit attaches its own control, and the
    other's controls would act on the inversion too. Checked before the inversion, which takes as long as the edit."""
    ctl = acting_controller(pipe)
    if ctl is None or not (ctl.controls or ctl.following):
        return
    names = ", ".join(type(c).__name__ for c in ctl.controls) or "no controls"
    raise ConfigError(f"edit() attaches its own UnifyEdit control, and another attnctl controller ({names}) is "
                      "already attached to this pipeline; its controls would act on the inversion and the edit too",
                      fix="call attnctl.edit outside the attnctl.attach with-block (or after ctl.restore()); an "
                          "edit takes RF-Inversion and value sharing as rf=... and share=...")


def edit(pipe: Any, image: Any, source_prompt: str, target_prompt: str, num_inference_steps: int = 28, *,
         control: UnifyEdit | None = None, guidance_scale: float | None = None, path: list[torch.Tensor] | None = None,
         rf: RFInversion | None = None, share: ValueSharing | None = None, **pipe_kwargs: Any) -> EditResult:
    """Edit a real ``image`` (PIL, file path or ``H×W×3`` uint8 array) described by ``source_prompt`` into what
    ``target_prompt`` says, with UnifyEdit (``control``, default ``UnifyEdit()``; :mod:`attnctl.controls.unify_edit`).

    ``guidance_scale`` goes to the pipeline (default: the pipeline's own; CFG on the target branch is what makes it
    follow the new words, and the self-attention term holds the structure the inverted flow had). On FLUX.1-dev it
    is the guidance embedding, used for the inversion too. Other keyword arguments go to the pipeline call
    (``output_type``, ``max_sequence_length``, ...); ``latents``, ``height`` and ``width`` come from the image.

    ``path`` is the image's inversion under ``source_prompt`` when it is already at hand (the ``path`` of an earlier
    :class:`EditResult` with the same image, prompt, steps, guidance and ``rf.gamma`` / ``rf.seed``), so several
    edits of one image invert it once. A path given is used as it is: ``rf.gamma`` and ``rf.seed`` only shape an
    inversion ``edit`` makes itself.

    ``rf`` adds RF-Inversion's controllers (:mod:`attnctl.rf_inversion`): the inversion is pulled toward a noise
    sample by ``rf.gamma``, and the target branch toward the source image by the schedule ``rf.eta``. With
    ``control=UnifyEdit(scale=0)`` that is RF-Inversion alone; with the default control both methods act.

    ``share`` adds RF-Solver-Edit's feature sharing (:mod:`attnctl.controls.value_sharing`): at late sites during the
    first steps the target branch attends with the source branch's values. RF-Solver-Edit itself is
    ``control=UnifyEdit(scale=0), share=ValueSharing()`` on a pipeline with the midpoint scheduler."""
    for name, text in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{name} must be a non-empty string, got {text!r}",
                              fix="describe the image (source_prompt) and the edit (target_prompt) in words")
    for name in ("latents", "height", "width", "prompt", "num_images_per_prompt"):
        if name in pipe_kwargs:
            raise ConfigError(f"edit() sets {name} itself", fix=f"drop {name}=... from the call")
    for name in ("sigmas", "timesteps", "mu"):  # the edit would leave the noise levels the image was inverted at
        if name in pipe_kwargs:
            raise ConfigError(f"edit() inverts the image on the pipeline's own noise grid for num_inference_steps, so "
                              f"{name}=... would run the edit at other noise levels than its inverted path",
                              fix=f"drop {name}=... and choose the grid with num_inference_steps (and the scheduler's "
                                  "shift)")
    check_steps_and_guidance(num_inference_steps, guidance_scale, "guidance_scale")
    control = UnifyEdit() if control is None else control
    if not isinstance(control, UnifyEdit):
        raise ConfigError(f"edit() takes a UnifyEdit control, got {type(control).__name__}")
    check_not_attached(pipe)  # before the inversion, as the words below
    check_words(control, source_prompt, target_prompt)  # before the inversion, which takes as long as the edit
    arr = image_array(image)
    height, width = arr.shape[:2]
    length = text_length(pipe, pipe_kwargs.pop("max_sequence_length", None))
    if guidance_scale is not None:
        pipe_kwargs["guidance_scale"] = guidance_scale
    flux_guidance = guidance_scale if has_guidance_embedding(pipe) else None
    if rf is not None and not isinstance(rf, RFInversion):
        raise ConfigError(f"rf takes RF-Inversion's settings, got {type(rf).__name__}",
                          fix="pass rf=attnctl.RFInversion(gamma=..., eta=...), or leave it out")
    if share is not None and not isinstance(share, ValueSharing):
        raise ConfigError(f"share takes value-sharing settings, got {type(share).__name__}",
                          fix="pass share=attnctl.ValueSharing(weight=..., sites=...), or leave it out")
    if share is not None and share.canonical(num_inference_steps) is None:
        warnings.warn(f"value sharing shares nothing in this edit: its weight {share.config.weight} is 0 at every one "
                      f"of the {num_inference_steps} steps; widen its window (e.g. weight='window(1, 0, 0.15)') or "
                      "leave share out", UserWarning, stacklevel=2)
    gamma, seed = (rf.gamma, rf.seed) if rf is not None else (0.0, 0)
    text_len = length + (int(getattr(pipe, "tokenizer_max_length", 77)) if family_of(pipe.transformer) == "sd3"
                         else 0)  # SD3's text tokens: CLIP's, then T5's
    control.check_layouts(*(layout_for_pipeline(pipe, text, text_len, (1, 1))
                            for text in (source_prompt, target_prompt)))  # a word cut off: before the inversion
    if path is not None:
        check_path(pipe, path, arr, num_inference_steps)
    if path is None:
        path = invert(pipe, arr, source_prompt, num_inference_steps, guidance=flux_guidance,
                      max_sequence_length=length, gamma=gamma, seed=seed)
    control.set_source(path, eta=rf.eta if rf is not None else None)
    from .controller import attach

    with attach(pipe, [control] if share is None else [control, share]):
        out = pipe([source_prompt, target_prompt], latents=torch.cat([path[0], path[0]]),
                   num_inference_steps=num_inference_steps, height=height, width=width, max_sequence_length=length,
                   **pipe_kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    return EditResult(edited=images[1], source=images[0], path=path, control=control)
