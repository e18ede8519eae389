"""attnctl under ``torch.compile``: the controls' Python runs eagerly, the model's own modules stay compiled.

What a control does at a call depends on Python state that changes at every step (the step, its schedule's weight,
the rows' roles, the prompt's tokens). Traced by torch.compile, each of these values would become a guard, and the
model would be recompiled at every step until dynamo's recompile limit sends it back to eager with a warning. So the
places where attnctl's state meets the model run eagerly (a graph break each):

- the controller's pre-forward hook and an attnctl processor's choice of contributions (``torch.compiler.disable``);
- a forward wrapper (SoftPAG's perturbed branch, latent guidance, edit branches), through :func:`eager`: its own
  code runs eagerly, and the transformer calls it makes go through :func:`compiled`, which hands them back to the
  compiler that was active when the wrapper was entered, so the wrapped forward is still compiled.

Nothing here is needed without torch.compile: outside a compiled region :func:`eager` and :func:`compiled` call
straight through.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .errors import AttnCtlError, ConfigError

F = TypeVar("F", bound=Callable[..., Any])

try:  # dynamo's frame-evaluation callback (how a compiled region compiles the frames it calls) and its frame skip
    from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_eval_frame
    from torch._dynamo.decorators import skip as _skip_frame
except ImportError:  # a torch without them: wrappers then run wholly eager under torch.compile (correct, slower)
    get_eval_frame_callback = set_eval_frame = _skip_frame = None

EAGER = ("attnctl runs its controls eagerly inside a compiled model (their state changes at every step), which "
         "needs a graph break: compile without fullgraph=True")
"""The reason given to ``torch.compiler.disable`` (torch shows it when ``fullgraph=True`` refuses the break)."""

_local = threading.local()


def _stack() -> list[Any]:
    if not hasattr(_local, "callbacks"):
        _local.callbacks = []
    return _local.callbacks


def eager(fn: F) -> F:
    """Run ``fn`` eagerly when it is called from a compiled region, remembering that region's compiler for the
    calls ``fn`` makes through :func:`compiled`."""
    if _skip_frame is None:
        return torch.compiler.disable(fn, reason=EAGER)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        callback = get_eval_frame_callback()
        if callback is None or callback is False:  # not inside torch.compile
            return fn(*args, **kwargs)
        stack = _stack()
        prior = set_eval_frame(None)
        stack.append(callback)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            set_eval_frame(prior)

    # dynamo does not trace this frame (a graph break where it is called) and, once told, never looks at it again
    # (``torch.compiler.disable(recursive=False)`` would look at every call, which counts as a recompile under
    # ``set_stance("fail_on_recompile")``); the frames it calls are compiled unless ``run`` turns the compiler off
    return _skip_frame(run)  # type: ignore[return-value]


def compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, compiled by the compiler of the compiled region that entered the innermost
    :func:`eager` function, if there is one."""
    stack = _stack()
    if not stack:
        return fn(*args, **kwargs)
    prior = set_eval_frame(stack[-1])
    try:
        return fn(*args, **kwargs)
    finally:
        set_eval_frame(prior)


def differentiable_more_than_once() -> contextlib.AbstractContextManager:
    """For a forward whose graph may be differentiated more than once (``retain_graph=True``: UnifyEdit takes each
    loss's gradient on its own). Compiled backward graphs free ("donate") the buffers they saved, which only a
    single backward allows; graphs compiled inside this block keep them. Every attnctl gradient pass runs in it
    (``Controller.gradient_pass``), so a graph one pass compiled is safe for another with the same guards (grad mode,
    shapes); calls without gradients have no backward to donate for."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "donated_buffer"):
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)


def _is_dynamo_error(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` is dynamo's exception class ``name`` (False when this torch has no such class)."""
    cls = getattr(getattr(getattr(torch, "_dynamo", None), "exc", None), name, None)
    return cls is not None and isinstance(exc, cls)


def fullgraph_error(exc: BaseException) -> ConfigError | None:
    """The error to raise instead of ``exc`` when ``exc`` is torch.compile's refusal (``fullgraph=True``) of one of
    attnctl's eager parts; ``None`` for any other error."""
    if not _is_dynamo_error(exc, "Unsupported") or "attnctl" not in str(exc):
        return None
    return ConfigError("the transformer was compiled with fullgraph=True, but attnctl's controls run eagerly inside "
                       "it (what they do changes at every step), which needs a graph break at each controlled site",
                       fix="compile without fullgraph=True: torch.compile(pipe.transformer), "
                           "pipe.transformer.compile() or, on FLUX, pipe.transformer.compile_repeated_blocks(); the "
                           "model's own modules stay compiled (docs/core.md, torch.compile)")


def backend_failure(exc: BaseException) -> AttnCtlError | None:
    """The error to show instead of ``exc`` when ``exc`` is a torch.compile backend failing to compile the model
    (inductor without a C++ compiler, a backend's missing package): a problem of the machine, not of the controls;
    ``None`` for any other error."""
    if not _is_dynamo_error(exc, "BackendCompilerFailed"):
        return None
    inner = getattr(exc, "inner_exception", None)
    why = f"{type(inner).__name__}: {inner}" if inner is not None else str(exc)
    why = " ".join(why.split())
    return AttnCtlError(f"torch.compile's {getattr(exc, 'backend_name', '?')!r} backend failed to compile the "
                        f"transformer ({why[:300]}{'…' if len(why) > 300 else ''})",
                        fix="run without --compile (the images are the same, only slower), or with --compile eager "
                            "to check the controls; inductor needs a working C++ compiler on a CPU and Triton on a "
                            "GPU; --debug shows the backend's traceback")
