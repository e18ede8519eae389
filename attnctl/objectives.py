"""Objectives for a head search: ``f(images, prompts) -> one score per image``, higher is better.

Built in (toy world only; the prompt is parsed into the objects it names and the image scored exactly by
:mod:`attnctl.toyworld.evaluate`):

- ``toy_fidelity``: ``(presence + object_recall + colour_binding) / 3`` — does the image show what the
  prompt names (``colour_binding`` counts 0 when no named shape appears at all);
- ``toy_quality``: ``(background_clean + sharpness) / 2`` — the toy world's image-quality proxy (clean
  background, no blur);
- ``toy_combined``: the harmonic mean of the two, as the paper combines its quality and fidelity scores.

Anything else is a user callable, given in Python or as ``"package.module:function"`` /
``"path/to/file.py:function"`` on the command line. On a GPU plug in PickScore, CLIPScore or an aesthetic
predictor this way; the search only needs a number per image.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AttnCtlError, ConfigError

Objective = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
"""``objective(images, prompts)``: PIL images and their prompts, one score (higher is better) per image."""


def _toy_item(prompt: str) -> dict[str, Any]:
    """The shapes-world reading of ``prompt`` the toy objectives score against, or a clear error."""
    from .toyworld.world import parse_caption

    try:
        return {"prompt": prompt, **parse_caption(prompt)}
    except ValueError as e:
        why = getattr(e, "problem", None) or str(e)  # (its own way out is the world's; this one's is below)
        raise ConfigError(f"the toy-world objectives cannot read the prompt {prompt!r}: {why}",
                          fix="use shapes-world prompts ('a red circle and a blue square') or your own objective "
                              "(--objective module:function)") from None


def _toy_metrics(image: Any, prompt: str) -> dict[str, float]:
    from .toyworld.evaluate import evaluate_image

    return evaluate_image(np.asarray(image.convert("RGB")), _toy_item(prompt))


def check_prompts(objective: str, prompts: Sequence[str]) -> None:
    """A built-in objective scores the shapes world: refuse prompts it cannot read before any model work (a search
    on a real model found out only after loading it and generating)."""
    if objective in BUILTIN:
        for prompt in prompts:
            _toy_item(prompt)


def fidelity(m: dict[str, float]) -> float:
    """Presence, recall and colour binding of the named objects, in [0, 1]."""
    return (m.get("presence", 0.0) + m.get("object_recall", 0.0) + m.get("colour_binding", 0.0)) / 3


def quality(m: dict[str, float]) -> float:
    """Clean background and sharp edges, in [0, 1]."""
    return (m["background_clean"] + m["sharpness"]) / 2


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def toy_fidelity(images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
    return [fidelity(_toy_metrics(im, p)) for im, p in zip(images, prompts, strict=True)]


def toy_quality(images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
    return [quality(_toy_metrics(im, p)) for im, p in zip(images, prompts, strict=True)]


def toy_combined(images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
    out = []
    for im, p in zip(images, prompts, strict=True):
        m = _toy_metrics(im, p)
        out.append(harmonic(fidelity(m), quality(m)))
    return out


BUILTIN: dict[str, Objective] = {"toy_fidelity": toy_fidelity, "toy_quality": toy_quality,
                                 "toy_combined": toy_combined}


def callable_name(fn: Objective) -> str:
    """``module:qualname`` of a callable objective; for a lambda or a function defined inside another, whose names
    say little, with a short hash of its code, so two such objectives are told apart in a search's record."""
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is not None and ("<lambda>" in name or "<locals>" in name):
        data = code.co_code + repr(code.co_consts).encode() + repr(code.co_names).encode()
        name += "#" + hashlib.sha256(data).hexdigest()[:8]
    return name


def load_objective(spec: str | Objective) -> tuple[Objective, str]:
    """The objective and the name it is recorded under: a callable, a built-in name, ``"module:function"``
    or ``"file.py:function"``."""
    if callable(spec):
        return spec, callable_name(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"objective {spec!r} is not a name or a callable",
                          fix=f"use one of {', '.join(BUILTIN)} or 'module:function'")
    spec = spec.strip()
    if spec in BUILTIN:
        return BUILTIN[spec], spec
    if ":" not in spec:
        raise ConfigError(f"unknown objective {spec!r}",
                          fix=f"use one of {', '.join(BUILTIN)}, or your own as 'package.module:function' or "
                              "'path/to/file.py:function'")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"objective file {where!r} does not exist", fix="give the path of a .py file")
            module_spec = importlib.util.spec_from_file_location(f"attnctl_objective_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say so, briefly
        raise ConfigError(f"cannot import the objective's module {where!r}: {type(e).__name__}: {e}",
                          fix="check the module path and that it imports on its own") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where!r} has no callable {name!r}",
                          fix="define def NAME(images, prompts) -> list of floats in that module")
    return fn, spec


def score_images(objective: Objective, name: str, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
    """Call the objective and check what it returns: one finite number per image."""
    try:
        scores = objective(list(images), list(prompts))
    except AttnCtlError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's objective raised: name it and keep the cause
        raise AttnCtlError(f"the objective {name!r} failed: {type(e).__name__}: {e}",
                           "fix the objective; finished candidates are kept, re-run to continue") from e
    try:
        values = [float(x) for x in scores]
    except (TypeError, ValueError):
        raise AttnCtlError(f"the objective {name!r} returned {type(scores).__name__}, not a list of numbers",
                           "return one float per image (higher is better)") from None
    if len(values) != len(images):
        raise AttnCtlError(f"the objective {name!r} returned {len(values)} scores for {len(images)} images",
                           "return one score per image, in order")
    if not all(math.isfinite(v) for v in values):
        raise AttnCtlError(f"the objective {name!r} returned a non-finite score", "return finite floats")
    return values
