"""Attention heatmaps over images: a perceptual colour map, overlays, and crisp upscaling of tiny images.

Maps arrive at the resolution of the image token grid (8×8 for the toy models, 64×64 for SD3 at 1024²),
are upsampled smoothly to the displayed size, coloured with :func:`colormap` and blended over the image
with an opacity that grows with attention, so quiet regions keep the picture visible.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a magma-like map (dark violet -> red -> orange -> pale yellow), interpolated linearly.
_ANCHORS = np.array([
    [0.00, 4, 4, 22],
    [0.20, 60, 15, 110],
    [0.40, 140, 35, 125],
    [0.60, 222, 73, 104],
    [0.80, 252, 150, 90],
    [1.00, 252, 245, 190],
], dtype=np.float64)

DISPLAY_SIDE = 384
"""Images smaller than this are shown upscaled (pixel-exact) to about this size."""


def colormap(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] (any shape) → uint8 RGB (shape + (3,))."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    out = np.empty(v.shape + (3,), dtype=np.float64)
    for c in range(3):
        out[..., c] = np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c + 1])
    return np.round(out).astype(np.uint8)


def normalize(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(np.asarray(m, dtype=np.float64))
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def display_size(width: int, height: int, side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """An integer upscale of (width, height) to at least about ``side`` on the long edge (never downscale)."""
    factor = max(1, side // max(width, height, 1))
    return width * factor, height * factor


def upscale(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Tiny images made big enough to see, pixel-exact (nearest neighbour); large ones unchanged."""
    size = display_size(*image.size, side=side)
    return image if size == image.size else image.resize(size, Image.Resampling.NEAREST)


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map (h, w) with values in [0, 1] resized smoothly to ``size`` = (width, height)."""
    img = Image.fromarray(np.clip(np.nan_to_num(np.asarray(m, dtype=np.float32)), 0.0, 1.0))
    return np.clip(np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.float64), 0.0, 1.0)


def overlay(image: Image.Image, m: np.ndarray, strength: float = 0.75, side: int = DISPLAY_SIDE) -> Image.Image:
    """The image (upscaled for display) with the attention map ``m`` coloured over it."""
    base = upscale(image.convert("RGB"), side)
    heat = resize_map(m, base.size)
    rgb = np.asarray(base, dtype=np.float64)
    gray = rgb.mean(axis=2, keepdims=True)
    muted = 0.45 * rgb + 0.25 * gray  # darker and less saturated, so the colour map reads on top
    alpha = (strength * (0.25 + 0.75 * heat))[..., None]
    out = (1 - alpha) * muted + alpha * colormap(heat).astype(np.float64)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def map_tile(m: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The map alone in the colour map, at ``size``."""
    return Image.fromarray(colormap(resize_map(m, size)))


def colorbar(width: int = 256, height: int = 10) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, width)[None, :].repeat(height, axis=0)
    return Image.fromarray(colormap(ramp))
