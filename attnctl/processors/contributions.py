"""What a control can contribute to one attention call.

Tensors use the layout of diffusers' attention dispatcher: ``(batch, sequence, heads, head_dim)``.
``batch`` and ``heads`` select batch rows and heads (``None``: all); ``rows`` is a slice of query positions
in the site's sequence (``None``: all). A control returns any number of these; the processor composes them:

0. :class:`SharedValues` first replace (or blend) the values of their rows with other rows' values, so every later
   step, the fused kernel included, reads the shared values;
1. the attention distribution is the softmax of ``q·kᵀ/√d`` plus every :class:`KeyBias` and
   :class:`DenseBias`, over the site's keys plus any :class:`ExtraKV` keys, plus the keys of any
   :class:`PartialAttention` (computed apart and merged in by their log-sum-exp);
2. :class:`Probe` sinks receive the final probabilities of the entries they asked for (or the plain attention over
   a block of keys alone, ``over``);
3. :class:`OutputMix` functions then transform the attention output of their heads (given the call's mask and
   backend when they ask, :class:`MixContext`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_HOST_VALUES = "_attnctl_values"


def index_tensor(values: Sequence[int], device=None) -> torch.Tensor:
    """A long index tensor on ``device`` that keeps a copy of its values on the host, so that a decision taken from
    them (do two selections overlap?) does not wait for the device (:func:`host_values`)."""
    values = tuple(int(x) for x in values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    setattr(t, _HOST_VALUES, values)
    return t


def host_values(t: torch.Tensor) -> tuple[int, ...] | None:
    """The values of an index tensor when they can be had without waiting for a device: kept by
    :func:`index_tensor`, or read from a CPU tensor; ``None`` otherwise (a GPU or meta tensor made elsewhere)."""
    known = getattr(t, _HOST_VALUES, None)
    if known is not None:
        return known
    return tuple(t.tolist()) if t.device.type == "cpu" else None


@dataclass
class Selection:
    """Which (batch rows, query rows, heads) a contribution touches. Index tensors made by :func:`index_tensor`
    (as ``RunState.index`` makes them) let the processor compare selections without a device sync."""

    batch: torch.Tensor | None = None  # long indices into the batch
    rows: slice | None = None  # query positions
    heads: torch.Tensor | None = None  # long indices into the heads


@dataclass
class KeyBias:
    """Additive bias on a few key columns: ``logits[b, r, h, cols] += bias``.

    ``bias`` broadcasts to ``(batch, rows, heads, len(cols))`` and may hold ``-inf`` to remove a column.
    The processor keeps the fused kernel and corrects its output with the log-sum-exp: cost and memory
    are O(rows · len(cols)). Removing almost all of a row's mass this way loses precision; use a
    :class:`DenseBias` for masks that keep only a few keys.

    ``bias`` may also be a function ``f(logits, lse) -> bias`` of the plain logits of the selected entries
    ``(batch, rows, heads, len(cols))`` and the plain log-sum-exp of their rows ``(batch, rows, heads)``,
    both float32: a control that *optimises* its bias (attention regulation) gets exactly what the softmax
    over the whole row needs — ``softmax(s + b)_c = exp(s_c + b_c − lse − log(1 + Σ_c p_c(e^{b_c} − 1)))`` —
    without any N×N map or a second attention pass.

    ``within`` (a slice of key positions that holds every column, e.g. the text block of a joint sequence) makes
    the bias act inside the softmax over those keys alone, as a bias in a separate cross-attention softmax would:
    each query keeps the total probability it gives the ``within`` keys, the keys outside keep theirs, and only
    the split among the ``within`` keys changes. The effective logit bias is ``b_c − shift`` on the columns and
    ``−shift`` on the other ``within`` keys, ``shift = log(1 + Σ_c q_c (e^{b_c} − 1))``, ``q_c`` being the
    column's share of the ``within`` keys; a function form receives the LSE over the ``within`` keys instead of
    the row's. The processor adds one fused pass over the ``within`` keys: O(rows · len(within)), no N×N map.
    """

    cols: torch.Tensor
    bias: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    where: Selection
    within: slice | None = None
    shift: torch.Tensor | None = field(default=None, repr=False)  # set by the processor for a ``within`` bias


@dataclass
class DenseBias:
    """A bias over every key for some query rows, produced chunk by chunk.

    ``fn(row_start, row_stop)`` returns a tensor broadcastable to ``(batch, rows, heads, keys)`` for query
    rows ``row_start:row_stop`` (absolute positions), where ``keys`` are the site's keys followed by any
    :class:`ExtraKV` keys. These rows are computed by an explicit softmax in chunks with a bounded size,
    only for the selected batch rows and heads.
    """

    fn: Callable[[int, int], torch.Tensor]
    where: Selection


@dataclass
class ExtraKV:
    """Extra keys and values (e.g. from reference rows of the same batch) that the selected rows also
    attend to. ``key``/``value`` have shape ``(len(batch), M, len(heads) or H, head_dim)``. No other batch row,
    query row or head reads them, also where another contribution's bias puts those in the same explicit softmax."""

    key: torch.Tensor
    value: torch.Tensor
    where: Selection


@dataclass
class PartialAttention:
    """The selected rows also attend to keys of their own (another view's image tokens, say), in one softmax with
    the site's keys, where the control computes the attention over those keys itself — sparsely, blockwise.

    ``fn(backend)`` returns, for the selected batch rows and query rows and every head, the attention output over
    the extra keys ``(b, rows, H, d)`` and the log-sum-exp of their logits ``(b, rows, H)``, both float32, the LSE
    ``-inf`` (and the output finite) for a row that reads none of them; ``backend`` is the processor's, for a part
    that runs fused attention. The processor merges it with the rest of the row::

        out' = (e^lse · out + e^lse_x · out_x) / (e^lse + e^lse_x),   lse' = log(e^lse + e^lse_x)

    after every bias on the site's keys, so those and the extra keys share one softmax, and nothing else sees the
    extra keys (a :class:`DenseBias` spans the site's and :class:`ExtraKV` keys only; a probe cannot ask for them).

    With ``reads_lse=True`` it is called as ``fn(backend, lse)``, ``lse`` ``(b, rows, H)`` float32 being the selected
    rows' log-sum-exp over the site's keys (biases applied, no part merged yet): a part whose keys depend on how
    strongly the whole row attends to them (AnimateAnywhere's adaptive epipolar mask) needs it.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    where: Selection
    reads_lse: bool = False


@dataclass
class Probe:
    """Ask for the final attention probabilities of ``rows × cols``.

    ``sink`` receives a float32 tensor ``(batch, rows, heads, len(cols))``; it should reduce it at once
    (sum over heads, add to a running map) rather than keep it.

    ``over`` (a slice of the site's key positions that holds every column, e.g. the text block of a joint sequence)
    asks instead for the plain attention over those keys alone, as a separate cross-attention softmax would give it:
    ``exp(s_c − LSE_over(s))`` from the plain logits ``s`` (the attention mask included), untouched by any control's
    bias or extra keys at the call. It costs ``O(rows · len(over))`` per head, in bounded chunks.
    """

    cols: torch.Tensor
    sink: Callable[[torch.Tensor], None]
    where: Selection
    over: slice | None = None


@dataclass
class MixContext:
    """What an :class:`OutputMix` that asks for it (``context=True``) gets besides the tensors.

    ``mask`` is the call's attention mask as additive float32 logits (``-inf`` on a removed key) for the mix's
    selected batch rows, query rows and heads over all the site's keys, in the layout ``(batch|1, rows|1, heads|1,
    keys)`` (a size-1 axis broadcasts), or ``None`` when the call has no mask. ``backend`` is the processor's
    attention backend (``None``: diffusers' active one), for a mix that runs fused attention of its own.
    """

    mask: torch.Tensor | None = None
    backend: Any = None


@dataclass
class OutputMix:
    """Replace the attention output of the selected entries with ``fn(out, q, k, v)``.

    ``out`` is ``(batch, rows, heads, d)`` for the selection; ``q``, ``k``, ``v`` are the full-sequence
    tensors of the selected batch rows and heads, so a mix can reach any token (SoftPAG's identity target
    is ``v`` at the same rows; a uniform target is the mean of ``v``).

    With ``context=True`` it is called as ``fn(out, q, k, v, ctx)`` with a :class:`MixContext` (the call's mask
    and backend): a mix that reads other keys applies the mask itself. A mix without the context runs at a masked
    call only if ``mask_free``: its result cannot depend on which keys the mask removes (SoftPAG's joint identity
    target reads each row's own value only); any other is refused there.
    """

    fn: Callable[..., torch.Tensor]
    where: Selection
    mask_free: bool = False
    context: bool = False


@dataclass
class SharedValues:
    """The selected batch rows attend with values taken from other rows of the same call (an edit's target branch
    reading the source branch's values, as RF-Solver-Edit's feature sharing does)::

        v[b, t, h] ← v[b, t, h] + weight · (v[source_b, t, h] − v[b, t, h])

    for each selected row ``b`` and its ``source_b`` (``source``, one row index per entry of ``where.batch``), on the
    token positions ``where.rows`` (here: positions of keys and values, ``None`` for all) and the heads
    ``where.heads``. ``weight`` 1 replaces the values; the queries and keys, and so the attention pattern, stay the
    row's own. It acts before everything else at the call and costs one copy of the value rows: the fused kernel
    still runs.
    """

    source: torch.Tensor
    weight: float
    where: Selection


Contribution = KeyBias | DenseBias | ExtraKV | PartialAttention | Probe | OutputMix | SharedValues
