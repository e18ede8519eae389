"""Subject masks from attention maps, their boxes, and the relocation of one subject's tokens into another box.

The pieces of IR-Diffusion's isolation and reposition attention that do not touch attention itself
(:mod:`attnctl.controls.isolation` uses them):

- :func:`otsu_masks` — a subject's mask is where its word's attention map is above Otsu's threshold (the threshold
  that maximises the variance between the two classes it splits the map into), as ConsiStory and IR-Diffusion's
  fallback do with cross-attention;
- :func:`mask_box` — the token box ``(r0, r1, c0, c1)`` (end exclusive) of a mask;
- :func:`relocation` — for every token of a target grid, the token of the source grid it takes after the source
  mask's box is resized (nearest) onto the target mask's box, and whether it is inside the source mask.
"""

from __future__ import annotations

import torch


def otsu_masks(maps: torch.Tensor) -> torch.Tensor:
    """Boolean masks of the maps ``(..., N)``: ``map > t`` with each map's Otsu threshold ``t``.

    Over the sorted values ``v₁ ≤ … ≤ v_N`` the split after ``k`` values has between-class variance
    ``w₀·w₁·(μ₀ − μ₁)²`` (``w`` the class shares, ``μ`` their means); the threshold is ``v_k`` at the best ``k``.
    A constant map, or one of a single value (a one-token image), has no split and gives an empty mask."""
    v, _ = maps.float().sort(dim=-1)
    n = v.shape[-1]
    if n < 2:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    k = torch.arange(1, n, device=v.device, dtype=v.dtype)  # values in the low class
    low = v.cumsum(-1)[..., :-1]
    total = v.sum(-1, keepdim=True)
    mu0, mu1 = low / k, (total - low) / (n - k)
    between = (k / n) * (1 - k / n) * (mu0 - mu1) ** 2
    between = torch.where(v[..., 1:] > v[..., :-1], between, torch.zeros_like(between))  # only between distinct values
    best = between.argmax(-1, keepdim=True)
    threshold = v.gather(-1, best)
    flat = (between.amax(-1, keepdim=True) <= 0)  # no split at all
    return (maps.float() > threshold) & ~flat


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(r0, r1, c0, c1)`` of the true entries of an ``(h, w)`` mask (ends exclusive); ``None`` when empty."""
    rows = mask.any(1).nonzero().flatten().tolist()
    cols = mask.any(0).nonzero().flatten().tolist()
    if not rows:
        return None
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def relocation(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where each token of the target grid comes from when the ``source`` mask's box is resized onto the ``target``
    mask's box (both ``(h, w)`` bools on one grid): ``(index, valid)``, flat over the grid — ``index[p]`` is the
    source token shown at target token ``p`` (nearest neighbour), ``valid[p]`` whether ``p`` is inside the target box
    and its source token inside the source mask. ``None`` when either mask is empty."""
    sb, tb = mask_box(source), mask_box(target)
    if sb is None or tb is None:
        return None
    h, w = target.shape
    dev = target.device
    sr0, sr1, sc0, sc1 = sb
    tr0, tr1, tc0, tc1 = tb
    ys = torch.arange(h, device=dev)
    xs = torch.arange(w, device=dev)
    # nearest source row / column of each target row / column inside the box: the centre of the target cell,
    # mapped linearly from the target box onto the source box
    src_y = (sr0 + ((ys - tr0).float() + 0.5) * (sr1 - sr0) / (tr1 - tr0)).floor().long().clamp(sr0, sr1 - 1)
    src_x = (sc0 + ((xs - tc0).float() + 0.5) * (sc1 - sc0) / (tc1 - tc0)).floor().long().clamp(sc0, sc1 - 1)
    in_y = (ys >= tr0) & (ys < tr1)
    in_x = (xs >= tc0) & (xs < tc1)
    index = (src_y[:, None] * w + src_x[None, :]).flatten()
    inside = (in_y[:, None] & in_x[None, :]).flatten()
    valid = inside & source.flatten()[index]
    return index, valid
