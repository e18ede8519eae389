"""A pipeline's skeleton: its transformer on the meta device, its scheduler and (on toy models) its tokenizer,
built from the configs alone.

What a control checks when it binds — the model family, its sites and heads, the scheduler latent guidance steps
through — depends on the model's structure, not its weights. A batch file's controls can therefore be checked
against the model before a single weight is read (``attnctl batch --check``, and before the first image), which
costs a fraction of a second even for FLUX.1-dev (its transformer: under 10 MB, see :mod:`attnctl.configs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import AttnCtlError


@dataclass
class PipelineSkeleton:
    """Enough of a pipeline for :class:`attnctl.Controller` to bind controls: ``transformer`` holds no data."""

    transformer: Any
    scheduler: Any
    tokenizer: Any = None  # the first tokenizer of a local model, for a toy model's vocabulary check; else None
    vae_scale_factor: int = 8  # pixels per latent cell, as the pipelines derive it from the autoencoder's config


def _component_class(index: dict[str, Any], name: str, location: str) -> Any:
    import diffusers

    entry = index.get(name)
    cls = getattr(diffusers, str(entry[1]), None) if isinstance(entry, list | tuple) and len(entry) == 2 else None
    if cls is None:
        raise AttnCtlError(f"the pipeline {location!r} has no diffusers {name} in its model_index.json ({entry!r})",
                           "pass a complete SD3 / SD3.5 / FLUX.1 diffusers pipeline")
    return cls


def pipeline_skeleton(name: str) -> PipelineSkeleton:
    """The skeleton of the model ``name`` (a toy name, a diffusers pipeline folder or a hub id), read from its
    ``model_index.json`` and the transformer's and scheduler's configs; no weights are loaded.

    Raises :class:`AttnCtlError` when the configs cannot be read (an unknown model, a hub id offline)."""
    from diffusers import DiffusionPipeline

    from .cli import _one_line, resolve_model
    from .configs import build_empty

    location = resolve_model(name)
    try:
        index = DiffusionPipeline.load_config(location)
        config = dict(_component_class(index, "transformer", location).load_config(location, subfolder="transformer"))
        scheduler = _component_class(index, "scheduler", location).from_pretrained(location, subfolder="scheduler")
        vae_factor = _vae_scale_factor(location, index)
    except AttnCtlError:
        raise
    except (OSError, ValueError) as e:
        raise AttnCtlError(f"cannot read the configs of model {name!r}: {_one_line(e)[:300]}",
                           "check the model name or folder (and the network, for a hub id)") from None
    return PipelineSkeleton(build_empty(config), scheduler, _toy_tokenizer(location, index), vae_factor)


def _vae_scale_factor(location: str, index: dict[str, Any]) -> int:
    """``2 ** (len(block_out_channels) - 1)`` of the autoencoder's config, as the SD3 and FLUX pipelines compute
    it (8 without an autoencoder, as they default). Any config class reads the file: the autoencoder's own class
    may live outside diffusers (the toy models')."""
    from diffusers import AutoencoderKL

    if not isinstance(index.get("vae"), list | tuple) or index["vae"][0] is None:
        return 8
    channels = AutoencoderKL.load_config(location, subfolder="vae").get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else 8


def _toy_tokenizer(location: str, index: dict[str, Any]) -> Any:
    """The model's first tokenizer when its folder is at hand (a toy model's vocabulary check needs it; the check
    itself, :func:`attnctl.cli.check_vocabulary`, tells a toy tokenizer from a real one), else ``None``."""
    from pathlib import Path

    folder = Path(location) / "tokenizer"
    if not folder.is_dir() or "tokenizer" not in index:  # a hub model: real tokenizers take any word
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None
