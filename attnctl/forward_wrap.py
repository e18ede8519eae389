"""Wrapping a transformer's ``forward`` for the length of a run, and handling its per-row inputs.

Controls that change what one transformer call computes beyond its attention — a perturbed branch in the same
batch (:mod:`attnctl.guidance`), a latent-gradient step before the call (:mod:`attnctl.latent_guidance`) — wrap
``transformer.forward`` instead of rewriting the diffusers loop. :class:`ForwardWrapper` is what they share:
install on enter, remove on exit (only their own wrapper: offload hooks may have replaced it meanwhile), and
re-install when model CPU offload dropped it at the end of a pipeline call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from . import compiling
from .errors import ConfigError

BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
"""Transformer inputs with one entry per batch row (SD3 and FLUX)."""
BATCHED_LISTS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")
"""ControlNet residuals (SD3; FLUX double and single blocks): one tensor per block, each with one entry per batch
row."""
IP_ADAPTER_INPUTS = ("ip_adapter_image_embeds", "ip_hidden_states", "temb")
"""IP-adapter entries of ``joint_attention_kwargs`` with one entry per batch row (SD3: one tensor each, ``temb`` the
adapter's timestep embedding; FLUX: a list, one tensor per adapter)."""


class ForwardWrapper:
    """Context manager: ``transformer.forward`` goes through :meth:`_forward` while active.

    Subclasses implement :meth:`_forward` and call :meth:`call_original` for the wrapped forward (which may itself
    be a chain: offload hooks, another wrapper)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self._signature = inspect.signature(type(transformer).forward)
        self._had_own_forward = False
        self._saved_forward: Any = None
        self._original: Any = None
        self._active = False
        self._wrapper = self._call  # one bound-method object, so __exit__ can recognise it

    def __enter__(self):
        self._active = True
        if not self.installed():
            self._had_own_forward = "forward" in vars(self.transformer)
            self._saved_forward = vars(self.transformer).get("forward")
            self._original = self.transformer.forward  # may already be wrapped (offload hooks): keep the chain
            self.transformer.forward = self._wrapper
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False  # a copy of the wrapper left inside another's chain now passes calls straight on
        # Only undo our own wrapper: diffusers' offload hooks may have replaced the forward meanwhile
        # (``maybe_free_model_hooks`` re-installs them at the end of a call).
        own = vars(self.transformer)
        if own.get("forward") is self._wrapper:
            if self._had_own_forward:
                self.transformer.forward = self._saved_forward
            else:
                del self.transformer.forward
            return
        # Something wrapped the forward on top of ours: take ours out of the chain, so nothing keeps calling it
        # (and keeps this wrapper, its controller and controls alive) after the run. Model CPU offload (accelerate)
        # keeps the forward it wrapped in ``_old_forward`` and puts it back when its hooks go; another attnctl
        # wrapper keeps it in ``_original``.
        if own.get("_old_forward") is self._wrapper:
            self.transformer._old_forward = self._original
        fn, seen = own.get("forward"), 0
        while fn is not None and seen < 32:
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, ForwardWrapper):
                if owner._original is self._wrapper:
                    owner._original = self._original
                fn = owner._original
            else:
                if getattr(fn, "__wrapped__", None) is self._wrapper:  # the hook's record of what it wraps
                    fn.__wrapped__ = self._original
                fn = getattr(fn, "__wrapped__", None)
            seen += 1

    def installed(self) -> bool:
        """Whether calls of the transformer reach the wrapper: it is the forward, or inside the chain of wrappers
        that offload hooks (``__wrapped__``) and other attnctl wrappers put around it."""
        fn, seen = vars(self.transformer).get("forward"), 0
        while fn is not None and seen < 32:
            if fn is self._wrapper:
                return True
            owner = getattr(fn, "__self__", None)  # another attnctl wrapper: look at what it wraps
            fn = owner._original if isinstance(owner, ForwardWrapper) else getattr(fn, "__wrapped__", None)
            seen += 1
        return False

    def ensure(self) -> None:
        """Wrap the forward again if something replaced it since :meth:`__enter__`. Model CPU offload does: at the
        end of every pipeline call diffusers takes its hooks off the transformer and puts new ones on, which
        drops a wrapper set on top of them; a controller calls this at the start of each pipeline call."""
        if self._active and not self.installed():
            self.__enter__()

    @compiling.eager  # under torch.compile the wrapper's own code runs eagerly; its model calls stay compiled
    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if not self._active:
            return self.call_original(*args, **kwargs)
        return self._forward(*args, **kwargs)

    def call_original(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped forward (compiled when the transformer is: :mod:`attnctl.compiling`)."""
        return compiling.compiled(self._original, *args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name (so a wrapper can replace rows of ``hidden_states`` and the like)."""
        bound = self._signature.bind_partial(None, *args, **kwargs).arguments
        bound.pop(next(iter(self._signature.parameters)))  # self
        bound.update(bound.pop("kwargs", {}))
        return bound


def later_call(kwargs: dict, roles: list[str]) -> str | None:
    """What a call is when it is one a diffusers loop makes after a step's batched call, on the same images: SD3's
    skip-layer guidance pass, or FLUX's true-CFG call for the negative prompt (every row unconditional); ``None``
    for any other call. Wrappers give such a call the term of its step's batched call."""
    if kwargs.get("skip_layers") is not None:
        return "SD3's skip-layer guidance pass"
    if roles and set(roles) == {"uncond"}:
        return "the call for the negative prompt"
    return None


def image_rows(roles: list[str], batch: int, what: str) -> tuple[list[int], list[int]]:
    """The conditional and unconditional rows of a call, the ``k``-th of each belonging to the same image; the roles
    must cover the batch and the two lists pair up (or there are no unconditional rows). ``what`` names the wrapper
    in the errors."""
    if len(roles) != batch:
        raise ConfigError(f"the controller knows {len(roles)} batch roles but the transformer got {batch} rows")
    cond = [i for i, r in enumerate(roles) if r == "cond"]
    uncond = [i for i, r in enumerate(roles) if r == "uncond"]
    if uncond and len(uncond) != len(cond):
        raise ConfigError(
            f"the call has {len(cond)} conditional and {len(uncond)} unconditional rows; {what} pairs the k-th "
            "unconditional row with the k-th conditional one",
            fix="give every image one unconditional row (diffusers' CFG batch), or none")
    return cond, uncond


def map_rows(bound: dict[str, Any], batch: int, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> dict:
    """``bound`` with ``fn`` applied to every input that has one entry per batch row (the transformer inputs,
    ControlNet residuals, IP-adapter inputs, a per-row attention mask), so rows can be selected or appended
    consistently. ``what`` names the wrapper in the error for an IP-adapter input that is not per batch row."""
    out = dict(bound)

    def rows(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == batch:
            return fn(x)
        return x

    for name in BATCHED_INPUTS:
        if name in out:
            out[name] = rows(out[name])
    for name in BATCHED_LISTS:
        if isinstance(out.get(name), (list, tuple)):
            out[name] = [rows(x) for x in out[name]]
    extras = out.get("joint_attention_kwargs")
    if extras and (any(name in extras for name in IP_ADAPTER_INPUTS) or "attention_mask" in extras):
        extras = dict(extras)  # the transformer pops from it; the pipeline's own dict stays as it was
        for name in IP_ADAPTER_INPUTS:
            if name in extras:
                extras[name] = _ip_rows(name, extras[name], batch, rows, what)
        if "attention_mask" in extras:  # (FLUX's padding mask; one shared by every row broadcasts as it is)
            extras["attention_mask"] = rows(extras["attention_mask"])
        out["joint_attention_kwargs"] = extras
    return out


def _ip_rows(name: str, value: Any, batch: int, rows: Callable[[Any], Any], what: str) -> Any:
    """An IP-adapter input with ``rows`` applied; one that is not per batch row is an error, since the new rows
    could not be given their image prompt."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for x in items:
        if not (isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == batch):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"{what}: the IP-adapter input joint_attention_kwargs[{name!r}] has shape {got}, not one entry per "
                f"batch row ({batch}), so the extra rows cannot be given the image prompt",
                fix="pass IP-adapter image embeddings with one row per image of the call, as the diffusers "
                    "pipelines prepare them")
    out = [rows(x) for x in items]
    return out if isinstance(value, (list, tuple)) else out[0]


def sample_of(result: Any) -> torch.Tensor:
    """The prediction of a transformer call (tuple or output object)."""
    return result[0] if isinstance(result, tuple) else result.sample


def with_sample(result: Any, sample: torch.Tensor) -> Any:
    """``result`` with its prediction replaced."""
    if isinstance(result, tuple):
        return (sample, *result[1:])
    result.sample = sample
    return result


def batch_of(args: tuple, kwargs: dict) -> int:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return int(x.shape[0])
