"""How many images of the prompt one call makes for its controls: an epipolar control's cameras are its views.

Torch-free, so the command line, batch runs, the UI and the pipelines share one rule without importing a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ConfigError


def images_per_prompt(controls: Sequence[Any], images: int | None, references: Sequence[str] | None = None,
                      option: str = "--images") -> int:
    """``num_images_per_prompt`` of a call: ``images`` if given, else the cameras of an epipolar control (image
    ``i`` is camera ``i``'s view), else 1. An epipolar control needs a whole number of view sets; a reposition call
    makes one set of references and its scene. ``option`` is the name the user wrote, for the error."""
    views = sorted({c.views for c in controls if getattr(c, "kind", None) == "epipolar"})
    if len(views) > 1:
        raise ConfigError(f"epipolar controls with {' and '.join(map(str, views))} cameras in one run",
                          "give every epipolar control of a run the same cameras (or rig)")
    n = int(images) if images is not None else (views[0] if views else 1)
    if n < 1:
        raise ConfigError(f"{option} {n}: a call makes at least one image", f"pass {option} 1 or more")
    if views and n % views[0]:
        raise ConfigError(f"{option} {n} with an epipolar control of {views[0]} cameras",
                          f"make {views[0]} images (image i is camera i's view), a multiple of {views[0]} for "
                          f"several sets, or leave {option} out")
    if n > 1 and references:
        what = "an epipolar control's views" if views else f"{option} {n}"
        raise ConfigError(f"{what} with reference prompts: a reposition call makes one set of references and its "
                          "scene", "make the views and the reposition in separate runs" if views
                          else "make one image per call (another seed each)")
    return n
