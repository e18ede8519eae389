"""Rectified-flow inversion: from a real image to the noise that the pipeline turns back into it.

SD3 and FLUX sample by integrating the flow ``dz/dσ = v(z, σ)`` from noise (``σ = 1``) to the image (``σ = 0``)
with Euler steps over the scheduler's ``σ_0 > σ_1 > … > σ_n = 0``. Inversion runs the same grid the other way, from
the encoded image ``z(σ_n) = E(x)`` up to ``σ_0``, with the velocity taken at the point already reached::

    z(σ_i) = z(σ_{i+1}) + (σ_i − σ_{i+1}) · v(z(σ_{i+1}), σ_{i+1})        i = n−1, …, 0

(plain Euler inversion, as RF-Inversion and RF-Solver start from). It is exact when ``v`` is constant along the
path and close when the steps are small; :func:`invert` returns the whole path, so an editing method can replay the
source branch exactly (``path[k]`` is the latent the pipeline's call ``k`` sees) while a target branch starts from
``path[0]``. ``pipe(prompt, latents=path[0], ...)`` with the same steps and no guidance reconstructs the image.
A pipeline whose scheduler is :class:`~attnctl.midpoint.FlowMatchMidpointScheduler` is inverted with RF-Solver's
midpoint rule instead (:func:`midpoint_invert`), which is second order in the step both ways. ``invert(...,
gamma=γ)`` is RF-Inversion's controlled inversion (:mod:`attnctl.rf_inversion`), pulled toward a Gaussian sample.

This is the first piece of text-driven editing of real images (UnifyEdit, ``../shared/METHODS.md`` §6).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .latent_guidance import check_scheduler
from .midpoint import is_midpoint
from .processors.base import AttnCtlProcessor
from .rf_inversion import RFInversion, noise_sample, toward_noise
from .sites import family_of, uncompiled
from .sizes import check_image_size

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
"""``v(z, σ)``: the model's flow prediction at the latent ``z`` and noise level ``σ``."""


_HOW_MADE: dict[int, tuple[weakref.ref, tuple[str, int]]] = {}
"""How :func:`invert` made each path it returned — ``(solver, steps)`` — by the ``id`` of the path's first latent
(with a weak reference to it: an entry goes when the tensor does), for :func:`check_path`. The path itself stays a
plain list (``torch.save`` / ``torch.load(weights_only=True)`` keep it as it is); a path loaded from a file is not
known here and is checked by its length and last latent."""


def _remember(path: list[torch.Tensor], how: tuple[str, int]) -> None:
    first = path[0]
    _HOW_MADE[id(first)] = (weakref.ref(first), how)
    weakref.finalize(first, _HOW_MADE.pop, id(first), None)


def _how_made(path: Any) -> tuple[str, int] | None:
    first = path[0] if len(path) and isinstance(path[0], torch.Tensor) else None
    entry = _HOW_MADE.get(id(first)) if first is not None else None
    return entry[1] if entry is not None and entry[0]() is first else None


def euler_invert(velocity: Velocity, z0: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The Euler inversion path of ``z0`` over the decreasing ``sigmas`` (``σ_0 … σ_n``, ``σ_n = 0``): a list of
    ``n + 1`` latents, ``path[i]`` at ``σ_i`` (so ``path[n]`` is ``z0`` and ``path[0]`` the noise)."""
    s = [float(x) for x in sigmas]
    if len(s) < 2 or any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise ConfigError(f"inversion needs a decreasing noise grid σ_0 > … > σ_n, got {s}",
                          fix="pass the scheduler's sigmas after set_timesteps")
    path = [z0]
    z = z0
    for i in range(len(s) - 2, -1, -1):
        z = z + (s[i] - s[i + 1]) * velocity(z, s[i + 1])
        path.append(z)
    return path[::-1]


def midpoint_invert(velocity: Velocity, z0: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The midpoint (RF-Solver) inversion path of ``z0`` over the interleaved grid ``σ_0, m_0, σ_1, …, σ_n`` of
    :class:`~attnctl.midpoint.FlowMatchMidpointScheduler`: each step up from ``σ_{i+1}`` to ``σ_i`` takes the
    velocity at the midpoint ``m_i`` reached by half an Euler step,

        z_m = z_{i+1} + (m_i − σ_{i+1}) · v(z_{i+1}, σ_{i+1}),    z_i = z_{i+1} + (σ_i − σ_{i+1}) · v(z_m, m_i).

    Returns ``2n + 1`` latents, one per entry of the grid: ``path[2i] = z_i`` and ``path[2i + 1] = z_m`` of step
    ``i``, so ``path[k]`` is the latent the loop's call ``k`` sees when it replays the path."""
    s = [float(x) for x in sigmas]
    if len(s) < 3 or len(s) % 2 == 0 or any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise ConfigError(f"midpoint inversion needs a decreasing grid σ_0 > m_0 > σ_1 > … > σ_n of odd length, "
                          f"got {s}", fix="pass the sigmas of FlowMatchMidpointScheduler after set_timesteps")
    path = [z0]
    z = z0
    for i in range(len(s) - 3, -1, -2):  # grid points σ_i = s[i], midpoints s[i + 1], σ_{i+1} = s[i + 2]
        lo, mid, hi = s[i + 2], s[i + 1], s[i]
        z_mid = z + (mid - lo) * velocity(z, lo)
        z = z + (hi - lo) * velocity(z_mid, mid)
        path += [z_mid, z]
    return path[::-1]


def image_array(image: Any) -> np.ndarray:
    """A PIL image, an ``H×W×3`` uint8 array or a path as an ``H×W×3`` uint8 array."""
    from PIL import Image

    from .imageio import read_image, rgb_image

    if isinstance(image, str) or hasattr(image, "__fspath__"):
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(rgb_image(image))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"the image to invert is an array of shape {arr.shape} and dtype {arr.dtype}",
                          fix="pass a PIL image, a file path or an H×W×3 uint8 array")
    return arr


def encode_image(pipe: Any, image: Any) -> torch.Tensor:
    """The image as the clean latent ``z0`` the transformer sees (FLUX: packed into 2×2 patches), in the
    transformer's dtype and device. The image's height and width must be multiples of what the model needs."""
    arr = image_array(image)
    h, w = arr.shape[:2]
    check_image_size(pipe, w, h)
    pixels = torch.from_numpy(arr.copy() if not arr.flags.writeable else np.ascontiguousarray(arr))
    with torch.no_grad():
        z = pixels_to_latents(pipe, pixels[None])
    return z.to(pipe.transformer.device, pipe.transformer.dtype)


def pixels_to_latents(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """uint8 ``N×H×W×3`` images → the clean latents the transformer sees: the VAE's mode, shifted and scaled as the
    pipelines undo it before decoding, and packed into 2×2 patches on FLUX."""
    vae = pipe.vae
    x = images.permute(0, 3, 1, 2).to(vae.device, torch.float32) / 127.5 - 1.0
    z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = (z - shift) * vae.config.scaling_factor
    if family_of(pipe.transformer) == "flux":
        b, c, lh, lw = z.shape
        z = pipe._pack_latents(z, b, c, lh, lw)
    return z


def run_sigmas(pipe: Any, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
    """The ``σ_0 … σ_n`` a pipeline call with these settings steps over (the same ``set_timesteps`` call, with
    FLUX's default grid and the resolution-dependent shift ``mu`` where the scheduler uses one; with the midpoint
    scheduler, ``σ_0, m_0, σ_1, …, σ_n``, one per call of the loop). Asked of a fresh scheduler made from the
    pipeline's config, so the pipeline's own scheduler state is left as it was."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    check_scheduler(pipe, "inversion")
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    cfg = sched.config
    family = family_of(pipe.transformer)
    patch = 2 if family == "flux" else pipe.transformer.config.patch_size
    seq_len = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
    kwargs: dict[str, Any] = {}
    if cfg.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    if family == "flux":
        n = int(num_inference_steps)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n).tolist(), device="cpu", **kwargs)
    else:
        sched.set_timesteps(int(num_inference_steps), device="cpu", **kwargs)
    return sched.sigmas.detach().float().cpu()


def has_guidance_embedding(pipe: Any) -> bool:
    """Whether the pipeline's transformer takes the guidance scale as an input (FLUX.1-dev) rather than running
    classifier-free guidance on two branches. Such a model is inverted and replayed with its guidance value; any
    other is replayed with ``guidance_scale=1`` to follow the conditional flow that was inverted."""
    return bool(pipe.transformer.config.get("guidance_embeds", False))


def text_length(pipe: Any, max_sequence_length: int | None = None) -> int:
    """The T5 sequence length to encode prompts with: ``max_sequence_length`` when given, else what the pipeline's
    own call uses by default (diffusers: 256 on SD3, 512 on FLUX.1), cut to the T5 tokenizer's limit where that is
    shorter (the toy models), so that ``pipe(prompt, latents=path[0])`` sees the prompt the inversion saw."""
    if max_sequence_length:
        return int(max_sequence_length)
    tok = getattr(pipe, "tokenizer_3" if family_of(pipe.transformer) == "sd3" else "tokenizer_2", None)
    limit = getattr(tok, "model_max_length", None)
    default = _call_default(pipe, "max_sequence_length", 256)
    return limit if isinstance(limit, int) and 0 < limit < default else default


def _call_default(pipe: Any, name: str, fallback: int) -> int:
    """The default of ``name`` in the pipeline's ``__call__`` (the first class of its MRO whose ``__call__`` names
    it: attnctl's pipelines pass their arguments through to diffusers')."""
    import inspect

    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        param = inspect.signature(call).parameters.get(name)
        if param is not None and isinstance(param.default, int):
            return param.default
    return fallback


def acting_controller(pipe: Any) -> Any:
    """The attnctl controller on the pipeline's transformer, or ``None``: the one that follows its runs
    (``attnctl.attach``, ``set_attn_processor(ctl.processors())``), else one whose processors are still installed
    after ``ctl.close()`` (they still act, at step 0 of an unknown run)."""
    transformer = uncompiled(pipe.transformer)
    ref = vars(transformer).get("_attnctl_controller")
    following = ref() if ref is not None else None
    if following is not None:
        return following
    return next((proc.controller for proc in transformer.attn_processors.values()
                 if isinstance(proc, AttnCtlProcessor) and proc.controller is not None), None)


def check_no_controls(pipe: Any) -> None:
    """Refuse to invert through attached controls: the inversion calls the transformer itself, so a control's hooks
    and processors would act on those calls at whatever step the scheduler was left at (a different inverted noise,
    or an error from inside the model)."""
    ctl = acting_controller(pipe)
    if ctl is None or not ctl.controls:
        return
    names = ", ".join(type(c).__name__ for c in ctl.controls)
    raise ConfigError(f"the inversion runs the model without controls, and an attnctl controller with {names} is "
                      "attached to this pipeline: its controls would act on the inversion's model calls",
                      fix="invert before attaching (path = attnctl.invert(pipe, ...), then with attnctl.attach(pipe, "
                          "[...]): ...) or after the with-block (or ctl.restore())")


def flow_velocity(pipe: Any, prompt: str, height: int, width: int, *, guidance: float | None = None,
                  max_sequence_length: int | None = None) -> Velocity:
    """``v(z, σ)`` of the pipeline's transformer for one ``prompt``, called as the pipeline calls it (SD3: timestep
    ``1000·σ``; FLUX: ``σ``, the image positions, and ``guidance`` for a model with a guidance embedding). No
    classifier-free guidance: inversion follows the conditional flow. Refused while attnctl controls are attached
    (:func:`check_no_controls`)."""
    check_no_controls(pipe)
    family = family_of(pipe.transformer)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    length = text_length(pipe, max_sequence_length)
    with torch.no_grad():
        if family == "flux":
            emb, pooled, txt_ids = pipe.encode_prompt(prompt, prompt, device=device, max_sequence_length=length)
            lh, lw = height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2
            img_ids = pipe._prepare_latent_image_ids(1, lh, lw, device, dtype)
            g = None
            if has_guidance_embedding(pipe):
                g = torch.full((1,), 3.5 if guidance is None else float(guidance), device=device, dtype=torch.float32)
        else:
            emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device, max_sequence_length=length,
                                                   do_classifier_free_guidance=False)

    def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
        # the scheduler's timestep, 1000·σ in float32, then what each pipeline passes: SD3 as it is, FLUX cast to
        # the latents' dtype and divided by 1000 there (in half precision the two differ from σ in that dtype)
        t = torch.full((z.shape[0],), sigma, device=device, dtype=torch.float32) * 1000.0
        with torch.no_grad():
            if family == "flux":
                return pipe.transformer(hidden_states=z, timestep=t.to(z.dtype) / 1000, guidance=g,
                                        pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=txt_ids,
                                        img_ids=img_ids, return_dict=False)[0]
            return pipe.transformer(hidden_states=z, timestep=t, encoder_hidden_states=emb,
                                    pooled_projections=pooled, return_dict=False)[0]

    return velocity


def check_steps_and_guidance(steps: Any, guidance: Any, name: str) -> None:
    """A whole number of steps, at least one, and a guidance (``name``) that is ``None`` or a finite number of 0 or
    more: a NaN guidance made black images and NaN paths, a fractional step count a bare ``TypeError``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"num_inference_steps={steps!r}: give a whole number of steps, at least one")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number))
                                 or not math.isfinite(float(guidance)) or float(guidance) < 0):
        raise ConfigError(f"{name}={guidance!r} is not a guidance scale", fix="give a finite number of 0 or more")


def invert(pipe: Any, image: Any, prompt: str, num_inference_steps: int = 28, *, guidance: float | None = None,
           max_sequence_length: int | None = None, gamma: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """The inversion path of a real ``image`` under ``prompt`` (module doc): one latent per call of the loop and
    the image's own, ``path[0]`` the noise to pass as ``pipe(prompt, latents=path[0], num_inference_steps=n,
    height=H, width=W)``.

    The solver is the pipeline's: with diffusers' flow-matching Euler scheduler (the SD3 / SD3.5 / FLUX default)
    Euler inversion, ``n + 1`` latents; with :class:`~attnctl.midpoint.FlowMatchMidpointScheduler` RF-Solver's
    midpoint rule, ``2n + 1`` latents (:func:`midpoint_invert`), and a reconstruction that is second order in the
    step. ``guidance`` is FLUX.1-dev's guidance-embedding value (default 3.5, as FluxPipeline); other models ignore
    it.

    ``gamma`` > 0 is RF-Inversion's controlled inversion (:mod:`attnctl.rf_inversion`): every velocity is pulled by
    ``gamma`` toward the straight line to a Gaussian sample drawn with ``seed``, so ``path[0]`` lies nearer a typical
    noise and the path is no longer one the pipeline retraces by itself (an edit's source branch replays it as
    given).

    The inversion is the model's own flow: it is refused while attnctl controls are attached to the pipeline
    (invert before ``attnctl.attach``, or after its with-block)."""
    check_steps_and_guidance(num_inference_steps, guidance, "guidance")
    check_no_controls(pipe)  # before the image is encoded
    if not isinstance(prompt, str):
        raise ConfigError(f"inversion takes one prompt (a string), got {type(prompt).__name__}",
                          fix="invert one image at a time with its own prompt")
    rf = RFInversion(gamma=gamma, seed=seed)  # checks both
    arr = image_array(image)
    height, width = arr.shape[:2]
    z0 = encode_image(pipe, arr)
    sigmas = run_sigmas(pipe, num_inference_steps, height, width)
    velocity = flow_velocity(pipe, prompt, height, width, guidance=guidance, max_sequence_length=max_sequence_length)
    if rf.gamma:
        velocity = toward_noise(velocity, noise_sample(z0, rf.seed), rf.gamma)
    midpoint = is_midpoint(pipe.scheduler)
    path = (midpoint_invert if midpoint else euler_invert)(velocity, z0, sigmas)
    _remember(path, ("midpoint" if midpoint else "euler", int(num_inference_steps)))
    return path


def check_path(pipe: Any, path: Any, image: np.ndarray, num_inference_steps: int) -> None:
    """Refuse a ``path`` an edit of ``image`` in ``num_inference_steps`` steps on ``pipe`` would replay wrongly: one of
    another length or solver, of another image size, or of another image (its last latent is the image's own)."""
    midpoint = is_midpoint(pipe.scheduler)
    solver, n = ("midpoint" if midpoint else "euler"), int(num_inference_steps)
    made = _how_made(path)
    if made is not None and made != (solver, n):
        raise ConfigError(f"the path is a {made[1]}-step {made[0]} inversion, and this edit runs {n} {solver} steps",
                          fix="invert the image with the steps and scheduler of the edit, or leave path out")
    if len(path) != (2 * n + 1 if midpoint else n + 1):
        raise ConfigError(f"the path holds {len(path)} latents, and a {n}-step {solver} edit replays "
                          f"{2 * n + 1 if midpoint else n + 1} (one per call of the loop and the image's)",
                          fix="invert the image with the steps and scheduler of the edit, or leave path out")
    z0 = encode_image(pipe, image)
    last = path[-1]
    if tuple(last.shape) != tuple(z0.shape):
        raise ConfigError(f"the path's latents are {tuple(last.shape)} and this image's are {tuple(z0.shape)}: the "
                          "path is of an image of another size", fix="invert this image, or leave path out")
    z, ref = last.to(z0.device, torch.float32), z0.float()
    if not torch.allclose(z, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max().clamp_min(1e-6))):
        raise ConfigError("the path ends at another image's latent: it is not this image's inversion",
                          fix="invert this image (attnctl.invert), or leave path out")
