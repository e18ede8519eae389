"""A run's attention probes as image files beside its images.

``attnctl generate`` and batch items write, for every probe among their controls, one heatmap per word and image:
``<image stem>.attention-<word>.png`` (the probe's map of that image's row, coloured over the image, as the UI shows
it). So a probe given on the command line or in a batch file leaves what it measured, not only a line of metadata.
The names are known before the run (:func:`map_names`), so a batch can plan, resume and redo them with the image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AttnCtlError


def _probes(controls: Sequence[Any]) -> list[Any]:
    from .controls.probe import AttentionProbe

    return [c for c in controls if isinstance(c, AttentionProbe)]


def _columns(probe: Any) -> list[str]:
    """The names of the probe's maps, in order: its words, or its token positions."""
    cfg = probe.config
    if cfg.words is not None:
        return list(cfg.words)
    if cfg.tokens is not None:
        return [str(t) for t in cfg.tokens]
    raise AttnCtlError("an attention probe without words or tokens maps every text token, and from the command line "
                       "or a batch file that would be a file per token",
                       'give it words, e.g. {"kind": "probe", "words": ["circle"]}, or tokens')


def check_probes(controls: Sequence[Any]) -> None:
    """Refuse a probe whose maps cannot be written as files (one without words or tokens)."""
    for probe in _probes(controls):
        _columns(probe)


def map_names(controls: Sequence[Any], image_names: Sequence[str]) -> list[str]:
    """The heatmap files the probes among ``controls`` write for the images ``image_names``, in write order."""
    probes = _probes(controls)
    names = []
    for k, probe in enumerate(probes):
        tag = f"{k + 1}-" if len(probes) > 1 else ""  # several probes may map the same word
        for image in image_names:
            for column in _columns(probe):
                slug = re.sub(r"[^\w.-]+", "-", column).strip("-.") or "token"
                names.append(f"{Path(image).stem}.attention-{tag}{slug}.png")
    return names


def map_images(controls: Sequence[Any], image_names: Sequence[str], images: Sequence[Any]
               ) -> list[tuple[str, Any, int]]:
    """``(file name, PIL image, index of the image it maps)`` of every heatmap of :func:`map_names`, after the run:
    probe row ``i`` is image ``i`` (the conditional rows, one per image made)."""
    from .ui.heatmap import normalize, overlay

    out = []
    names = iter(map_names(controls, image_names))
    for probe in _probes(controls):
        maps = probe.word_maps()
        rows = next(iter(maps.values())).shape[0]
        if rows != len(images):
            raise AttnCtlError(f"the probe mapped {rows} batch rows and the run made {len(images)} images, so its maps "
                               "cannot be told apart by image", 'keep the probe\'s roles at ["cond"] (the default)')
        for i, image in enumerate(images):
            for column in _columns(probe):
                out.append((next(names), overlay(image, normalize(maps[column][i].float().cpu().numpy())), i))
    return out
