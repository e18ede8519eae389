"""Image sizes a model takes, in pixels: the multiple its sides must be, the largest its position table covers,
and the smallest attnctl takes anywhere. Light to import (the CLI's option checks read it before torch loads)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

SMALLEST_SIDE = 8
"""The smallest image side in pixels any command takes (the CLI, batch files and the UI alike); a model may need
more (:func:`size_multiple`)."""


def check_image_size(pipe: Any, width: int, height: int) -> None:
    """Refuse an image the model cannot encode as it is: sides not multiples of :func:`size_multiple`, below
    :data:`SMALLEST_SIDE`, or past :func:`largest_side`. ``pipe`` may be a
    :class:`~attnctl.skeleton.PipelineSkeleton`."""
    need = size_multiple(pipe)
    if min(height, width) < SMALLEST_SIDE:
        raise ConfigError(f"the image is {width}×{height} px, smaller than the smallest side attnctl takes, "
                          f"{SMALLEST_SIDE} px", fix=f"give an image at least {SMALLEST_SIDE} px a side")
    if height % need or width % need:
        raise ConfigError(f"the image is {width}×{height} px, and this model needs sides that are multiples of {need}",
                          fix=f"resize or crop the image to multiples of {need} px first")
    top = largest_side(pipe)
    if top is not None and max(height, width) > top:
        raise ConfigError(f"the image is {width}×{height} px, and this model's largest side is {top} px (its "
                          "position table)", fix=f"resize the image to at most {top} px a side")


def size_multiple(pipe: Any) -> int:
    """What the model's image sides in pixels must be multiples of: the autoencoder's factor times the patch
    size (FLUX packs 2×2 latent patches). SD3 refuses other sizes; FLUX silently rounds them down."""
    from .sites import family_of

    patch = 2 if family_of(pipe.transformer) == "flux" else int(pipe.transformer.config.patch_size)
    return int(pipe.vae_scale_factor) * patch


def largest_side(pipe: Any) -> int | None:
    """The largest image side in pixels the model takes (SD3's learned position table is ``pos_embed_max_size``
    patches wide); ``None`` where none is set (FLUX's rotary positions)."""
    cfg = pipe.transformer.config
    patches = getattr(cfg, "pos_embed_max_size", None)
    return None if patches is None else int(patches) * int(cfg.patch_size) * int(pipe.vae_scale_factor)
