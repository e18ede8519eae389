"""The shipped toy models and the one loader every command uses.

``toy-sd3`` and ``toy-flux`` are small SD3- and FLUX-architecture pipelines trained on the shapes world
(:mod:`attnctl.toyworld.train`); ``toy-flux-dev`` is toy-flux with a guidance embedding, distilled from its
true CFG as FLUX.1-dev is. They ship inside the package as ordinary diffusers folders::

    attnctl/toyworld/models/toy-sd3/       model_index.json, transformer/, text_encoder{,_2,_3}/, ...
    attnctl/toyworld/models/toy-flux/      model_index.json, transformer/, text_encoder{,_2}/, ...
    attnctl/toyworld/models/toy-flux-dev/  the same, its transformer with ``guidance_embeds``

Each also holds ``attnctl.json`` (ignored by diffusers): the call defaults the model was tuned for
(:func:`default_call_kwargs`) and how it was trained.

- :func:`resolve_model` maps a toy name to its folder and passes every other name or path through;
- :func:`load_pipeline` loads any SD3/SD3.5/FLUX.1 folder or hub id as an attnctl pipeline
  (``AttnCtlSD3Pipeline`` / ``AttnCtlFluxPipeline``) or, with ``controlled=False``, the stock diffusers
  one, and turns the low-level failures (missing folder, missing ``model_index.json``, missing or
  corrupt weights) into :class:`~attnctl.errors.AttnCtlError` messages that name the way out.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

from attnctl.errors import AttnCtlError, ConfigError, UnsupportedModelError
from attnctl.toyworld import TOY_MODEL_NAMES
from attnctl.toyworld import autoencoder as _autoencoder  # noqa: F401  (diffusers resolves the vae class here)

__all__ = [
    "TOY_MODELS",
    "MODELS_DIR",
    "METADATA_NAME",
    "resolve_model",
    "load_pipeline",
    "default_call_kwargs",
    "model_family",
    "toy_metadata",
]

MODELS_DIR = Path(__file__).resolve().parent / "models"
"""Where the trained toy pipelines ship."""

TOY_MODELS: dict[str, Path] = {name: MODELS_DIR / name for name in TOY_MODEL_NAMES}
"""Toy model name -> its pipeline folder inside the package."""

METADATA_NAME = "attnctl.json"
"""Per-folder attnctl metadata: ``{"name", "family", "call": {...defaults}, "training": {...}}``."""

_FALLBACK_CALL: dict[str, dict[str, Any]] = {
    "sd3": {"height": 32, "width": 32, "num_inference_steps": 20, "guidance_scale": 4.0, "max_sequence_length": 24},
    "flux": {"height": 32, "width": 32, "num_inference_steps": 20, "max_sequence_length": 24},
}
"""Toy call defaults used when a toy folder carries no ``attnctl.json``."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WEIGHT_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def _toy_fix() -> str:
    return (
        f"use one of the toy models ({', '.join(TOY_MODELS)}), an existing pipeline folder "
        "(with model_index.json), or a Hugging Face hub id such as 'owner/name'"
    )


_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ECONNREFUSED,
                   errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}
"""OS error numbers of a network that cannot be used (besides name resolution, socket.gaierror)."""

_CONNECTION_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "NetworkError", "ProxyError",
                      "NewConnectionError", "NameResolutionError"}
"""Class names of a connection that failed: builtins' and requests' ConnectionError, httpx's / httpcore's ConnectError
and NetworkError, urllib3's NewConnectionError, ... (by name: none of those libraries is imported for the check)."""


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling, depth first."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack and len(seen) < 50:
        e = stack.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        stack += [c for c in (e.__context__, e.__cause__) if c is not None]
    return seen


def _hub_unreachable(target: str, exc: BaseException) -> AttnCtlError | None:
    """A clear error when loading a hub id failed because the hub could not be reached (no network, no name
    resolution, a refused connection, hub offline mode on without the model in the cache), else ``None``.

    diffusers reports both as "does not appear to have a file named model_index.json", as if the hub had answered;
    the cause chain tells them apart."""
    causes = _causes(exc)
    names = [{c.__name__ for c in type(e).__mro__} for e in causes]
    if any("OfflineModeIsEnabled" in n for n in names) or (
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        and any("LocalEntryNotFoundError" in n for n in names)
    ):
        return AttnCtlError(
            f"cannot load model {target!r}: Hugging Face hub offline mode is on (HF_HUB_OFFLINE) and the model is not "
            "in the local cache",
            "unset HF_HUB_OFFLINE on a machine with network access to download it once, or pass a local pipeline "
            f"folder or one of the toy models ({', '.join(TOY_MODELS)})",
        )
    for e, n in zip(causes, names, strict=True):
        # (not every TimeoutError: filelock's, on a locked cache, is one)
        network = isinstance(e, (socket.gaierror, socket.herror)) or bool(n & _CONNECTION_ERRORS)
        network = network or (isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS)
        if network:
            detail = " ".join(str(e).split())[:200] or type(e).__name__
            return AttnCtlError(
                f"cannot load model {target!r}: could not reach the Hugging Face hub (no network?): "
                f"{type(e).__name__}: {detail}",
                "pass a local pipeline folder (save_pretrained) or one of the toy models "
                f"({', '.join(TOY_MODELS)}); or, if the model is in the Hugging Face cache, set HF_HUB_OFFLINE=1 to "
                "load it from there without the network",
            )
    return None


def resolve_model(name_or_path: str | Path) -> str | Path:
    """A toy name -> its shipped folder (a ``Path``); any other name or path is returned for diffusers.

    Existing folders come back as a ``Path`` (after checking they hold ``model_index.json``); strings
    shaped like a hub id (``owner/name``) come back unchanged for ``from_pretrained``.

    Raises:
        ConfigError: a name that is neither a toy name, nor an existing path, nor hub-id shaped
            (the message lists the toy names); a folder without ``model_index.json``.
        AttnCtlError: a toy model whose folder is missing from this installation.
    """
    if isinstance(name_or_path, str) and name_or_path in TOY_MODELS:
        folder = TOY_MODELS[name_or_path]
        if not (folder / "model_index.json").is_file():
            raise AttnCtlError(
                f"the toy model {name_or_path!r} is not installed: {folder} has no model_index.json",
                "reinstall attnctl, or train it: python -m attnctl.toyworld.train "
                f"{name_or_path} OUT_DIR, then pass OUT_DIR/pipeline as the model",
            )
        return folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"model path {str(path)!r} is a file, not a pipeline folder",
                "pass the folder that holds model_index.json",
            )
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"{str(path)!r} is not a diffusers pipeline folder: it has no model_index.json",
                "pass a folder written by save_pretrained (or attnctl's trainer), or " + _toy_fix(),
            )
        return path
    text = str(name_or_path)
    if isinstance(name_or_path, str) and _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text
    raise ConfigError(f"unknown model {text!r}: not a toy model name and no such folder", _toy_fix())


def toy_metadata(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``attnctl.json`` (toy models), or None."""
    f = Path(folder) / METADATA_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is not valid JSON: {e}", "re-copy the model folder") from e


def _read_index(folder: Path) -> dict[str, Any]:
    f = folder / "model_index.json"
    try:
        index = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read {f}: {e}", "re-copy or re-save the pipeline folder (model_index.json is corrupt)"
        ) from e
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ConfigError(f"{f} has no _class_name", "re-save the pipeline with save_pretrained")
    return index


def model_family(index: dict[str, Any], folder: Path | None = None) -> str:
    """``"sd3"`` or ``"flux"`` from a model_index dict (its pipeline class, else its transformer class)."""
    cls = str(index.get("_class_name", ""))
    if "Flux" in cls:
        return "flux"
    if "StableDiffusion3" in cls or "SD3" in cls:
        return "sd3"
    transformer = index.get("transformer")
    tcls = str(transformer[1]) if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else ""
    if not tcls and folder is not None and (folder / "transformer" / "config.json").is_file():
        try:
            tcls = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            tcls = ""
    if tcls.startswith("Flux"):
        return "flux"
    if tcls.startswith("SD3"):
        return "sd3"
    raise UnsupportedModelError(
        f"pipeline class {cls!r} (transformer {tcls or 'unknown'!r}) is neither SD3/SD3.5 nor FLUX.1",
        "attnctl controls SD3, SD3.5 and FLUX.1 pipelines; pass one of those or " + ", ".join(TOY_MODELS),
    )


def _check_weights(folder: Path, index: dict[str, Any]) -> None:
    """Every model component of the index has a readable weights file (safetensors headers are checked)."""
    from safetensors import safe_open

    for name in _WEIGHT_COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None):
            continue
        sub = folder / name
        toy = (folder / METADATA_NAME).is_file()  # a toy model attnctl trained records how
        fix = ("re-copy the folder, or retrain it (attnctl toy train)" if toy
               else "download or copy the model again (all its component folders, with their weights)")
        if not sub.is_dir():
            raise AttnCtlError(f"{folder} lists component {name!r} but has no {name}/ folder", fix)
        weights = sorted(p for p in sub.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        if not weights:
            raise AttnCtlError(f"no weights file (*.safetensors) in {sub}: the checkpoint is incomplete", fix)
        for w in weights:
            if not w.name.endswith(".safetensors") or w.name.endswith(".index.json"):
                continue
            try:
                with safe_open(str(w), framework="pt") as f:
                    keys = list(f.keys())
                    if keys:  # touch the last tensor: truncation shows up here
                        f.get_slice(keys[-1])
            except Exception as e:  # safetensors raises its own Rust-side error types
                raise AttnCtlError(f"corrupt weights file {w}: {e}", fix) from e


def load_pipeline(
    name_or_path: str | Path = "toy-sd3",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    controlled: bool = True,
    **kwargs: Any,
):
    """Load a toy name, pipeline folder or hub id as an attnctl pipeline (or the stock one).

    Args:
        name_or_path: ``"toy-sd3"``, ``"toy-flux"``, ``"toy-flux-dev"``, a pipeline folder, or a hub id.
        device: where to put the pipeline.
        dtype: parameter dtype of every component.
        controlled: ``True`` -> ``AttnCtlSD3Pipeline`` / ``AttnCtlFluxPipeline`` (take ``controls=``);
            ``False`` -> ``StableDiffusion3Pipeline`` / ``FluxPipeline``.
        **kwargs: passed to ``from_pretrained`` (e.g. ``variant``, ``text_encoder_3=None``).

    The pipeline class is chosen by the folder's ``model_index.json`` ``_class_name`` (or its
    transformer class). A folder that records no T5 (``text_encoder_3: [null, null]``) is loaded with
    ``text_encoder_3=None, tokenizer_3=None``, as diffusers requires. Toy models get their call defaults
    attached (:func:`default_call_kwargs`) and progress bars off.

    Raises:
        ConfigError / AttnCtlError: see :func:`resolve_model`; missing or corrupt weights; a folder or
            hub id that diffusers cannot load (the low-level error is chained).
        UnsupportedModelError: a pipeline that is neither SD3/SD3.5 nor FLUX.1.
    """
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    target = resolve_model(name_or_path)
    local = isinstance(target, Path)
    if local:
        index = _read_index(target)
        _check_weights(target, index)
    else:
        try:
            index = DiffusionPipeline.load_config(target)
        except Exception as e:
            unreachable = _hub_unreachable(str(target), e)
            if unreachable is not None:
                raise unreachable from e
            raise AttnCtlError(
                f"cannot load model {target!r}: not a toy model, not a local folder, and the hub "
                f"answered: {type(e).__name__}: {e}",
                _toy_fix() + " (hub ids need network access or a populated cache)",
            ) from e
    family = model_family(index, target if local else None)
    classes = {
        ("sd3", True): AttnCtlSD3Pipeline,
        ("sd3", False): StableDiffusion3Pipeline,
        ("flux", True): AttnCtlFluxPipeline,
        ("flux", False): FluxPipeline,
    }
    cls = classes[(family, controlled)]
    extra: dict[str, Any] = {}
    if family == "sd3":
        for name in ("text_encoder_3", "tokenizer_3"):
            entry = index.get(name)
            if isinstance(entry, (list, tuple)) and entry and entry[0] is None:
                extra[name] = None
    extra.update(kwargs)
    try:
        pipe = cls.from_pretrained(target, dtype=dtype, **extra)
    except AttnCtlError:
        raise
    except Exception as e:
        # a hub id whose index came (e.g. from the cache) can still fail to fetch its weights
        unreachable = None if local else _hub_unreachable(str(target), e)
        if unreachable is not None:
            raise unreachable from e
        raise AttnCtlError(
            f"cannot load {family.upper()} pipeline from {str(target)!r}: {type(e).__name__}: {e}",
            "check the folder is complete (re-copy or re-save it) or " + _toy_fix(),
        ) from e
    pipe.to(device)
    meta = toy_metadata(target) if local else None
    if meta is not None or (local and Path(target).resolve() in {p.resolve() for p in TOY_MODELS.values()}):
        call = _toy_call(meta, family)
        pipe._attnctl_call_defaults = call
        pipe._attnctl_toy_metadata = meta  # written again by AttnCtl*Pipeline.save_pretrained
        if family == "flux":
            # FluxPipeline does not save its default image size (it defaults to 256 px): use the toy's.
            pipe.default_sample_size = call["height"] // pipe.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _toy_call(meta: dict[str, Any] | None, family: str) -> dict[str, Any]:
    call = dict(_FALLBACK_CALL[family])
    if meta and isinstance(meta.get("call"), dict):
        call.update(meta["call"])
    return call


def default_call_kwargs(pipe: Any) -> dict[str, Any]:
    """Call defaults for ``pipe``: for toy models height, width, steps, guidance and T5 length.

    ``toy-sd3`` samples with classifier-free guidance (``guidance_scale`` as tuned at training time);
    ``toy-flux`` samples without an unconditional branch (``guidance_scale`` is ignored: the model has
    no guidance embedding; pass ``true_cfg_scale`` and a ``negative_prompt`` for true CFG); ``toy-flux-dev``
    takes ``guidance_scale`` as an input of its guidance embedding, one forward per step. For other
    models the result is empty (diffusers' own defaults apply). A fresh dict every call.
    """
    call = getattr(pipe, "_attnctl_call_defaults", None)
    if call is not None:
        return dict(call)
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if name:
        folder = Path(str(name))
        meta = toy_metadata(folder) if folder.is_dir() else None
        if meta is not None:
            return _toy_call(meta, meta.get("family", "flux" if "Flux" in type(pipe).__name__ else "sd3"))
    return {}
