"""SoftPAG: head-level perturbed-attention guidance with a soft strength, on fused kernels.

For every selected (site, head) and every batch row whose role is ``"perturbed"``, the attention map is
moved toward a target map ``T`` with strength ``u`` (a schedule in [0, 1])::

    A ← (1 − u)·A + u·T          ⇒          out ← (1 − u)·out + u·(T @ V)

because attention output is linear in the map. So the fused kernel computes ``out = A @ V`` as usual and
only ``T @ V`` has to be added — each target has a closed form that never builds an N×N map:

============  =========================================================================================
scope         target ``T @ V`` per query row ``i`` (row set: every row for ``joint``, image rows for
              ``image``; text rows are untouched in ``image`` scope)
============  =========================================================================================
joint         identity: ``v_i``  ·  uniform: ``mean_k v_k`` over all keys  ·  mean_query:
              ``softmax(q̄·Kᵀ/√d) @ V`` with ``q̄`` the mean query of the row set (one extra query/head)
image         image query ``i`` attends, by one softmax, to the text keys with their own logits and to
              the image keys through the target's block: identity — only itself (logit ``q_i·k_i/√d``;
              diffusers' SD3 PAG); uniform — every image key with the row's mean image logit; mean_query —
              the image keys with the mean image query's logits. The image block collapses to one
              "virtual key" (logit ``c_i``, value ``w_i``), combined with fused attention over the T text
              keys by log-sum-exp: O(N_img·T) compute, O(N_img) extra memory.
============  =========================================================================================

The perturbed rows come from the pipelines (``AttnCtlSD3Pipeline`` / ``AttnCtlFluxPipeline``), which append
copies of the conditional rows as ``"perturbed"`` rows and apply the guidance
``ε = ε_cfg + w·(ε_cond − ε_ptb)`` with ``w = scale`` (see :mod:`attnctl.guidance`). Algorithm and credits:
``docs/softpag.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_serializer, field_validator

from ..errors import ConfigError, SiteError
from ..processors.attend import MAX_CHUNK_ELEMS, fused_attention_with_lse
from ..processors.contributions import MixContext, OutputMix, Selection
from ..schedules import ScheduleField, bounded
from ..sites import HeadSet, Site, head_numbers
from .base import Control, ControlConfig, RunState, register

Target = Literal["identity", "uniform", "mean_query"]
Scope = Literal["joint", "image"]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
"""Where shipped head-set presets live (``attnctl/presets/<name>.json``)."""


def load_heads(spec: Any) -> HeadSet | list[str]:
    """Normalise a ``heads=`` value: a :class:`HeadSet` (kept), its JSON dict, a plain mapping
    ``{site name: [head, ...]}``, a path to a preset JSON file (``*.json``, any case; surrounding spaces
    ignored; a bare file name is looked up in the working directory, then among the shipped presets in
    ``attnctl/presets/``, a path with a folder only where it points — a mistyped folder must not quietly load
    a shipped preset of the same name), or one / several site-and-head selectors (``"L3H1"``,
    ``"transformer_blocks.3.attn/H0,2"``, ``"transformer_blocks.5"`` for all heads of a block)."""
    if isinstance(spec, HeadSet):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        text = str(spec).strip()
        path = Path(text)
        bare = not any(sep in text for sep in {"/", os.sep, os.altsep} - {None})
        shipped = PRESETS_DIR / path.name
        if not path.exists() and bare and shipped.exists():
            path = shipped
        if not path.exists():
            fix = "give the path of a preset JSON file (as written by HeadSet.save)"
            if shipped.exists():
                fix += f", or the bare name {path.name!r} for the shipped preset of that name"
            raise SiteError(f"head-set preset {text!r} does not exist", fix=fix)
        try:
            return HeadSet.load(path)
        except ValueError as e:
            raise SiteError(f"head-set preset {str(path)!r} is not a valid preset: {e}") from None
    if isinstance(spec, Mapping):
        if "heads" in spec and isinstance(spec["heads"], Mapping):
            return HeadSet.from_json(dict(spec))
        return HeadSet({str(k): head_numbers(str(k), v) for k, v in spec.items()})
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        return [s.strip() for s in spec]
    raise SiteError(
        f"heads={spec!r} is not a head selection",
        fix="pass a HeadSet, a preset path (*.json), or selectors such as ['L3H1', 'L5H0:4', "
        "'transformer_blocks.2.attn/H1,3']",
    )


class SoftPAGConfig(ControlConfig):
    heads: Any = Field(..., description="HeadSet, preset path (*.json), or selectors ('L3H1', 'L4H0:2', ...)")
    u: bounded(0, 1) = Field(1.0, description="interpolation strength toward the target map, a schedule in [0, 1]")
    target: Target = Field("identity", description="identity (PAG), uniform (SoftUG) or mean_query (SoftSEG)")
    scope: Scope = Field("joint", description="joint: the whole joint map (paper's code); image: image→image "
                                              "block only (diffusers' SD3 PAG)")
    scale: ScheduleField = Field(3.0, description="guidance weight w of ε_cfg + w·(ε_cond − ε_ptb), a schedule")
    branch: int | None = Field(None, ge=0, description="act only on rows with role 'perturbed[<branch>]' (a search "
                                                       "batching several candidate sets); None: every perturbed row")

    @field_validator("heads", mode="before")
    @classmethod
    def _heads(cls, v: Any) -> Any:
        return load_heads(v)

    @field_serializer("heads")
    def _dump_heads(self, v: Any) -> Any:
        return v.to_json() if isinstance(v, HeadSet) else list(v)

    @field_serializer("u", "scale")
    def _dump_schedule(self, v: Any) -> Any:
        return v.to_json()


@register
class SoftPAG(Control):
    """Interpolate the attention maps of chosen heads toward a target on the perturbed batch rows.

    ``SoftPAG(heads=["L3H1", "L5H0:4"], u=0.5, target="identity", scope="joint", scale=3.0)``.
    ``u = 1``, ``target="identity"``, ``scope="image"`` on all heads of a layer is diffusers' layer-level
    PAG for SD3. A search builds one per candidate set cheaply: ``SoftPAG(heads=HeadSet({...}))`` (or
    :meth:`from_pairs`) does no model work; sites and heads resolve once when a controller binds it. To score
    several candidate sets in one batched forward, give each its own ``branch=i`` and the batch rows the roles
    ``"perturbed[i]"`` (``Controller(..., roles=["cond", "perturbed[0]", "perturbed[1]", ...])``).
    """

    kind = "softpag"
    gates = ("scale", "u")
    Config = SoftPAGConfig
    perturbed_branch = True
    """Asks the pipelines for a ``"perturbed"`` copy of the conditional rows (see :mod:`attnctl.guidance`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head_set: HeadSet | None = self.config.heads if isinstance(self.config.heads, HeadSet) else None
        self._heads: dict[str, tuple[int, ...]] = {}
        self._head_index: dict[str, None | slice | tuple[int, ...]] = {}

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, int]], **settings: Any) -> SoftPAG:
        """``SoftPAG`` over ``[(site name, head), ...]`` (e.g. a search's current set plus one candidate)."""
        return cls(heads=HeadSet.from_pairs(pairs), **settings)

    # -- lifecycle ----------------------------------------------------------------------------------
    def bind(self, controller) -> None:
        """Resolve the heads against this model (again at each run's start: a head set assigned since counts)."""
        super().bind(controller)  # family check
        heads = self.config.heads
        head_set = heads if isinstance(heads, HeadSet) else HeadSet.parse(controller.sites, heads)
        resolved = head_set.resolve(controller.sites)
        resolved = {site: hs for site, hs in resolved.items() if hs}
        if not resolved:
            raise SiteError("SoftPAG selects no heads", fix="give at least one head, e.g. heads=['L3H1']")
        self.head_set = head_set
        self._heads = {site.name: hs for site, hs in resolved.items()}
        self.sites = sorted(resolved, key=lambda s: s.index)
        self._site_names = frozenset(self._heads)
        self._head_index.clear()

    def begin_run(self, state: RunState) -> None:
        self.config.u.reset()
        self.config.scale.reset()

    def heads_at(self, site: Site | str) -> tuple[int, ...]:
        """The selected heads of a site (after :meth:`bind`)."""
        return self._heads.get(site if isinstance(site, str) else site.name, ())

    # -- the schedules ------------------------------------------------------------------------------
    def strength(self, step: int, num_steps: int) -> float:
        """``u`` at this step."""
        return self.config.u(step, num_steps)

    def guidance_weight(self, step: int, num_steps: int) -> float:
        """``w`` at this step (0 when ``u`` is 0: the perturbed branch would equal the conditional one)."""
        if self.strength(step, num_steps) == 0:
            return 0.0
        return self.config.scale(step, num_steps)

    # -- the attention contribution ----------------------------------------------------------------
    def contribute(self, call, q, k, v, state: RunState):
        u = self.strength(*state.schedule_step)
        if u == 0:
            return []
        role = "perturbed" if self.config.branch is None else f"perturbed[{self.config.branch}]"
        batch = state.rows_with((role,), call.batch, call.device)
        if batch is not None and len(batch) == 0:
            return []
        heads = self._head_spec(call.site)
        if self.config.scope == "joint":
            fn, rows = _JOINT[self.config.target], None
        else:
            img, txt, target = call.image_slice(), call.text_slice(), self.config.target

            def fn(o, q_, k_, v_, u_, ctx):
                return image_scope_mix(o, q_, k_, v_, u_, target, img, txt, mask=ctx.mask, backend=ctx.backend)

            rows = img
        # The heads are picked inside the mix (``_on_heads``), not through ``Selection.heads``: the generic
        # head gather/scatter of ``attend`` costs more than the whole mix at real layer sizes on CPU.
        # The joint identity target reads each row's own value only, so no mask can change it; every other form
        # reads other keys and takes the call's mask (and backend) from ``attend``.
        identity = self.config.scope == "joint" and self.config.target == "identity"
        return [OutputMix(_on_heads(fn, heads, u, context=not identity), Selection(batch, rows, None),
                          mask_free=identity, context=not identity)]

    def _head_spec(self, site: Site) -> None | slice | tuple[int, ...]:
        """The site's heads as ``None`` (all), a slice (evenly spaced: a view, no copy) or a tuple."""
        spec = self._head_index.get(site.name)
        if spec is None and site.name not in self._head_index:
            hs = self._heads[site.name]
            steps = {b - a for a, b in zip(hs, hs[1:], strict=False)}
            if len(hs) == site.heads:
                spec = None
            elif len(steps) <= 1:
                spec = slice(hs[0], hs[-1] + 1, steps.pop() if steps else 1)
            else:
                spec = hs
            self._head_index[site.name] = spec
        return spec


def _take_heads(x: torch.Tensor, heads: slice | tuple[int, ...]) -> torch.Tensor:
    if isinstance(heads, slice):
        return x[:, :, heads]  # a view
    return torch.stack([x[:, :, h] for h in heads], dim=2)


def _on_heads(fn, heads: None | slice | tuple[int, ...], u: float, context: bool = False):
    """``fn(out, q, k, v, u[, ctx])`` applied to ``heads`` only; the other heads of ``out`` come back unchanged.
    With ``context`` the mix takes attend's :class:`MixContext` and hands ``fn`` its mask on those heads."""
    if heads is None:
        if context:
            return lambda out, q, k, v, ctx: fn(out, q, k, v, u, ctx).to(out.dtype)
        return lambda out, q, k, v: fn(out, q, k, v, u).to(out.dtype)

    def mix(out, q, k, v, ctx=None):
        extra = ()
        if context:
            mask = ctx.mask
            if mask is not None and mask.shape[2] > 1:  # a per-head mask (a size-1 axis broadcasts)
                mask = _take_heads(mask, heads)
            extra = (MixContext(mask, ctx.backend),)
        new = fn(*(_take_heads(x, heads) for x in (out, q, k, v)), u, *extra).to(out.dtype)
        if isinstance(heads, slice):
            return torch.slice_scatter(out, new, dim=2, start=heads.start, end=heads.stop, step=heads.step)
        res = out.clone()
        for j, h in enumerate(heads):
            res[:, :, h] = new[:, :, j]
        return res

    return mix


# ------------------------------------------------------------------------------------------- closed forms
# ``out`` is (b, rows, h, d) for the mixed rows; q, k, v are (b, S, h, d) for the whole sequence. Small
# per-row factors in float32; few passes over the (rows, h, d) tensors. ``mask`` (the call's attention mask, see
# ``MixContext``) is additive, (b|1, rows|1, h|1, keys) over the mixed rows: a target map gives no weight to a key
# the mask removes, and an additive mask enters each target's logits as it enters the attention's.


def _lerp(out: torch.Tensor, target: torch.Tensor, u: float) -> torch.Tensor:
    """``(1 − u)·out + u·target`` (``target`` may broadcast over rows)."""
    if u == 1:
        return target.expand_as(out)
    return torch.lerp(out.float(), target.float(), u)


def _softmax_rows(s0: torch.Tensor, mask: torch.Tensor | None, v: torch.Tensor,
                  max_chunk_elems: int = MAX_CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(s0 + mask) @ v`` and its log-sum-exp for logits ``s0`` ``(b, 1, h, n)`` shared by every query row,
    the rows told apart only by ``mask`` ``(b|1, r|1, h|1, n)``: output ``(b, r|1, h, d)``, LSE ``(b, r|1, h)``,
    float32, in query chunks of bounded size. A row whose keys are all masked gets a zero output and LSE ``-inf``."""
    if mask is None:
        mask = s0.new_zeros((1, 1, 1, 1))
    b, _, h, n = s0.shape
    chunk = max(1, max_chunk_elems // max(1, b * h * n))
    outs, lses = [], []
    for r0 in range(0, mask.shape[1], chunk):
        s = s0 + mask[:, r0 : r0 + chunk]
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.clamp(min=torch.finfo(lse.dtype).min)[..., None])  # 0, not NaN, on a masked-out row
        outs.append(torch.einsum("brhn,bnhd->brhd", p, v.float()))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _one_query_logits(qbar: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Logits ``(b, 1, h, N)`` of one query per (batch, head) ``(b, h, d)`` over ``k`` ``(b, N, h, d)``."""
    return (torch.einsum("bhd,bnhd->bhn", qbar, k.float()) / math.sqrt(qbar.shape[-1]))[:, None]


def _mean_query(q: torch.Tensor, mask: torch.Tensor | None, pos: slice) -> torch.Tensor:
    """The mean query ``(b, h, d)`` of the rows ``q`` ``(b, n, h, d)``, whose keys are at positions ``pos`` of the
    mask ``(b|1, rows|1, h|1, keys)``: a position whose key the mask removes for every row (a padding token) is left
    out of the mean, as it is absent from every map."""
    if mask is None:
        return q.float().mean(1)
    present = (~torch.isneginf(mask[..., pos]).all(dim=1)).float()  # (b|1, h|1, n)
    present = present / present.sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("bhn,bnhd->bhd", present.expand(q.shape[0], q.shape[2], -1), q.float())


def joint_identity(out, q, k, v, u: float):
    """``A ← (1−u)A + u·I``: each row's own value."""
    return _lerp(out, v, u)


def joint_uniform(out, q, k, v, u: float, ctx: MixContext | None = None):
    """``A ← (1−u)A + u·(1/N)``: the mean of all values (under a mask, ``softmax(mask)``: the unmasked keys')."""
    mask = None if ctx is None else ctx.mask
    if mask is None:
        return _lerp(out, v.float().mean(1, keepdim=True), u)
    b, n, h, _ = k.shape
    target, _ = _softmax_rows(k.new_zeros((b, 1, h, n), dtype=torch.float32), mask, v)
    return _lerp(out, target, u)


def joint_mean_query(out, q, k, v, u: float, ctx: MixContext | None = None):
    """``A ← (1−u)A + u·softmax(q̄Kᵀ/√d)``: every row the mean query's distribution, under the row's mask (``q̄`` the
    mean over the positions the mask leaves present)."""
    mask = None if ctx is None else ctx.mask
    target, _ = _softmax_rows(_one_query_logits(_mean_query(q, mask, slice(None)), k), mask, v)
    return _lerp(out, target, u)


_JOINT = {"identity": joint_identity, "uniform": joint_uniform, "mean_query": joint_mean_query}


def _own_key_mask(m_img: torch.Tensor) -> torch.Tensor:
    """What the mask of the image rows over the image keys, ``(b|1, n_img|1, h|1, n_img)``, puts on each row's
    own key, as ``(b|1, n_img, h|1)``."""
    if m_img.shape[1] == 1:  # the same for every row: entry i of the key axis is row i's own key
        return m_img[:, 0].transpose(1, 2)
    return torch.diagonal(m_img, dim1=1, dim2=3).transpose(1, 2)


def image_scope_mix(out, q, k, v, u: float, target: str, img: slice, txt: slice, *,
                    mask: torch.Tensor | None = None, backend=None):
    """Image rows: ``(1−u)·out + u·target``, the target being attention over the text keys (own logits) and
    the image block replaced per ``target``, collapsed to one virtual key (logit ``c``, value ``w``) and
    combined with fused attention over the text keys by log-sum-exp::

        target = a·w + b·o_text,   a = exp(c − L),  b = exp(lse_text − L),  L = logaddexp(c, lse_text)

    Under a mask the text pass applies the mask's text part, and the image block its image part: identity adds
    the mask on the row's own key; uniform gives image key ``j`` the logit ``q_i·k̄_i/√d + mask_ij``, with ``k̄_i``
    the keys' mean as the mask weighs them (``softmax_j mask_ij``: the unmasked keys' mean), so the virtual key is
    ``q_i·k̄_i/√d + LSE_j mask_ij`` and its value the same mean of the values; mean_query adds the mask to the mean
    image query's logits, the mean taken over the image positions the mask leaves present.
    """
    qi, ki, vi = q[:, img], k[:, img], v[:, img]
    nb, n_img, h, d = qi.shape
    m_img = None if mask is None else mask[..., img]
    if target == "identity":  # only the query's own key
        c = torch.einsum("bnhd,bnhd->bnh", qi.float(), ki.float()) / math.sqrt(d)  # (b, N_img, h)
        if m_img is not None:
            c = c + _own_key_mask(m_img)
        w = vi
    elif target == "uniform" and m_img is None:  # every image key with the row's mean image logit
        c = torch.einsum("bnhd,bhd->bnh", qi.float(), ki.float().mean(1)) / math.sqrt(d) + math.log(n_img)
        w = vi.float().mean(1, keepdim=True)
    elif target == "uniform":  # the same over the keys the mask leaves each row
        means, lse_m = _softmax_rows(qi.new_zeros((nb, 1, h, n_img), dtype=torch.float32), m_img,
                                     torch.cat([ki, vi], dim=-1))
        c = (qi.float() * means[..., :d]).sum(-1) / math.sqrt(d) + lse_m
        w = means[..., d:]
    elif target == "mean_query":  # the image keys with the mean image query's logits
        w, lse_q = _softmax_rows(_one_query_logits(_mean_query(qi, mask, img), ki), m_img, vi)
        c = lse_q.expand(-1, n_img, -1)
    else:
        raise ConfigError(f"unknown SoftPAG target {target!r}")
    if txt.stop - txt.start == 0:  # image-only attention (SD3.5 attn2): the virtual key is all there is
        return _lerp(out, w, u)
    m_txt = None if mask is None else mask[..., txt].permute(0, 2, 1, 3)  # the dispatcher's (b, h, rows, keys)
    o_t, lse_t = fused_attention_with_lse(qi, k[:, txt], v[:, txt], attn_mask=m_txt, backend=backend)
    if m_txt is not None:  # a row whose text keys are all masked has no text output (a kernel may give NaN)
        o_t = torch.where(torch.isfinite(lse_t)[..., None], o_t, 0)
    lse = torch.logaddexp(c, lse_t)
    a = (torch.exp(c - lse) * u)[..., None]  # small (b, N_img, h, 1) factors, u folded in
    b = (torch.exp(lse_t - lse) * u)[..., None]
    res = o_t.float() * b
    res.addcmul_(w.float(), a)
    if u != 1:
        res.add_(out.float(), alpha=1 - u)
    return res
