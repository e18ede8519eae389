"""Every contribution type against a materialised reference written plainly: full logits, full bias, softmax."""

from __future__ import annotations

import math

import pytest
import torch

from attnctl.processors.attend import attend, chunked_lse, fused_attention_with_lse
from attnctl.processors.contributions import DenseBias, ExtraKV, KeyBias, OutputMix, Probe, Selection

B, S, H, D = 3, 20, 4, 8


def qkv(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3)]


def full_bias(contribs, n_keys):
    """The (B, S, H, n_keys) additive bias a list of KeyBias/DenseBias means, by plain loops."""
    bias = torch.zeros(B, S, H, n_keys)
    for c in contribs:
        bs = range(B) if c.where.batch is None else c.where.batch.tolist()
        r0, r1, _ = (c.where.rows or slice(None)).indices(S)
        hs = range(H) if c.where.heads is None else c.where.heads.tolist()
        if isinstance(c, KeyBias):
            vals = c.bias.expand(len(bs), r1 - r0, len(hs), len(c.cols))
            for i, b in enumerate(bs):
                for j, h in enumerate(hs):
                    for n, col in enumerate(c.cols.tolist()):
                        bias[b, r0:r1, h, col] += vals[i, :, j, n]
        else:
            vals = c.fn(r0, r1).expand(len(bs), r1 - r0, len(hs), n_keys)
            for i, b in enumerate(bs):
                for j, h in enumerate(hs):
                    bias[b, r0:r1, h] += vals[i, :, j]
    return bias


def reference(q, k, v, biases=(), extra=None, mask=None):
    """Materialised attention: softmax(q·kᵀ/√d + bias [+ mask]) @ v over [k, extra keys]; returns (out, probs).
    ``mask``: an additive ``(B, S, H, keys)`` tensor (see :func:`masks`)."""
    keys, values = k, v
    if extra is not None:
        ek = torch.zeros(B, extra.key.shape[1], H, D)
        ev = torch.zeros_like(ek)
        ek[extra.where.batch] = extra.key
        ev[extra.where.batch] = extra.value
        keys, values = torch.cat([k, ek], 1), torch.cat([v, ev], 1)
    s = torch.einsum("bqhd,bkhd->bqhk", q, keys) / math.sqrt(D)
    bias = full_bias(biases, keys.shape[1])
    if extra is not None:  # rows and batch entries outside the ExtraKV selection do not see the extra keys
        allowed = torch.zeros(B, S, dtype=torch.bool)
        r0, r1, _ = (extra.where.rows or slice(None)).indices(S)
        for b in extra.where.batch.tolist():
            allowed[b, r0:r1] = True
        bias[..., k.shape[1]:] = bias[..., k.shape[1]:].masked_fill(~allowed[:, :, None, None], float("-inf"))
    if mask is not None:
        bias = bias + mask
    p = torch.softmax(s + bias, dim=-1)
    return torch.einsum("bqhk,bkhd->bqhd", p, values), p


def selected(where: Selection) -> torch.Tensor:
    """The (B, S, H) entries a selection covers, by plain loops."""
    mask = torch.zeros(B, S, H, dtype=torch.bool)
    r0, r1, _ = (where.rows or slice(None)).indices(S)
    for b in range(B) if where.batch is None else where.batch.tolist():
        for h in range(H) if where.heads is None else where.heads.tolist():
            mask[b, r0:r1, h] = True
    return mask


def assert_plain_outside(q, k, v, out, where: Selection) -> None:
    """Entries outside ``where`` are the plain attention, bit for bit."""
    untouched = ~selected(where)
    assert torch.equal(out[untouched], attend(q, k, v, [])[untouched])


def test_lse_paths_agree():
    q, k, v = qkv()
    out, lse = fused_attention_with_lse(q, k, v)
    ref_out, _ = reference(q, k, v)
    assert (out - ref_out).abs().max() < 1e-5
    assert (lse - chunked_lse(q, k, max_chunk_elems=50)).abs().max() < 1e-5


def test_key_bias_matches_reference_and_leaves_other_heads_bitwise():
    q, k, v = qkv(1)
    cols = torch.tensor([2, 5, 17])
    where = Selection(torch.tensor([0, 2]), slice(3, 15), torch.tensor([1, 3]))
    bias = torch.randn(2, 12, 2, 3)
    bias[0, 0, 0, 1] = float("-inf")  # a removed column
    kb = KeyBias(cols, bias, where)
    out = attend(q, k, v, [kb])
    ref, _ = reference(q, k, v, [kb])
    assert (out - ref).abs().max() < 1e-5
    assert_plain_outside(q, k, v, out, where)


def test_two_key_biases_on_the_same_columns_compose():
    q, k, v = qkv(2)
    kb1 = KeyBias(torch.tensor([4, 6]), torch.full((1, 1, 1, 2), 1.5), Selection())
    kb2 = KeyBias(torch.tensor([6, 9]), torch.full((1, 1, 1, 2), -0.7), Selection(rows=slice(0, 10)))
    ref, _ = reference(q, k, v, [kb1, kb2])
    assert (attend(q, k, v, [kb1, kb2]) - ref).abs().max() < 1e-5


def test_dense_bias_chunked_matches_reference():
    q, k, v = qkv(3)
    g = torch.Generator().manual_seed(7)
    table = torch.randn(S, S, generator=g)
    table[table > 1.2] = float("-inf")  # hard mask entries
    table.fill_diagonal_(0.0)
    db = DenseBias(lambda r0, r1: table[r0:r1][None, :, None, :], Selection(heads=torch.tensor([0, 2])))
    kb = KeyBias(torch.tensor([1]), torch.full((1, 1, 1, 1), 2.0), Selection())
    out = attend(q, k, v, [db, kb], max_chunk_elems=B * H * S * 3)  # forces several row chunks
    ref, _ = reference(q, k, v, [db, kb])
    assert (out - ref).abs().max() < 1e-5


def test_extra_kv_matches_reference():
    q, k, v = qkv(4)
    g = torch.Generator().manual_seed(3)
    ek, ev = torch.randn(1, 5, H, D, generator=g), torch.randn(1, 5, H, D, generator=g)
    extra = ExtraKV(ek, ev, Selection(torch.tensor([1]), slice(0, 12), None))
    out = attend(q, k, v, [extra])
    ref, _ = reference(q, k, v, extra=extra)
    assert (out - ref).abs().max() < 1e-5


def test_explicit_path_gradients_match_the_reference_and_leave_inputs_alone():
    """The explicit softmax (in place when nothing records, out of place under autograd) gives the reference's
    gradients, for a dense bias that itself carries a gradient and extra keys, over several chunks."""
    q, k, v = qkv(5)
    g = torch.Generator().manual_seed(11)
    ek, ev = torch.randn(2, 6, H, D, generator=g), torch.randn(2, 6, H, D, generator=g)
    w = torch.tensor(0.7, requires_grad=True)
    table = torch.randn(S, S + 6, generator=g)
    db = DenseBias(lambda r0, r1: w * table[r0:r1][None, :, None, :], Selection(torch.tensor([0, 2]), None, None))
    extra = ExtraKV(ek, ev, Selection(torch.tensor([0, 2]), slice(4, 16), None))
    grads = []
    for run in ("ours", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kept = [t.detach().clone() for t in leaves]
        if run == "ours":
            out = attend(*leaves, [extra, db], max_chunk_elems=2 * H * (S + 6) * 3)
        else:
            out, _ = reference(*leaves, [db], extra=extra)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(leaves, kept, strict=True))  # nothing written in place
        grads.append([t.grad for t in leaves] + [w.grad.clone()])
        w.grad = None
    for ours, ref in zip(*grads, strict=True):
        assert (ours - ref).abs().max() < 1e-5
    with torch.no_grad():  # the in-place softmax gives the same values
        assert (attend(q, k, v, [extra, db], max_chunk_elems=2 * H * (S + 6) * 3)
                - reference(q, k, v, [db], extra=extra)[0]).abs().max() < 1e-5


def _per_entry_reference(q, k, v, biases, extra: ExtraKV):
    """Materialised attention one (batch row, head) at a time: softmax over [own keys + the ExtraKV's keys] with
    every bias, where an entry outside the ExtraKV's batch rows or heads sees none of its keys, and a query row
    outside its rows gets -inf on them."""
    M = extra.key.shape[1]
    bias = full_bias(biases, S + M)
    rows_e = extra.where.batch.tolist()
    heads_e = list(range(H)) if extra.where.heads is None else extra.where.heads.tolist()
    e0, e1, _ = (extra.where.rows or slice(None)).indices(S)
    out = torch.zeros(B, S, H, D)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h].T / math.sqrt(D) + bias[b, :, h, :S]
            values = v[b, :, h]
            if b in rows_e and h in heads_e:
                ek = extra.key[rows_e.index(b), :, heads_e.index(h)]
                s_extra = q[b, :, h] @ ek.T / math.sqrt(D) + bias[b, :, h, S:]
                s_extra[:e0] = float("-inf")
                s_extra[e1:] = float("-inf")
                s = torch.cat([s, s_extra], 1)
                values = torch.cat([values, extra.value[rows_e.index(b), :, heads_e.index(h)]])
            out[b, :, h] = torch.softmax(s, -1) @ values
    return out


@pytest.mark.parametrize("extra_heads", [None, [1, 3]])
def test_extra_kv_combined_with_biases_on_rows_and_heads_it_is_not_on(extra_heads):
    """Isolation with references (extra keys and a band on the scene row) beside regulation (a key bias on every
    conditional row) brings rows without the extra keys into the explicit path: they see none of those keys, and
    every row and head gets the reference's attention, also under autograd and over several chunks."""
    q, k, v = qkv(15)
    g = torch.Generator().manual_seed(5)
    M = 6
    nh = H if extra_heads is None else len(extra_heads)
    heads = None if extra_heads is None else torch.tensor(extra_heads)
    ek, ev = torch.randn(1, M, nh, D, generator=g), torch.randn(1, M, nh, D, generator=g)
    extra = ExtraKV(ek, ev, Selection(torch.tensor([2]), slice(4, 16), heads))
    w = torch.tensor(0.8, requires_grad=True)
    table = torch.randn(S, S + M, generator=g)
    band = DenseBias(lambda r0, r1: w * table[r0:r1][None, :, None, :], Selection(torch.tensor([2]), None, None))
    two_rows = DenseBias(lambda r0, r1: 0.5 * table[r0:r1][None, :, None, :], Selection(torch.tensor([0, 2])))
    per_row = [KeyBias(torch.tensor([3, 7]), torch.randn(1, S, H, 2, generator=g), Selection(torch.tensor([r])))
               for r in range(B)]
    biases = [*per_row, band, two_rows]
    chunk = B * H * (S + M) * 3
    with torch.no_grad():
        got = attend(q, k, v, [extra, *biases], max_chunk_elems=chunk)
        assert (got - _per_entry_reference(q, k, v, biases, extra)).abs().max() < 1e-5
    grads = []
    for run in ("ours", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = (attend(*leaves, [extra, *biases], max_chunk_elems=chunk) if run == "ours"
               else _per_entry_reference(*leaves, biases, extra))
        (out * torch.linspace(-1, 1, D)).sum().backward()
        grads.append([t.grad for t in leaves] + [w.grad.clone()])
        w.grad = None
    for ours, ref in zip(*grads, strict=True):
        assert (ours - ref).abs().max() < 1e-5


def test_a_dense_bias_over_the_wrong_number_of_keys_is_a_clear_error():
    """Two controls that each add extra keys at one call: the second's keys shift the first's dense bias."""
    q, k, v = qkv(6)
    g = torch.Generator().manual_seed(2)
    one = ExtraKV(torch.randn(B, 4, H, D, generator=g), torch.randn(B, 4, H, D, generator=g), Selection())
    two = ExtraKV(torch.randn(B, 3, H, D, generator=g), torch.randn(B, 3, H, D, generator=g), Selection())
    sized_for_one = DenseBias(lambda r0, r1: torch.zeros(1, r1 - r0, 1, S + 4), Selection())
    with pytest.raises(ValueError, match="cannot act at the same call yet"):
        attend(q, k, v, [one, two, sized_for_one])


def test_probe_returns_final_probabilities():
    q, k, v = qkv(5)
    got = []
    cols = torch.tensor([0, 3, 19])
    kb = KeyBias(torch.tensor([3]), torch.full((1, 1, 1, 1), 3.0), Selection(rows=slice(2, 9)))
    pr = Probe(cols, got.append, Selection(torch.tensor([1, 2]), slice(0, 10), torch.tensor([0, 3])))
    attend(q, k, v, [kb, pr])
    _, p = reference(q, k, v, [kb])
    expect = p[1:3, 0:10][:, :, [0, 3]][..., cols]
    assert got[0].shape == (2, 10, 2, 3)
    assert (got[0] - expect).abs().max() < 1e-6


def test_probe_under_a_dense_bias_makes_the_bias_a_few_rows_at_a_time(monkeypatch):
    """A probe's columns under a dense bias (IsolationAttention's masks and its own probe at one call) come from
    bias parts of a few rows, each cut to the probed columns: never the rows × keys block expanded over heads."""
    import importlib

    attend_module = importlib.import_module("attnctl.processors.attend")  # (the package's `attend` is the function)
    q, k, v = qkv(8)
    table = torch.randn(S, S, generator=torch.Generator().manual_seed(2))
    asked = []

    def fn(r0, r1):
        asked.append(r1 - r0)
        return table[r0:r1][None, :, None, :].expand(B, -1, -1, -1)

    monkeypatch.setattr(attend_module, "_DENSE_PART", 4 * S)  # four rows of keys per part
    db, got = DenseBias(fn, Selection()), []
    cols = torch.tensor([1, 5, 17])
    attend(q, k, v, [db, Probe(cols, got.append, Selection(torch.tensor([0, 2]), slice(3, 15), None))],
           max_chunk_elems=B * H * S * 4)  # the attention's own chunks: 4 rows too
    _, p = reference(q, k, v, [DenseBias(lambda r0, r1: table[r0:r1][None, :, None, :], Selection())])
    assert (got[0] - p[[0, 2], 3:15][..., cols]).abs().max() < 1e-5
    assert max(asked) <= 4 and sum(asked) >= 12  # the probe's 12 rows in parts of at most 4


def test_a_dense_bias_part_stays_in_its_bound_over_several_batch_rows(monkeypatch):
    """The parts a probe asks of a dense bias count every batch row the bias is on (IsolationAttention with several
    reposition sets): rows × keys × batch rows stays within ``_DENSE_PART``."""
    import importlib

    attend_module = importlib.import_module("attnctl.processors.attend")
    q, k, v = qkv(9)
    table = torch.randn(S, S, generator=torch.Generator().manual_seed(3))
    sizes = []

    def fn(r0, r1):
        part = table[r0:r1][None, :, None, :].repeat(B, 1, 1, 1)  # one bias per batch row, as isolation makes
        sizes.append(part.numel())
        return part

    monkeypatch.setattr(attend_module, "_DENSE_PART", 6 * S)
    got = []
    cols = torch.tensor([2, 11])
    attend(q, k, v, [DenseBias(fn, Selection(torch.arange(B))), Probe(cols, got.append, Selection(rows=slice(0, 12)))],
           max_chunk_elems=B * H * S * 2)  # the explicit path's chunks: 2 rows of every batch row, within the bound
    _, p = reference(q, k, v, [DenseBias(lambda r0, r1: table[r0:r1][None, :, None, :], Selection())])
    assert (got[0] - p[:, 0:12][..., cols]).abs().max() < 1e-5
    assert max(sizes) <= 6 * S


def test_a_probe_over_a_block_of_keys_reads_the_plain_attention_over_them():
    """``Probe(over=...)``: the softmax of the plain logits over those keys alone (as a separate cross-attention
    would give it), the attention mask kept, every bias and extra key at the call left out."""
    q, k, v = qkv(10)
    text = slice(14, S)  # a "text" block of 6 keys
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, 18:] = False  # row 1's last two text keys are padding
    pad[2, 14:] = False  # row 2 has no text key at all: its map is 0
    ek, ev = torch.randn(2, 5, H, D), torch.randn(2, 5, H, D)
    db = DenseBias(lambda r0, r1: torch.randn(2, r1 - r0, 1, S + 5), Selection(torch.tensor([0, 1])))
    kb = KeyBias(torch.tensor([15]), torch.full((1, 1, 1, 1), 4.0), Selection(torch.tensor([0, 1])))
    got, whole = [], []
    cols = torch.tensor([14, 16, 19])
    where = Selection(None, slice(0, 14), None)
    extra = ExtraKV(ek, ev, Selection(torch.tensor([0, 1])))
    attend(q, k, v, [db, kb, extra, Probe(cols, got.append, where, over=text), Probe(cols, whole.append, where)],
           attn_mask=pad, max_chunk_elems=B * H * S * 3)
    s = torch.einsum("brhd,bchd->brhc", q[:, :14], k[:, text]) / math.sqrt(D)
    s = s.masked_fill(~pad[:, None, None, text], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)[..., cols - 14]
    assert (got[0] - p).abs().max() < 1e-6
    assert (whole[0] - p).abs().max() > 1e-2  # the whole softmax, biased and extended, is another thing
    with pytest.raises(ValueError, match="holds every probed column"):
        attend(q, k, v, [Probe(torch.tensor([3]), got.append, where, over=text)])


def test_output_mix_softpag_identity_form():
    """(1-u)·A + u·I on selected heads equals (1-u)·out + u·v: the mix sees full q/k/v of its heads."""
    q, k, v = qkv(6)
    u = 0.3
    heads = torch.tensor([1])
    mix = OutputMix(lambda o, qq, kk, vv: (1 - u) * o + u * vv, Selection(heads=heads))
    out = attend(q, k, v, [mix])
    _, p = reference(q, k, v)
    p_soft = p.clone()
    p_soft[:, :, 1] = (1 - u) * p[:, :, 1] + u * torch.eye(S)[None]
    ref = torch.einsum("bqhk,bkhd->bqhd", p_soft, v)
    assert (out - ref).abs().max() < 1e-5


def test_bf16_and_autograd():
    q, k, v = (t.requires_grad_() for t in qkv(7))
    kb = KeyBias(torch.tensor([2]), torch.full((1, 1, 1, 1), 1.0), Selection())
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), [kb])
    assert out.dtype == torch.bfloat16
    ref, _ = reference(q.detach(), k.detach(), v.detach(), [kb])
    assert (out.float() - ref).abs().max() < 5e-2
    attend(q, k, v, [kb]).sum().backward()  # the gradient pass a latent-optimising control needs
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unknown_contribution_is_an_error():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="unknown attention contribution"):
        attend(q, k, v, [object()])


def test_key_bias_as_a_function_of_logits_and_lse():
    """A bias computed from the plain logits/LSE (as an optimising control does) equals the same fixed bias."""
    q, k, v = qkv(8)
    cols = torch.tensor([3, 7])
    seen = {}

    def f(logits, lse):
        seen["p"] = torch.exp(logits - lse[..., None])  # plain probabilities of the columns
        return 0.5 * logits

    where = Selection(rows=slice(0, 10))
    out = attend(q, k, v, [KeyBias(cols, f, where)])
    _, p = reference(q, k, v)
    assert (seen["p"] - p[:, 0:10][..., cols]).abs().max() < 1e-6
    logits = torch.einsum("bqhd,bkhd->bqhk", q, k[:, cols]) / math.sqrt(D)
    ref, _ = reference(q, k, v, [KeyBias(cols, 0.5 * logits[:, 0:10], where)])
    assert (out - ref).abs().max() < 1e-5


def within_reference(q, k, v, kb: KeyBias, other=(), mask=None):
    """A ``within`` bias written plainly: each selected row keeps its plain total probability on the ``within``
    keys and splits it by ``softmax(s + b)`` over those keys; then ``other`` biases act on the result's logits.
    ``mask``: an additive ``(B, S, H, keys)`` attention mask, part of the plain logits ``s``."""
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D)
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, dim=-1)
    w0, w1, _ = kb.within.indices(S)
    bias = full_bias([KeyBias(kb.cols, kb.bias, kb.where)], S)[..., w0:w1]
    inside = torch.softmax(s[..., w0:w1] + bias, dim=-1) * p[..., w0:w1].sum(-1, keepdim=True)
    p[..., w0:w1] = torch.where(selected(kb.where)[..., None], inside, p[..., w0:w1])
    logits = torch.log(p) + full_bias(list(other), S)
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bqhk,bkhd->bqhd", p, v), p


def test_within_key_bias_keeps_the_mass_of_its_keys():
    """The fused form equals the plain reference, the keys outside ``within`` keep their probability, and rows
    and heads outside the selection are bit for bit the plain output."""
    q, k, v = qkv(11)
    where = Selection(torch.tensor([0, 2]), slice(0, 12), torch.tensor([0, 3]))
    bias = 2.0 * torch.randn(2, 12, 2, 2)
    kb = KeyBias(torch.tensor([14, 17]), bias, where, within=slice(12, 20))
    probs = []
    out = attend(q, k, v, [kb, Probe(torch.arange(S), probs.append, where)])
    ref, p_ref = within_reference(q, k, v, kb)
    assert (out - ref).abs().max() < 1e-5
    _, p_plain = reference(q, k, v)
    sel = p_plain[[0, 2]][:, 0:12][:, :, [0, 3]]
    assert (probs[0] - p_ref[[0, 2]][:, 0:12][:, :, [0, 3]]).abs().max() < 1e-6
    assert (probs[0][..., :12] - sel[..., :12]).abs().max() < 1e-6  # the other keys keep their probability
    assert (probs[0][..., [14, 17]] - sel[..., [14, 17]]).abs().max() > 1e-2  # and the bias did move the split
    assert_plain_outside(q, k, v, out, where)


def test_within_key_bias_function_gets_the_within_lse_and_composes():
    """A function form sees the LSE over the ``within`` keys; combined with a plain KeyBias, a dense bias (the
    explicit path) or a second ``within`` bias on the same rows, the result is the plain composition."""
    q, k, v = qkv(12)
    within = slice(10, 20)
    seen = {}

    def f(logits, lse):
        seen["lse"] = lse
        return torch.ones_like(logits) * torch.tensor([1.5, -0.5])

    kb = KeyBias(torch.tensor([11, 15]), f, Selection(rows=slice(0, 10)), within=within)
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D)
    out = attend(q, k, v, [kb])
    assert (seen["lse"] - torch.logsumexp(s[:, 0:10, :, within], -1)).abs().max() < 1e-5
    fixed = KeyBias(kb.cols, torch.tensor([1.5, -0.5]).expand(B, 10, H, 2), kb.where, within=within)
    assert (out - within_reference(q, k, v, fixed)[0]).abs().max() < 1e-5
    plain_kb = KeyBias(torch.tensor([3, 15]), torch.full((1, 1, 1, 2), 0.8), Selection(rows=slice(5, 20)))
    ref, _ = within_reference(q, k, v, fixed, [plain_kb])
    assert (attend(q, k, v, [fixed, plain_kb]) - ref).abs().max() < 1e-5
    assert (attend(q, k, v, [plain_kb, fixed]) - ref).abs().max() < 1e-5  # order of the list does not matter
    dense = DenseBias(lambda r0, r1: torch.zeros(1, r1 - r0, 1, S), Selection())
    assert (attend(q, k, v, [fixed, dense]) - within_reference(q, k, v, fixed)[0]).abs().max() < 1e-5
    # two within biases on the same rows: their effective biases add (explicit path)
    second = KeyBias(torch.tensor([12]), torch.full((B, 10, H, 1), 1.0), kb.where, within=within)
    s_w = s[:, 0:10, :, within]
    eff = torch.zeros(B, S, H, S)
    for c in (fixed, second):
        b = torch.zeros(B, 10, H, 10)
        b[..., c.cols - 10] = c.bias
        shift = torch.logsumexp(s_w + b, -1) - torch.logsumexp(s_w, -1)
        eff[:, 0:10, :, within] += b - shift[..., None]
    ref = torch.einsum("bqhk,bkhd->bqhd", torch.softmax(s + eff, -1), v)
    assert (attend(q, k, v, [fixed, second]) - ref).abs().max() < 1e-5
    # on disjoint batch rows they stay on the fused path and each keeps its own rows' mass
    a = KeyBias(fixed.cols, fixed.bias[:1], Selection(torch.tensor([0]), slice(0, 10)), within=within)
    b = KeyBias(fixed.cols, fixed.bias[:1], Selection(torch.tensor([1, 2]), slice(0, 10)), within=within)
    assert (attend(q, k, v, [a, b]) - within_reference(q, k, v, fixed)[0]).abs().max() < 1e-5


def test_selections_are_compared_on_the_host_without_reading_the_device(monkeypatch):
    """Index tensors made by ``index_tensor`` (as ``RunState.index`` makes them) keep their values on the host, so
    attend decides whether two within-biases overlap, and which rows the explicit path covers, without reading the
    device. The meta device, which has no values to read, stands in for a GPU: the answers and the path taken are
    those of the CPU."""
    import importlib

    from attnctl.controls.base import RunState
    from attnctl.processors.contributions import host_values, index_tensor

    attend_mod = importlib.import_module("attnctl.processors.attend")  # the module (the package exports the function)

    state = RunState()
    assert host_values(state.index([2, 0], "meta")) == (2, 0)
    assert host_values(torch.tensor([1], device="meta")) is None  # made elsewhere: unknown
    for device in ("cpu", "meta"):
        a = Selection(index_tensor([0, 1], device), slice(0, 10))
        b = Selection(index_tensor([2], device), slice(0, 10))
        c = Selection(index_tensor([1, 2], device), slice(5, 20))
        assert attend_mod._disjoint(a, b, S) and not attend_mod._disjoint(a, c, S)
        assert host_values(attend_mod._union([a, c], B, "batch", device)) == (0, 1, 2)
        assert attend_mod._covers(c.batch, index_tensor([2], device), B)
        assert not attend_mod._covers(b.batch, index_tensor([1, 2], device), B)
    explicit_calls = []
    real_explicit = attend_mod._explicit
    monkeypatch.setattr(attend_mod, "_explicit", lambda *a, **kw: explicit_calls.append(1) or real_explicit(*a, **kw))
    for device in ("meta", "cpu"):
        q, k, v = (x.to(device) for x in qkv(14))
        bias = torch.full((1, 10, 1, 1), 1.5, device=device)
        first = KeyBias(index_tensor([12], device), bias, Selection(index_tensor([0, 1], device), slice(0, 10)),
                        within=slice(10, 20))
        second = KeyBias(index_tensor([15], device), bias, Selection(index_tensor([2], device), slice(0, 10)),
                         within=slice(10, 20))
        out = attend(q, k, v, [first, second])
        assert out.shape == q.shape and not explicit_calls  # disjoint: each corrected in the fused form
    # and on the CPU that form equals each bias alone on its rows
    assert (out[:2] - within_reference(q, k, v, first)[0][:2]).abs().max() < 1e-5
    assert (out[2:] - within_reference(q, k, v, second)[0][2:]).abs().max() < 1e-5
    plain_meta = Selection(torch.tensor([0, 1], device="meta"), slice(0, 10))
    assert not attend_mod._disjoint(plain_meta, Selection(index_tensor([2], "meta"), slice(0, 10)), S)  # cannot tell


def test_within_key_bias_bad_input():
    q, k, v = qkv(13)
    with pytest.raises(ValueError, match="outside it"):
        attend(q, k, v, [KeyBias(torch.tensor([2, 15]), torch.zeros(1), Selection(), within=slice(10, 20))])


@pytest.mark.parametrize("big", [100.0, 500.0, float("-inf")])
def test_key_biases_past_the_float32_exp_range_match_the_reference(big):
    """``expm1`` of a bias above ~88 overflows float32: the correction of the fused output works shifted by the
    row's largest exponent instead, for a plain and a ``within`` bias, with two large columns in some rows and none
    in others; the output and the final probabilities (which read the corrected LSE) match a float64 materialised
    softmax."""
    q, k, v = qkv(14)
    where = Selection(torch.tensor([0, 2]), slice(0, 12), None)
    bias = torch.tensor([big, 1.0, -2.0]).repeat(2, 12, H, 1)
    bias[1, :, 0, 1] = big
    bias[0, 4:7, :, 0] = 0.5
    wide = [t.double() for t in (q, k, v)]
    for kb, (ref, p_ref) in (
            (KeyBias(torch.tensor([13, 15, 18]), bias, where), reference(*wide, [KeyBias(torch.tensor([13, 15, 18]),
                                                                                         bias, where)])),
            (KeyBias(torch.tensor([13, 15, 18]), bias, where, within=slice(12, 20)),
             within_reference(*wide, KeyBias(torch.tensor([13, 15, 18]), bias, where, within=slice(12, 20))))):
        probs = []
        out = attend(q, k, v, [kb, Probe(torch.arange(S), probs.append, where)])
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-5
        # (a probe takes exp(s + b − lse) in float32: a logit of 500 holds it to about 3e-5)
        assert (probs[0] - p_ref[[0, 2]][:, 0:12]).abs().max() < 1e-4
        assert_plain_outside(q, k, v, out, where)
    qg = q.clone().requires_grad_()
    attend(qg, k, v, [KeyBias(torch.tensor([13, 15, 18]), bias, where)]).sum().backward()
    assert torch.isfinite(qg.grad).all()


def masks(kind: str):
    """An attention mask in the dispatcher's convention, and the same mask as an additive ``(B, S, H, keys)``
    tensor for the references. Keys 3 and 14 are masked where the tests bias or probe them."""
    g = torch.Generator().manual_seed(3)
    if kind == "padding (B, keys)":  # FLUX's text padding mask, as diffusers passes it
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, [3, 14]] = False
        keep[2, [5, 14]] = False
        return keep, torch.zeros(B, 1, 1, S).masked_fill(~keep[:, None, None, :], float("-inf")).expand(B, S, H, S)
    if kind == "bool (B, 1, S, keys)":  # per query row
        keep = torch.ones(B, 1, S, S, dtype=torch.bool)
        keep[:, :, :6, 3] = False
        keep[1, :, 4:, 14] = False
        add = torch.zeros(B, 1, S, S).masked_fill(~keep, float("-inf"))
        return keep, add.permute(0, 2, 1, 3).expand(B, S, H, S)
    add = 0.5 * torch.randn(B, H, S, S, generator=g)  # additive, per head
    add[0, :, :, 3] = float("-inf")
    add[1, 2, 4:8, 14] = float("-inf")
    return add, add.permute(0, 2, 1, 3)


@pytest.mark.parametrize("kind", ["padding (B, keys)", "bool (B, 1, S, keys)", "additive (B, H, S, keys)"])
def test_chunked_lse_under_a_mask_in_small_chunks(kind):
    """The chunked LSE (the fallback for backends that do not return it) takes each chunk's rows of the mask."""
    q, k, _ = qkv(23)
    mask, add = masks(kind)
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D) + add
    assert (chunked_lse(q, k, mask, max_chunk_elems=3 * B * H * S) - torch.logsumexp(s, -1)).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["padding (B, keys)", "bool (B, 1, S, keys)", "additive (B, H, S, keys)"])
def test_every_contribution_respects_the_attention_mask(kind):
    """Under an attention mask, key biases (tensor and function forms, joint and ``within``), probes and a dense
    bias equal the plain references with the mask in their logits: a masked key gets no probability however
    it is biased, and a function form sees the masked logits."""
    q, k, v = qkv(21)
    mask, add = masks(kind)
    assert (attend(q, k, v, [], attn_mask=mask) - reference(q, k, v, mask=add)[0]).abs().max() < 1e-5
    where = Selection(torch.tensor([0, 1]), slice(0, 12), None)
    kb = KeyBias(torch.tensor([2, 3, 14]), torch.tensor([1.0, 2.5, -0.5]), where)
    got = []
    probe = Probe(torch.arange(S), got.append, Selection(rows=slice(2, 16)))
    out = attend(q, k, v, [kb, probe], attn_mask=mask)
    ref, p = reference(q, k, v, [kb], mask=add)
    assert (out - ref).abs().max() < 1e-5
    assert (got[0] - p[:, 2:16]).abs().max() < 1e-6
    assert got[0][add[:, 2:16] == float("-inf")].abs().max() == 0  # masked keys: no probability at all
    seen = {}

    def f(logits, lse):
        seen["p"] = torch.exp(logits - lse[..., None])
        return torch.tensor([1.0, 2.5, -0.5]).expand(logits.shape)

    out_f = attend(q, k, v, [KeyBias(kb.cols, f, where)], attn_mask=mask)
    assert (out_f - ref).abs().max() < 1e-5
    assert (seen["p"] - reference(q, k, v, mask=add)[1][:2, 0:12][..., kb.cols]).abs().max() < 1e-6
    within = KeyBias(torch.tensor([11, 14]), torch.tensor([2.0, 1.5]).expand(2, 12, H, 2), where,
                     within=slice(10, 20))
    ref_w, _ = within_reference(q, k, v, within, mask=add)
    assert (attend(q, k, v, [within], attn_mask=mask) - ref_w).abs().max() < 1e-5
    dense = DenseBias(lambda r0, r1: torch.zeros(1, r1 - r0, 1, S), Selection())  # the explicit path
    assert (attend(q, k, v, [within, dense], attn_mask=mask) - ref_w).abs().max() < 1e-5


def test_an_output_mix_runs_under_a_mask_when_it_cannot_change_it_or_is_given_it():
    """A mask-free mix (SoftPAG's joint identity form) composes with the masked attention of the other rows; a mix
    with ``context=True`` receives the mask of its selection as additive logits (and the backend); any other mix
    would ignore the mask, so it is refused at a masked call."""
    q, k, v = qkv(22)
    mask, add = masks("padding (B, keys)")
    u = 0.3
    identity = OutputMix(lambda o, qq, kk, vv: (1 - u) * o + u * vv, Selection(heads=torch.tensor([1])),
                         mask_free=True)
    _, p = reference(q, k, v, mask=add)
    p[:, :, 1] = (1 - u) * p[:, :, 1] + u * torch.eye(S)[None]
    ref = torch.einsum("bqhk,bkhd->bqhd", p, v)
    assert (attend(q, k, v, [identity], attn_mask=mask) - ref).abs().max() < 1e-5
    seen = {}

    def uniform_over_unmasked(o, qq, kk, vv, ctx):
        seen["mask"], seen["backend"] = ctx.mask, ctx.backend
        return torch.einsum("brhk,bkhd->brhd", torch.softmax(ctx.mask, -1).expand(*o.shape[:3], -1), vv)

    where = Selection(batch=torch.tensor([0, 2]), rows=slice(4, 9))
    given = OutputMix(uniform_over_unmasked, where, context=True)
    got = attend(q, k, v, [given], attn_mask=mask, backend="native")
    assert torch.equal(seen["mask"].expand(2, 5, H, S), add[[0, 2], 4:9])
    assert seen["backend"] == "native"
    keep = mask[[0, 2]].float()
    mean_unmasked = (torch.einsum("bk,bkhd->bhd", keep, v[[0, 2]]) / keep.sum(1)[:, None, None])[:, None]
    assert (got[[0, 2], 4:9] - mean_unmasked).abs().max() < 1e-5
    untouched = ~selected(where)
    assert torch.equal(got[untouched], attend(q, k, v, [], attn_mask=mask)[untouched])
    uniform = OutputMix(lambda o, qq, kk, vv: vv.mean(1, keepdim=True).expand_as(o), Selection())
    assert attend(q, k, v, [uniform]).shape == q.shape  # fine without a mask
    with pytest.raises(ValueError, match="attention mask.*mask_free.*context=True"):
        attend(q, k, v, [uniform], attn_mask=mask)
    with pytest.raises(ValueError, match=r"not \(3, 20, 20\)"):
        attend(q, k, v, [uniform], attn_mask=torch.ones(B, S, S, dtype=torch.bool))


def test_controls_under_context_parallelism_are_refused():
    """Under context parallelism each process holds a shard of the keys: a control's correction would be computed
    on the wrong keys, so attend says so instead."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    from attnctl.errors import UnsupportedModelError

    q, k, v = qkv(23)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(UnsupportedModelError, match="cannot run under context parallelism.*ContextParallelConfig"):
        attend(q, k, v, [KeyBias(torch.tensor([3]), torch.ones(1), Selection())], parallel_config=config)

