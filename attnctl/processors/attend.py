"""Attention with controls: the fused kernel where the math allows, explicit softmax only where needed.

Everything here works on diffusers' dispatcher layout ``(batch, seq, heads, d)`` and is device- and
dtype-agnostic: logits, probabilities and log-sum-exps are computed in float32, outputs are returned in
the dtype of ``q``.

Paths, cheapest first:

- no contribution: ``dispatch_attention_fn`` — exactly the stock call;
- only key biases, probes and output mixes: one fused call that also returns the log-sum-exp (LSE) of every
  query row, then O(rows · cols) corrections — for a bias ``b`` on columns ``C``::

      w_c   = p_c · (exp(b_c) − 1),   p_c = exp(s_c − lse)
      out'  = (out + Σ_c w_c v_c) / (1 + Σ_c w_c)
      lse'  = lse + log(1 + Σ_c w_c)

- dense biases or extra keys: an explicit softmax for the selected batch rows and heads, in query-row chunks
  of at most ``max_chunk_elems`` logits; the other heads keep the fused result;
- shared values (an edit's target rows reading the source rows' values): the value rows are replaced first, and the
  call then takes whichever path the other contributions need (:func:`share_values`);
- partial attention over keys outside the call (computed by the control, e.g. sparsely): merged into the rows'
  result by the two log-sum-exps (:func:`merge_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)

from ..errors import UnsupportedModelError
from .contributions import (
    Contribution,
    DenseBias,
    ExtraKV,
    KeyBias,
    MixContext,
    OutputMix,
    PartialAttention,
    Probe,
    Selection,
    SharedValues,
    host_values,
    index_tensor,
)

MAX_CHUNK_ELEMS = 1 << 24
"""Upper bound on the number of float32 logits the explicit path holds at once (64 MiB)."""

# Backends whose diffusers implementation returns the LSE when asked (layout: batch, heads, seq).
_LSE_FROM_DISPATCH = {
    AttentionBackendName.FLASH,
    AttentionBackendName._FLASH_3,
    AttentionBackendName.FLASH_HUB,
    AttentionBackendName._FLASH_3_HUB,
}
_LSE_KERNEL = {
    "cpu": {AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_FLASH},
    "cuda": {AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_EFFICIENT},
}
"""Backends whose kernel, per device, is the PyTorch op :func:`fused_attention_with_lse` calls for the output and
the LSE at once."""


def backend_name(backend: str | AttentionBackendName | None) -> AttentionBackendName:
    """The backend a dispatcher call with ``backend`` would use."""
    if backend is None:
        return _AttentionBackendRegistry.get_active_backend()[0]
    return backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(backend)


def fused_attention(q, k, v, *, attn_mask=None, backend=None, parallel_config=None) -> torch.Tensor:
    """The stock call: ``dispatch_attention_fn`` with the processor's backend."""
    return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=backend, parallel_config=parallel_config)


def chunked_lse(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                max_chunk_elems: int = MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Exact log-sum-exp of every query row over all keys, ``(B, S, H)`` float32, in bounded chunks."""
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    chunk = max(1, max_chunk_elems // max(1, B * H * k.shape[1]))
    kf = k.float().transpose(1, 2)  # (B, H, keys, D), converted once for every chunk
    out = []
    for r0 in range(0, S, chunk):
        s = (q[:, r0 : r0 + chunk].float().transpose(1, 2) * scale) @ kf.transpose(-1, -2)  # (B, H, rows, keys)
        if attn_mask is not None:  # the mask's rows of this chunk, in the dispatcher's (B, H, rows, keys) layout
            s = s + mask_logits(attn_mask, Selection(rows=slice(r0, r0 + chunk)), S, B, H, slice(None)).transpose(1, 2)
        out.append(torch.logsumexp(s, dim=-1).transpose(1, 2))
    return torch.cat(out, dim=1)


def fused_attention_with_lse(q, k, v, *, attn_mask=None, backend=None, parallel_config=None):
    """Fused attention that also returns the LSE of every query row as ``(B, S, H)`` float32.

    PyTorch's SDPA left to choose its kernel (the ``native`` backend), or the kernel chosen being the one used here
    (``_native_flash`` on CPU, ``_native_efficient`` on CUDA): the flash / efficient kernel computes the LSE anyway,
    so it costs nothing extra. Backends whose diffusers wrapper returns it (flash-attn 2/3): asked for. Any other
    backend — another native kernel chosen by name too (``_native_math``, ``_native_cudnn``...) — gives the output
    through diffusers' dispatcher, as chosen, and the LSE from a chunked exact computation.
    """
    name = backend_name(backend)
    if name in _LSE_KERNEL.get(q.device.type, ()) and attn_mask is None and parallel_config is None:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False)[:2]
            return out.transpose(1, 2), lse.transpose(1, 2).float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
            return out.transpose(1, 2), lse[..., : q.shape[1]].transpose(1, 2).float()
    if name in _LSE_FROM_DISPATCH and attn_mask is None:
        out, lse = dispatch_attention_fn(q, k, v, backend=backend, parallel_config=parallel_config,
                                         attention_kwargs={"return_lse": True})
        return out, lse.transpose(1, 2).float()
    out = fused_attention(q, k, v, attn_mask=attn_mask, backend=backend, parallel_config=parallel_config)
    return out, chunked_lse(q, k, attn_mask)


def softmax_part(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``qh`` ``(..., t, d)``, already scaled by ``1/√d``, over ``kh``, ``vh`` ``(..., u, d)``, with
    ``bias`` broadcastable to ``(..., t, u)`` (float, ``-inf`` removes a key; or bool, ``False`` removes it): the
    output ``(..., t, d)`` and the LSE ``(..., t)``, float32. A row whose every key is removed gets output 0 and LSE
    ``-inf``, so that :func:`merge_attention` leaves its other part as it is."""
    s = torch.matmul(qh.float(), kh.float().transpose(-1, -2))
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias
    return softmax_of_logits(s, vh)


def softmax_of_logits(s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_part` from float32 logits ``s`` ``(..., t, u)`` already made (and biased, ``-inf`` on a
    removed key), for a control whose bias depends on the logits themselves."""
    top = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min).detach()  # finite even for such a row
    p = (s - top).exp_()  # one chunk-sized temporary, not two
    total = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vh.float()) / total.clamp_min(torch.finfo(s.dtype).tiny)
    return out, (top + total.log()).squeeze(-1)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two disjoint sets of keys, from the attention over each: outputs ``(..., d)`` weighed by
    their rows' total mass, ``out = (e^lse_a·out_a + e^lse_b·out_b) / (e^lse_a + e^lse_b)``, and the LSE of the
    union, float32. A part with LSE ``-inf`` (no key) weighs nothing."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b).clamp_min(torch.finfo(torch.float32).min)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / total.clamp_min(
        torch.finfo(torch.float32).tiny)[..., None]  # two empty parts: output 0, LSE -inf
    return out, top + total.log()


# --------------------------------------------------------------------------------------- selections


def _norm_rows(rows: slice | None, S: int) -> tuple[int, int]:
    if rows is None:
        return 0, S
    r0, r1, step = rows.indices(S)
    if step != 1:
        raise ValueError("query row selections must be contiguous slices (step 1)")
    return r0, r1


def _idx(t: torch.Tensor | None, n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) if t is None else t.to(device=device, dtype=torch.long)


def _positions(sel: torch.Tensor | None, idx: torch.Tensor, n: int) -> torch.Tensor:
    """For each entry of ``idx``: its position inside the selection ``sel`` (``None`` = all of 0..n-1), or -1."""
    if sel is None:
        return idx.clone()
    pos = torch.full((n,), -1, dtype=torch.long, device=idx.device)
    pos[sel.to(idx.device)] = torch.arange(len(sel), device=idx.device)
    return pos[idx]


def _select(t: torch.Tensor, where: Selection, S: int) -> torch.Tensor:
    """``t[batch, rows, heads]`` for a ``(B, S, H, ...)`` tensor."""
    if where.batch is not None:
        t = t.index_select(0, where.batch.to(t.device))
    if where.rows is not None:
        r0, r1 = _norm_rows(where.rows, S)
        t = t[:, r0:r1]
    if where.heads is not None:
        t = t.index_select(2, where.heads.to(t.device))
    return t


def _put(t: torch.Tensor, where: Selection, value: torch.Tensor) -> torch.Tensor:
    """``t[batch, rows, heads] = value``: in place (``t`` is this call's own output, and a copy of the
    whole of it per contribution would dominate the cost), out of place only when autograd records."""
    B, S, H = t.shape[:3]
    value = value.to(t.dtype)
    r0, r1 = _norm_rows(where.rows, S)
    recorded = torch.is_grad_enabled() and (t.requires_grad or value.requires_grad)
    if where.heads is None and not recorded:
        view = t[:, r0:r1]
        if where.batch is None:
            view.copy_(value)
        else:
            view.index_copy_(0, where.batch.to(t.device), value)
        return t
    b = _idx(where.batch, B, t.device)
    r = torch.arange(r0, r1, device=t.device)
    h = _idx(where.heads, H, t.device)
    index = (b[:, None, None], r[None, :, None], h[None, None, :])
    return t.index_put(index, value) if recorded else t.index_put_(index, value)


def mask_logits(attn_mask: torch.Tensor | None, where: Selection, S: int, B: int, H: int,
                 cols: torch.Tensor | slice) -> torch.Tensor | None:
    """What the attention mask adds to the logits ``[batch, rows, heads, cols]`` of a selection: float32, ``-inf``
    on a masked key, broadcastable to ``(len(batch), rows, len(heads), len(cols))``; ``None`` without a mask.
    The mask follows the dispatcher: ``(B, keys)`` or ``(B|1, H|1, S|1, keys)``, boolean (True = attend) or
    additive."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.ndim == 2:
        m = m[:, None, None, :]
    elif m.ndim == 4 and m.shape[-2] > 1:
        r0, r1 = _norm_rows(where.rows, S)
        m = m[..., r0:r1, :]
    if where.batch is not None and m.shape[0] == B:
        m = m.index_select(0, where.batch.to(m.device))
    if where.heads is not None and m.shape[1] == H:
        m = m.index_select(1, where.heads.to(m.device))
    m = m[..., cols] if isinstance(cols, slice) else m.index_select(-1, cols.to(m.device))
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    return m.float().permute(0, 2, 1, 3)


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is free: on a GPU it would wait for the device (a sync per
    attention call), on the meta device (shape-only runs) there are none."""
    return t.device.type == "cpu"


def _has_values(t: torch.Tensor) -> bool:
    """False on the meta device (shape-only runs), where data-dependent shortcuts cannot be taken."""
    return t.device.type != "meta"


def _rows_among(sel: torch.Tensor | None, b: torch.Tensor, B: int) -> torch.Tensor | None:
    """Where each batch row of the selection ``sel`` (``None``: all ``B``) sits among the rows ``b``, as an index
    tensor, decided on the host (no sync); ``None`` when that cannot be told there or a row is not among ``b``."""
    have = tuple(range(B)) if sel is None else host_values(sel)
    among = host_values(b)
    if have is None or among is None:
        return None
    at = {row: i for i, row in enumerate(among)}
    if any(row not in at for row in have):
        return None
    return index_tensor([at[row] for row in have], b.device)


def _dense_whole(c: DenseBias, pos: torch.Tensor | None, r0: int, r1: int, h: torch.Tensor, S: int, H: int,
                 n_keys: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For the explicit path (every key in order): a ``DenseBias`` on every head of some of the explicit rows (an
    isolation band on the scene rows) is its own tensor, left to broadcast over the heads — no per-head gather of a
    chunk-sized tensor — with ``pos``, the positions of its rows among them (:func:`_rows_among`, found once per
    call). ``None`` when :func:`_block`'s general path is needed."""
    if c.where.heads is not None or len(h) != H or pos is None:
        return None
    cr0, cr1 = _norm_rows(c.where.rows, S)
    lo, hi = max(r0, cr0), min(r1, cr1)
    if lo >= hi:
        return None
    src = c.fn(lo, hi).float()
    if src.ndim != 4 or src.shape[-1] != n_keys or src.shape[2] not in (1, H) or src.shape[0] not in (1, len(pos)):
        return None
    if (lo, hi) == (r0, r1):
        return src, pos
    out = src.new_zeros((src.shape[0], r1 - r0, src.shape[2], n_keys))
    out[:, lo - r0 : hi - r0] = src
    return out, pos


def _add_rows(s: torch.Tensor, blk: torch.Tensor, pos: torch.Tensor) -> None:
    """``s[pos] += blk`` in place, ``s`` being the logits ``(batch rows, rows, heads, keys)`` of the explicit path
    and ``pos`` the positions of ``blk``'s batch rows among them: a plain add when they are all of them, in order."""
    if host_values(pos) == tuple(range(s.shape[0])):
        s += blk
    else:
        s.index_add_(0, pos, blk.expand(len(pos), *s.shape[1:]))


_DENSE_PART = 1 << 22
"""Bias entries (batch rows × rows × keys) a dense bias makes at a time where only some columns are asked for."""


def _block(c: KeyBias | DenseBias, b: torch.Tensor, r0: int, r1: int, h: torch.Tensor,
           cols: torch.Tensor, B: int, S: int, H: int, n_keys: int) -> torch.Tensor | None:
    """The additive bias ``c`` puts on logits ``[b, r0:r1, h, cols]`` (float32), or ``None`` if none."""
    cr0, cr1 = _norm_rows(c.where.rows, S)
    lo, hi = max(r0, cr0), min(r1, cr1)
    if lo >= hi:
        return None
    bp = _positions(c.where.batch, b, B)
    hp = _positions(c.where.heads, h, H)
    nb = B if c.where.batch is None else len(c.where.batch)
    nh = H if c.where.heads is None else len(c.where.heads)
    if isinstance(c, KeyBias):
        cp = _positions(c.cols, cols, n_keys)
        src = c.bias.float().expand(nb, cr1 - cr0, nh, len(c.cols))[:, lo - cr0 : hi - cr0]
    else:  # made a few rows at a time, each part cut to the asked columns at once: never a rows × keys block
        step = max(1, _DENSE_PART // max(n_keys * nb, 1))  # each part holds every batch row the bias is on
        parts = []
        for a in range(lo, hi, step):
            part = c.fn(a, min(hi, a + step)).float()
            if part.shape[-1] != n_keys:
                raise ValueError(
                    f"a DenseBias gives a bias over {part.shape[-1]} keys but this attention call has {n_keys} (the "
                    "site's keys and the extra keys of every ExtraKV contribution): another control's extra keys came "
                    "after this bias was made; two IsolationAttention controls with references cannot act at the "
                    "same call yet — give them disjoint sites (sites=...) or run them in separate calls")
            parts.append(part.index_select(3, cols))
        src = torch.cat(parts, 1).expand(nb, hi - lo, nh, len(cols))
        cp = torch.arange(len(cols), device=cols.device)  # the columns are taken already
    inside = None  # a ``within`` bias also shifts every other key of its block
    if isinstance(c, KeyBias) and c.within is not None:
        w0, w1, _ = c.within.indices(n_keys)
        inside = (cols >= w0) & (cols < w1)
    ok_b, ok_h, ok_c = bp >= 0, hp >= 0, cp >= 0
    reach = ok_c if inside is None else ok_c | inside
    if _on_host(bp) and not (ok_b.any() and ok_h.any() and reach.any()):  # a shortcut only where it is free
        return None
    vals = src[bp.clamp(min=0)][:, :, hp.clamp(min=0)][..., cp.clamp(min=0)]
    keep_bh = ok_b[:, None, None, None] & ok_h[None, None, :, None]
    zero = torch.zeros((), device=vals.device)
    vals = torch.where(keep_bh & ok_c[None, None, None, :], vals, zero)
    if inside is not None:
        shift = c.shift.float()[:, lo - cr0 : hi - cr0][bp.clamp(min=0)][:, :, hp.clamp(min=0)]
        vals = vals - torch.where(keep_bh & inside[None, None, None, :], shift[..., None], zero)
    out = torch.zeros((len(b), r1 - r0, len(h), len(cols)), dtype=torch.float32, device=vals.device)
    out[:, lo - r0 : hi - r0] = vals
    return out


# --------------------------------------------------------------------------------------- the paths

_BIG_EXP = 30.0
"""A bias above this takes the key-bias correction out of its plain form (:func:`_bias_weights`)."""


def _bias_weights(rel: torch.Tensor, bias: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For columns of plain log-probability ``rel = s − lse`` and a bias ``b`` on them, the terms of the corrected
    row ``1 + Σ_c w_c``, ``w_c = p_c (e^{b_c} − 1)``, all scaled by ``e^{−m}``: ``w`` , ``keep = e^{−m}``
    ``(…, 1)``, ``norm = e^{−m} (1 + Σ_c w_c)`` ``(…)``, and ``log(1 + Σ_c w_c)`` ``(…)``.

    Plain form (``m = 0``): ``w = e^{rel} · expm1(b)``, exact while ``expm1`` is finite (``b`` up to ~88 in float32).
    With a bias above 30 in the call, ``m`` is the row's largest ``rel + b`` where that passes 30, so nothing
    overflows; a column with ``b > 30`` takes ``e^{rel + (b − m)} − e^{rel − m}`` (``b − m`` first: ``rel`` keeps
    its digits beside a large ``b``). On the CPU, where reading a value waits for nothing, a call without such a bias
    keeps the plain form (fewer operations); on other devices the shifted form always runs (no wait per call)."""
    if _on_host(rel) and not bool((bias > _BIG_EXP).any()):
        w = torch.exp(rel) * torch.expm1(bias)
        delta = w.sum(-1)
        return w, torch.ones_like(rel[..., :1]), 1 + delta, torch.log1p(delta)
    top = (rel + bias).amax(dim=-1, keepdim=True).detach()
    m = torch.where(top > _BIG_EXP, top, torch.zeros((), device=top.device))
    p = torch.exp(rel - m)
    big = bias > _BIG_EXP  # (the branch not taken stays finite: no NaN gradient through torch.where)
    w = torch.where(big, torch.exp(rel + (bias - m)) - p, p * torch.expm1(bias.clamp_max(_BIG_EXP)))
    delta = w.sum(-1)
    keep = torch.exp(-m)
    return w, keep, keep[..., 0] + delta, m[..., 0] + torch.log1p(torch.expm1(-m[..., 0]) + delta)


def _apply_key_bias(q, k, v, out, lse, kb: KeyBias, scale: float, prior: Sequence[KeyBias] = (), attn_mask=None):
    B, S, H, _ = q.shape
    cols = kb.cols.to(q.device)
    vs = _select(v, Selection(kb.where.batch, None, kb.where.heads), v.shape[1]).index_select(1, cols).float()
    lse_s = _select(lse, kb.where, S)
    s = _col_logits(q, k, kb.where, cols, scale, attn_mask)
    r0, r1 = _norm_rows(kb.where.rows, S)
    b, h = _idx(kb.where.batch, B, q.device), _idx(kb.where.heads, H, q.device)
    for c in prior:  # biases already applied to these columns are part of their current logits
        blk = _block(c, b, r0, r1, h, cols, B, S, H, k.shape[1])
        if blk is not None:
            s = s + blk
    w, keep, norm, log_norm = _bias_weights(s - lse_s[..., None], kb.bias.float().to(q.device))
    # O' = (O + Σ_c w_c v_c) / (1 + Σ_c w_c), every term scaled by e^{−m}, built in one buffer the size of the
    # selected output
    new_out = torch.einsum("brhc,bchd->brhd", w, vs)
    if torch.is_grad_enabled() and new_out.requires_grad:
        new_out = (new_out + _select(out, kb.where, S).float() * keep) / norm[..., None]
    else:
        new_out.addcmul_(_select(out, kb.where, S), keep).div_(norm[..., None])
    return _put(out, kb.where, new_out), _put(lse, kb.where, lse_s + log_norm)


def _col_logits(q, k, where: Selection, cols: torch.Tensor, scale: float, attn_mask=None) -> torch.Tensor:
    """The logits ``[batch, rows, heads, cols]`` of a selection, float32, the attention mask included."""
    S = q.shape[1]
    qs = _select(q, where, S).float()
    ks = _select(k, Selection(where.batch, None, where.heads), k.shape[1]).index_select(1, cols).float()
    logits = torch.einsum("brhd,bchd->brhc", qs, ks) * scale
    m = mask_logits(attn_mask, where, S, q.shape[0], q.shape[2], cols)
    return logits if m is None else logits + m


def _resolve_bias(q, k, lse, kb: KeyBias, scale: float, attn_mask=None) -> KeyBias:
    """Turn a bias given as ``f(logits, lse)`` into a tensor, from the plain logits and LSE of its entries."""
    if not callable(kb.bias):
        return kb
    logits = _col_logits(q, k, kb.where, kb.cols.to(q.device), scale, attn_mask)
    bias = kb.bias(logits, _select(lse, kb.where, q.shape[1]))
    return KeyBias(kb.cols, bias.detach() if not torch.is_grad_enabled() else bias, kb.where)


def _within_pass(q, k, v, kb: KeyBias, backend, max_chunk_elems: int,
                 attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``kb``'s rows over its ``within`` keys alone (the attention mask's part on them included): the
    output ``(b, rows, h, d)`` and the LSE ``(b, rows, h)``, both float32, from the fused kernel in query chunks of
    bounded size."""
    B, S, H, _ = q.shape
    qs = _select(q, kb.where, S)
    mask = mask_logits(attn_mask, kb.where, S, B, H, kb.within)  # (b, rows|1, h|1, within)
    sel_kv = Selection(kb.where.batch, None, kb.where.heads)
    kw = _select(k, sel_kv, k.shape[1])[:, kb.within]
    vw = _select(v, sel_kv, v.shape[1])[:, kb.within]
    nb, n_rows, nh, d = qs.shape
    chunk = max(1, max_chunk_elems // max(1, nb * nh * max(d, kw.shape[1])))
    out = torch.empty((nb, n_rows, nh, vw.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.empty((nb, n_rows, nh), dtype=torch.float32, device=q.device)
    for r0 in range(0, n_rows, chunk):
        m = None if mask is None else (mask[:, r0 : r0 + chunk] if mask.shape[1] > 1 else mask).permute(0, 2, 1, 3)
        o, l_c = fused_attention_with_lse(qs[:, r0 : r0 + chunk], kw, vw, attn_mask=m, backend=backend)
        out[:, r0 : r0 + chunk] = o
        lse[:, r0 : r0 + chunk] = l_c
    return out, lse


def _check_within(kb: KeyBias, n_keys: int) -> None:
    w0, w1, step = kb.within.indices(n_keys)
    if step != 1 or w1 <= w0:
        raise ValueError(f"KeyBias.within must be a non-empty contiguous slice of the {n_keys} keys, not {kb.within}")
    if not len(kb.cols) or not _has_values(kb.cols):
        return
    inside = ((kb.cols >= w0) & (kb.cols < w1)).all()
    message = f"KeyBias.within={kb.within} must hold every biased column; some of them are outside it"
    if _on_host(kb.cols):
        if not bool(inside):
            raise ValueError(f"{message}: {kb.cols.tolist()}")
    else:  # checked on the device, without waiting for it (an error surfaces as a device-side assert)
        torch._assert_async(inside, message)


def _resolve_within(q, k, v, kb: KeyBias, scale: float, backend, max_chunk_elems: int, attn_mask=None):
    """A ``within`` bias as a tensor with its ``shift``, and the within-keys output and LSE of its rows."""
    _check_within(kb, k.shape[1])
    out_w, lse_w = _within_pass(q, k, v, kb, backend, max_chunk_elems, attn_mask)
    logits = _col_logits(q, k, kb.where, kb.cols.to(q.device), scale, attn_mask)
    bias = kb.bias(logits, lse_w) if callable(kb.bias) else kb.bias.to(q.device)
    bias = bias.float().expand(logits.shape)
    w, keep, _, shift = _bias_weights(logits - lse_w[..., None], bias)  # q_c (e^{b_c} − 1), scaled by keep
    if not torch.is_grad_enabled():
        bias, shift = bias.detach(), shift.detach()
    return KeyBias(kb.cols, bias, kb.where, kb.within, shift), (out_w, lse_w, w, keep)


def _apply_within(v, out, lse, kb: KeyBias, out_w, lse_w, w, keep):
    """``O' = O + P_W (O_W' − O_W)``: the within keys' share ``P_W`` of each row stays, their output moves to
    ``O_W' = (O_W + Σ_c w_c v_c) / (1 + Σ_c w_c)``; the row's LSE is unchanged. ``w`` and the 1 come scaled by
    ``keep`` (:func:`_bias_weights`)."""
    S = out.shape[1]
    vs = _select(v, Selection(kb.where.batch, None, kb.where.heads), v.shape[1]).index_select(
        1, kb.cols.to(v.device)).float()
    delta = w.sum(-1)[..., None]
    p_w = torch.exp(lse_w - _select(lse, kb.where, S))[..., None]
    moved = torch.einsum("brhc,bchd->brhd", w, vs)
    if torch.is_grad_enabled() and (moved.requires_grad or out_w.requires_grad):
        moved = (moved - out_w * delta) / (keep + delta) * p_w + _select(out, kb.where, S).float()
    else:  # in one buffer the size of the selected output
        moved.addcmul_(out_w, delta, value=-1).div_(keep + delta).mul_(p_w).add_(_select(out, kb.where, S))
    return _put(out, kb.where, moved)


def _values(t: torch.Tensor) -> tuple[int, ...] | None:
    """An index tensor's values on the host: free when known (:func:`host_values`), else read from the device (a
    sync); ``None`` on the meta device, which has none."""
    known = host_values(t)
    if known is None and _has_values(t):
        known = tuple(t.tolist())
    return known


def _disjoint(a: Selection, b: Selection, S: int) -> bool:
    """Whether two selections share no (batch row, query row, head) entry (decided on the host)."""
    (a0, a1), (b0, b1) = _norm_rows(a.rows, S), _norm_rows(b.rows, S)
    if a1 <= b0 or b1 <= a0:
        return True
    for x, y in ((a.batch, b.batch), (a.heads, b.heads)):
        if x is None or y is None:
            continue
        xs, ys = _values(x), _values(y)
        if xs is not None and ys is not None and not set(xs) & set(ys):
            return True
    return False


def _union(items: Sequence[Selection], n: int, attr: str, device) -> torch.Tensor:
    if any(getattr(s, attr) is None for s in items):
        return torch.arange(n, device=device)
    known = [host_values(getattr(s, attr)) for s in items]
    if all(v is not None for v in known):  # on the host: torch.unique on a GPU would wait for the device
        return index_tensor(sorted(set().union(*known)), device)
    return torch.unique(torch.cat([getattr(s, attr).to(device) for s in items]))


def _covers(sel: torch.Tensor | None, idx: torch.Tensor, n: int) -> bool:
    """Whether the selection ``sel`` (``None``: all ``n``) holds every entry of ``idx``."""
    if sel is None:
        return True
    have, need = host_values(sel), host_values(idx)
    if have is not None and need is not None:
        return set(need) <= set(have)
    return bool((_positions(sel, idx, n) >= 0).all())


def _picked(t: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``t[b][:, :, h]``, a view of ``t`` when ``b`` and ``h`` are all of its rows and heads (the common case)."""
    if host_values(b) != tuple(range(t.shape[0])):
        t = t.index_select(0, b.to(t.device))
    if host_values(h) != tuple(range(t.shape[2])):
        t = t.index_select(2, h.to(t.device))
    return t


def _explicit(q, k, v, out, lse, biases, extras: Sequence[ExtraKV], attn_mask, scale, max_chunk_elems):
    """Recompute the union of the biased / extended (batch, head) pairs by explicit softmax, in chunks."""
    B, S, H, _ = q.shape
    N = k.shape[1]
    sels = [c.where for c in biases] + [e.where for e in extras]
    b = _union(sels, B, "batch", q.device)
    h = _union(sels, H, "heads", q.device)
    # Extra keys: appended after the site's keys; a query row outside an ExtraKV's rows, and a batch row or head
    # outside its selection (another contribution's, brought into the explicit path with it), gets -inf on them.
    ext_k, ext_v, ext_rows, ext_off = [], [], [], []
    for e in extras:
        bp, hp = _positions(e.where.batch, b, B), _positions(e.where.heads, h, H)
        ext_k.append(_picked(e.key, bp.clamp(min=0), hp.clamp(min=0)))  # a row it is not on borrows row 0, unread
        ext_v.append(_picked(e.value, bp.clamp(min=0), hp.clamp(min=0)))
        ext_rows.append(_norm_rows(e.where.rows, S))
        covers = _covers(e.where.batch, b, B) and _covers(e.where.heads, h, H)
        ext_off.append(None if covers else ~((bp >= 0)[:, None, None, None] & (hp >= 0)[None, None, :, None]))
    # q, keys and values in the (batch, heads, ...) layout of the matmuls, each written once, in float32: the logits
    # of a chunk are then one matmul, and every bias and mask goes on through their (batch, rows, heads, keys) view.
    nb, nh, D = len(b), len(h), q.shape[-1]
    qh = q.new_empty((nb, nh, S, D), dtype=torch.float32).copy_(_picked(q, b, h).transpose(1, 2)).mul_(scale)
    sizes = [N, *(e.shape[1] for e in ext_k)]
    kh = q.new_empty((nb, nh, D, sum(sizes)), dtype=torch.float32)  # the extra keys after the site's
    vh = q.new_empty((nb, nh, sum(sizes), D), dtype=torch.float32)
    o = 0
    for part_k, part_v in zip([_picked(k, b, h), *ext_k], [_picked(v, b, h), *ext_v], strict=True):
        n = part_k.shape[1]
        kh[..., o : o + n].copy_(part_k.permute(0, 2, 3, 1))
        vh[:, :, o : o + n].copy_(part_v.transpose(1, 2))
        o += n
    n_keys = kh.shape[-1]
    all_cols = torch.arange(n_keys, device=q.device)
    placed = {id(c): _rows_among(c.where.batch, b, B) for c in biases if isinstance(c, DenseBias)}  # (per call)
    chunk = max(1, max_chunk_elems // max(1, len(b) * len(h) * n_keys))
    outs, lses = [], []
    for r0 in range(0, S, chunk):
        r1 = min(S, r0 + chunk)
        sh = torch.matmul(qh[:, :, r0:r1], kh)
        s = sh.transpose(1, 2)
        if attn_mask is not None:
            s[..., :N] += mask_logits(attn_mask, Selection(b, slice(r0, r1), h), S, B, H, slice(None))
        off = N
        for (e0, e1), ek, off_bh in zip(ext_rows, ext_k, ext_off, strict=True):
            m = ek.shape[1]
            outside = torch.ones(r1 - r0, dtype=torch.bool, device=q.device)
            outside[max(e0, r0) - r0 : max(min(e1, r1) - r0, 0)] = False
            s[:, outside, :, off : off + m] = float("-inf")
            if off_bh is not None:
                s[..., off : off + m].masked_fill_(off_bh, float("-inf"))
            off += m
        for c in biases:
            whole = _dense_whole(c, placed[id(c)], r0, r1, h, S, H, n_keys) if isinstance(c, DenseBias) else None
            if whole is not None:
                _add_rows(s, *whole)
                continue
            blk = _block(c, b, r0, r1, h, all_cols, B, S, H, n_keys)
            if blk is not None:
                s += blk
        top = sh.amax(dim=-1, keepdim=True).detach()  # any constant gives the same softmax; max keeps exp ≤ 1
        if sh.requires_grad:  # autograd keeps exp's output, so the softmax is built out of place
            sh = torch.exp(sh - top)
            total = sh.sum(dim=-1, keepdim=True)
            sh = sh / total
        else:  # the softmax in place: exp(s − max) / Σ, and LSE = max + log Σ
            sh.sub_(top).exp_()
            total = sh.sum(dim=-1, keepdim=True)
            sh.div_(total)
        outs.append(torch.matmul(sh, vh).transpose(1, 2))
        lses.append((top + total.log()).squeeze(-1).transpose(1, 2))
    where = Selection(b, None, h)
    return _put(out, where, torch.cat(outs, 1)), _put(lse, where, torch.cat(lses, 1))


def _probe(q, k, lse, pr: Probe, biases, scale, B, S, H, n_keys, attn_mask=None):
    cols = pr.cols.to(q.device)
    s = _col_logits(q, k, pr.where, cols, scale, attn_mask)
    r0, r1 = _norm_rows(pr.where.rows, S)
    if pr.over is not None:  # the plain attention over the ``over`` keys alone: no bias, no extra key
        w0, w1, step = pr.over.indices(k.shape[1])
        known = host_values(cols)
        if step != 1 or w0 >= w1 or (known is not None and not all(w0 <= c < w1 for c in known)):
            raise ValueError(f"a Probe's over={pr.over} must be a contiguous slice of the site's {k.shape[1]} keys "
                             "that holds every probed column; give the block the columns are in (e.g. the text "
                             "keys), or over=None for the call's whole softmax")
        block = torch.arange(w0, w1, device=q.device)
        nb = B if pr.where.batch is None else len(pr.where.batch)
        nh = H if pr.where.heads is None else len(pr.where.heads)
        rows = max(1, MAX_CHUNK_ELEMS // max(1, nb * nh * (w1 - w0)))
        lse = torch.cat([torch.logsumexp(_col_logits(
            q, k, Selection(pr.where.batch, slice(a, min(r1, a + rows)), pr.where.heads), block, scale, attn_mask), -1)
            for a in range(r0, r1, rows)], 1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), device=lse.device))  # a row with no such key
        pr.sink(torch.exp(s - lse[..., None]))
        return
    b = _idx(pr.where.batch, B, q.device)
    h = _idx(pr.where.heads, H, q.device)
    for c in biases:
        blk = _block(c, b, r0, r1, h, cols, B, S, H, n_keys)
        if blk is not None:
            s = s + blk
    pr.sink(torch.exp(s - _select(lse, pr.where, S)[..., None]))


def share_values(v: torch.Tensor, shares: Sequence[SharedValues]) -> torch.Tensor:
    """``v`` ``(B, S, H, d)`` with each :class:`SharedValues` applied in turn: the selected rows' values on the
    selected positions and heads moved by ``weight`` toward their source rows' (exactly the source's at weight 1).
    Out of place, so autograd sees it (an edit's gradient pass runs through it)."""
    B, S, H, _ = v.shape
    for sv in shares:
        rows, source = sv.where.batch, sv.source
        if rows is None or len(rows) != len(source):
            raise ValueError(f"SharedValues names {0 if rows is None else len(rows)} rows that borrow values and "
                             f"{len(source)} rows they borrow from; give one source row per selected row "
                             "(where.batch and source of the same length)")
        if not 0.0 <= float(sv.weight) <= 1.0:
            raise ValueError(f"SharedValues weight {sv.weight!r} is outside [0, 1] (0: the row's own values, 1: the "
                             "source row's)")
        known = [host_values(t) for t in (rows, source)]
        if any(x is not None and any(not 0 <= i < B for i in x) for x in known):
            raise ValueError(f"SharedValues rows {known[0]} / sources {known[1]} are outside this call's batch of {B}")
        r0, r1 = _norm_rows(sv.where.rows, S)
        heads = sv.where.heads
        mine = v.index_select(0, rows.to(v.device))
        theirs = v.index_select(0, source.to(v.device))[:, r0:r1]
        if heads is not None:
            theirs = theirs.index_select(2, heads.to(v.device))
        own = mine[:, r0:r1] if heads is None else mine[:, r0:r1].index_select(2, heads.to(v.device))
        new = theirs if float(sv.weight) == 1.0 else torch.lerp(own, theirs, float(sv.weight))
        mixed = mine.clone()
        if heads is None:
            mixed[:, r0:r1] = new
        else:
            mixed[:, r0:r1] = mixed[:, r0:r1].index_copy(2, heads.to(v.device), new)
        v = v.index_copy(0, rows.to(v.device), mixed)
    return v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contributions: Sequence[Contribution], *,
           attn_mask: torch.Tensor | None = None, backend=None, parallel_config=None,
           max_chunk_elems: int = MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` (``(B, S, H, d)``) with every contribution applied; see the module doc."""
    shares = [c for c in contributions if isinstance(c, SharedValues)]
    if shares:
        v = share_values(v, shares)
        contributions = [c for c in contributions if not isinstance(c, SharedValues)]
    if not contributions:
        return fused_attention(q, k, v, attn_mask=attn_mask, backend=backend, parallel_config=parallel_config)
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    key_biases = [c for c in contributions if isinstance(c, KeyBias)]
    dense = [c for c in contributions if isinstance(c, DenseBias)]
    extras = [c for c in contributions if isinstance(c, ExtraKV)]
    partials = [c for c in contributions if isinstance(c, PartialAttention)]
    probes = [c for c in contributions if isinstance(c, Probe)]
    mixes = [c for c in contributions if isinstance(c, OutputMix)]
    known = (KeyBias, DenseBias, ExtraKV, PartialAttention, Probe, OutputMix)
    unknown = [c for c in contributions if not isinstance(c, known)]
    if unknown:
        raise TypeError(f"unknown attention contribution {type(unknown[0]).__name__}; controls must return "
                        "KeyBias, DenseBias, ExtraKV, PartialAttention, Probe, OutputMix or SharedValues objects")
    if any(p.where.heads is not None for p in partials):
        raise ValueError("a PartialAttention covers every head of its rows (where.heads=None); give heads that "
                         "should not read its keys an output of their own (an OutputMix) instead")
    if parallel_config is not None:  # diffusers sets it on the processors only for context parallelism
        raise UnsupportedModelError(
            "attnctl controls cannot run under context parallelism: each process sees a shard of the sequence, and "
            "the controls' logits, biases and probes need every key",
            fix="generate without context parallelism (enable_parallelism with a ContextParallelConfig) when "
                "controls are active; without controls the processors pass the config to diffusers' dispatcher")
    if attn_mask is not None and attn_mask.ndim not in (2, 4):
        raise ValueError(f"attention masks with controls must be (batch, keys) or (batch|1, heads|1, queries|1, keys), "
                         f"not {tuple(attn_mask.shape)}; reshape the mask to one of these")
    if attn_mask is not None and not all(mix.mask_free or mix.context for mix in mixes):
        raise ValueError("an OutputMix without context=True does not see the attention mask, so it cannot run at a "
                         "masked call unless it is marked mask_free (its result cannot depend on the masked keys); "
                         "give it context=True and apply MixContext.mask, or generate without the mask")

    if key_biases or probes or dense or extras or partials:
        out, lse = fused_attention_with_lse(q, k, v, attn_mask=attn_mask, backend=backend,
                                            parallel_config=parallel_config)
    else:
        out, lse = fused_attention(q, k, v, attn_mask=attn_mask, backend=backend,
                                   parallel_config=parallel_config), None
    within = [kb for kb in key_biases if kb.within is not None]
    resolved = [_resolve_within(q, k, v, kb, scale, backend, max_chunk_elems, attn_mask) for kb in within]
    within = [kb for kb, _ in resolved]
    key_biases = [_resolve_bias(q, k, lse, kb, scale, attn_mask) for kb in key_biases if kb.within is None]
    biases: list[KeyBias | DenseBias] = [*within, *key_biases, *dense]
    overlapping = any(not _disjoint(a.where, b.where, S) for i, a in enumerate(within) for b in within[i + 1 :])
    if dense or extras or overlapping:
        out, lse = _explicit(q, k, v, out, lse, biases, extras, attn_mask, scale, max_chunk_elems)
    else:  # within biases first: each is corrected from the plain output of its rows, which no other one touched
        for kb, (out_w, lse_w, w, keep) in resolved:
            out = _apply_within(v, out, lse, kb, out_w, lse_w, w, keep)
        for i, kb in enumerate(key_biases):
            out, lse = _apply_key_bias(q, k, v, out, lse, kb, scale, prior=[*within, *key_biases[:i]],
                                       attn_mask=attn_mask)
    site_lse = lse  # the rows' LSE over the site's keys (biases applied), before any part is merged
    for part in partials:  # keys apart from the site's: one softmax with them, by the two LSEs
        out_x, lse_x = part.fn(backend, _select(site_lse, part.where, S)) if part.reads_lse else part.fn(backend)
        merged, merged_lse = merge_attention(_select(out, part.where, S), _select(lse, part.where, S), out_x, lse_x)
        out, lse = _put(out, part.where, merged), _put(lse, part.where, merged_lse)
    n_keys = k.shape[1] + sum(e.key.shape[1] for e in extras)
    for pr in probes:
        _probe(q, k, lse, pr, biases, scale, B, S, H, n_keys, attn_mask)
    for mix in mixes:
        sel_full = Selection(mix.where.batch, None, mix.where.heads)
        args = (_select(out, mix.where, S), _select(q, sel_full, S), _select(k, sel_full, k.shape[1]),
                _select(v, sel_full, v.shape[1]))
        if mix.context:
            mask = mask_logits(attn_mask, mix.where, S, B, H, slice(None))
            new = mix.fn(*args, MixContext(mask, backend))
        else:
            new = mix.fn(*args)
        out = _put(out, mix.where, new)
    return out.to(q.dtype)
