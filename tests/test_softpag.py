"""SoftPAG against materialised references, diffusers' PAG, and the batched guidance of both pipelines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import batch_row, ip_adapter_processor, transformer_inputs

import attnctl
from attnctl.controls.base import Control, ControlConfig, RunState
from attnctl.errors import ConfigError, ScheduleError, SiteError
from attnctl.guidance import guidance_shift, guided
from attnctl.layout import TokenLayout
from attnctl.processors.attend import attend, fused_attention

KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=24)
TARGETS = ("identity", "uniform", "mean_query")
SCOPES = ("joint", "image")


# ------------------------------------------------------------------------------------ plain references


def materialised(q, k, v, u, target, scope, img, txt, mask=None):
    """SoftPAG written plainly, in float64: full softmax map A, target map T, (1−u)·A + u·T, then @ V.
    ``mask``: additive, broadcastable to ``(b, h, queries, keys)``; every target's logits include it, the uniform
    targets weigh the keys as ``softmax(mask)`` does (the joint identity target is each row's own value, masked or
    not)."""
    q, k, v = (x.double() for x in (q, k, v))
    S, d = q.shape[1], q.shape[-1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    m = torch.zeros_like(s) if mask is None else mask.double().expand_as(s)
    s = s + m
    A = torch.softmax(s, -1)
    if scope == "joint":
        if target == "identity":
            T = torch.eye(S, dtype=A.dtype).expand_as(A)
        elif target == "uniform":
            T = torch.softmax(m, -1)  # 1/N without a mask
        else:
            qbar = mean_present(q, m)  # mean query of all rows (but padding)
            T = torch.softmax((torch.einsum("bhd,bkhd->bhk", qbar, k) / math.sqrt(d))[:, :, None] + m, -1)
    else:  # image rows: softmax over logits whose image→image block is replaced; text rows keep A
        logits = s[:, :, img].clone()
        m_block = m[:, :, img][..., img]
        n = m_block.shape[-1]
        if target == "identity":
            eye = torch.eye(n, dtype=torch.bool)
            block = logits[..., img].masked_fill(~eye, float("-inf"))
        elif target == "uniform":  # every image key gets the row's mean image logit (mean over what it may see)
            kbar = torch.einsum("bhqk,bkhd->bhqd", torch.softmax(m_block, -1), k[:, img])
            block = (torch.einsum("bqhd,bhqd->bhq", q[:, img], kbar) / math.sqrt(d))[..., None] + m_block
        else:
            qbar = mean_present(q[:, img], m_block)
            block = (torch.einsum("bhd,bkhd->bhk", qbar, k[:, img]) / math.sqrt(d))[:, :, None] + m_block
        logits[..., img] = block
        T = A.clone()
        T[:, :, img] = torch.softmax(logits, -1)
    M = (1 - u) * A + u * T
    return torch.einsum("bhqk,bkhd->bqhd", M, v)


def mean_present(q, m):
    """The mean of the queries ``q`` ``(b, n, h, d)`` over the positions whose key the mask ``m`` ``(b, h, n, n)``
    (rows: these queries) keeps for at least one of them: padding is left out."""
    present = ~torch.isneginf(m).all(dim=2)  # (b, h, n)
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[3], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            out[b, h] = q[b, present[b, h], h].mean(0)
    return out


def call_mask(kind: str, B: int, H: int, S: int, img: slice, txt: slice, seed: int = 0):
    """An attention mask in the dispatcher's convention for a call of ``S`` keys, and the same mask as an additive
    ``(B, H, S, S)`` tensor for :func:`materialised`. Each removes some text and some image keys."""
    g = torch.Generator().manual_seed(seed)
    t, i = list(range(S))[txt], list(range(S))[img]
    if kind == "padding (B, keys)":  # FLUX's text padding mask, as diffusers passes it
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, t[-2:]] = False
        keep[-1, [t[1], i[3]]] = False
        add = torch.zeros(B, 1, 1, S).masked_fill(~keep[:, None, None, :], float("-inf"))
        return keep, add
    if kind == "bool (B, 1, S, keys)":  # per query row, own image keys included
        keep = torch.ones(B, 1, S, S, dtype=torch.bool)
        keep[:, :, : S // 2, t[0]] = False
        keep[-1, :, i[2] :, i[2]] = False
        keep[0, :, i[0], i[0]] = False  # an image row that may not see itself
        return keep, torch.zeros(B, 1, S, S).masked_fill(~keep, float("-inf"))
    add = 0.5 * torch.randn(B, H, S, S, generator=g)  # additive, per head
    add[0, :, :, t[-1]] = float("-inf")
    add[-1, 1, i[1] : i[5], i[4]] = float("-inf")
    return add, add


MASKS = ("padding (B, keys)", "bool (B, 1, S, keys)", "additive (B, H, S, keys)")


class Capture(Control):
    """Keeps the q, k, v and call of every attention call (tiny models only)."""

    kind = "test-capture"
    Config = ControlConfig

    def __init__(self):
        super().__init__()
        self.calls = []

    def contribute(self, call, q, k, v, state):
        self.calls.append((call, q.clone(), k.clone(), v.clone(), list(state.roles)))
        return []


def half_the_heads(sites):
    """Pairs (site, head) over every site: heads 1 and 3 of 4 (SD3), head 1 of 2 (FLUX)."""
    return [(s.name, h) for s in sites for h in range(1, s.heads, 2)]


def run(transformer, controls, roles, inputs):
    ctl = attnctl.Controller(transformer, controls, roles=roles)
    saved = dict(transformer.attn_processors)
    transformer.set_attn_processor(ctl.processors())
    ctl.close()
    try:
        ctl.begin_run(1, layout=TokenLayout(ctl.family, inputs["encoder_hidden_states"].shape[1], (4, 4)))
        with torch.no_grad():
            return transformer(**inputs)[0], ctl
    finally:
        transformer.set_attn_processor(saved)


# ------------------------------------------------------------------------------------ fused forms


@pytest.mark.parametrize("kind", [None, *MASKS])
@pytest.mark.parametrize("fixture", ["sd3_pipe", "sd35_pipe", "flux_pipe"])
def test_fused_forms_equal_materialised_reference_at_every_site(request, fixture, kind):
    """Every target in both scopes equals the plain reference at every site; under each mask shape the dispatcher
    takes (``kind``), with the mask in all of its logits (a target gives no weight to a masked key). The other
    rows and heads keep the plain (masked) attention bit for bit."""
    tr = request.getfixturevalue(fixture).transformer
    inputs = transformer_inputs(tr, batch=2)
    sites = attnctl.list_sites(tr)
    kinds = {s.kind for s in sites}
    assert kinds in ({"sd3_joint"}, {"sd3_joint", "sd3_image"}, {"flux_double", "flux_single"})
    cap = Capture()
    run(tr, [cap], ["cond", "perturbed"], inputs)
    pairs = half_the_heads(sites)
    calls = cap.calls
    if kind is not None:  # two joint sites (a double and a single block in FLUX); no stock processor masks attn2
        calls = [c for c in cap.calls if c[0].text_slice().stop > c[0].text_slice().start][:2]
    for target in TARGETS:
        for scope in SCOPES:
            for u in (1.0, 0.3):
                pag = attnctl.SoftPAG.from_pairs(pairs, u=u, target=target, scope=scope)
                ctl = attnctl.Controller(tr, [pag], roles=["cond", "perturbed"])
                ctl.close()
                for call, q, k, v, roles in calls:
                    B, S, H, _ = q.shape
                    img, txt = call.image_slice(), call.text_slice()
                    mask, add = (None, None) if kind is None else call_mask(kind, B, H, S, img, txt)
                    got = attend(q, k, v, pag.contribute(call, q, k, v, RunState(roles=roles)), attn_mask=mask)
                    plain = fused_attention(q, k, v, attn_mask=mask)
                    heads = list(pag.heads_at(call.site))
                    others = [h for h in range(H) if h not in heads]
                    add_h = None if add is None else add[1:, heads] if add.shape[1] > 1 else add[1:]
                    ref = materialised(q[1:, :, heads], k[1:, :, heads], v[1:, :, heads], u, target, scope,
                                       img, txt, mask=add_h)
                    err = (got[1:, :, heads].double() - ref).abs().max().item()
                    assert err <= 1e-5, (fixture, call.site.name, kind, target, scope, u, err)
                    # the cond row and the unselected heads are the plain fused result, bit for bit
                    assert torch.equal(got[:1], plain[:1])
                    assert torch.equal(got[:, :, others], plain[:, :, others])
                    if scope == "image":  # text rows untouched
                        assert torch.equal(got[:, txt], plain[:, txt])


def test_the_image_scope_text_pass_runs_on_the_processors_backend(flux_pipe, monkeypatch):
    """The image scope's own fused pass over the text keys goes to the backend the processors were given (a spy
    standing in for xformers here), not to diffusers' active backend, and gives the same result."""
    import torch.nn.functional as F
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    tr = flux_pipe.transformer
    inputs = transformer_inputs(tr, batch=2)
    pag = attnctl.SoftPAG(heads=["L0H0", "L2H1"], u=0.7, scope="image", target="uniform")
    native, _ = run(tr, [pag], ["cond", "perturbed"], inputs)
    seen = []

    def spy(query, key, value, attn_mask=None, scale=None, **_):
        seen.append((query.shape[1], key.shape[1]))
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2)

    name = AttentionBackendName.XFORMERS
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    monkeypatch.setitem(_AttentionBackendRegistry._supported_arg_names, name,
                        {"query", "key", "value", "attn_mask", "scale"})
    ctl = attnctl.Controller(tr, [pag], roles=["cond", "perturbed"])
    saved = dict(tr.attn_processors)
    procs = ctl.processors()
    for proc in procs.values():
        proc._attention_backend = name
    tr.set_attn_processor(procs)
    ctl.close()
    try:
        ctl.begin_run(1, layout=TokenLayout(ctl.family, inputs["encoder_hidden_states"].shape[1], (4, 4)))
        with torch.no_grad():
            routed = tr(**inputs)[0]
    finally:
        tr.set_attn_processor(saved)
    n_txt, n_img = inputs["encoder_hidden_states"].shape[1], 16
    text_passes = [s for s in seen if s == (n_img, n_txt)]
    assert len(seen) == len(ctl.sites) + 2 and len(text_passes) == 2  # every site, and the two perturbed ones
    assert (routed - native).abs().max() <= 1e-5


def test_u0_is_plain_attention_and_u1_joint_identity_is_the_identity_map(sd35_pipe):
    tr = sd35_pipe.transformer
    inputs = transformer_inputs(tr, batch=2)
    plain, _ = run(tr, [], ["cond", "perturbed"], inputs)
    pag0 = attnctl.SoftPAG(heads=["all"], u=0.0)
    zero, _ = run(tr, [pag0], ["cond", "perturbed"], inputs)
    assert torch.equal(zero, plain)

    # u = 1, joint identity on every head: each token's attention output is its own value (A = I)
    q, k, v = (torch.randn(1, 10, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    from attnctl.processors.base import SiteCall

    site = attnctl.list_sites(tr)[0]
    call = SiteCall(site, 1, 10, 4, True, q.device, q.dtype)
    pag = attnctl.SoftPAG(heads=["L0"], u=1.0)
    attnctl.Controller(tr, [pag]).close()
    out = attend(q, k, v, pag.contribute(call, q, k, v, RunState(roles=["perturbed"])))
    ref = materialised(q, k, v, 1.0, "identity", "joint", slice(0, 6), slice(6, 10))
    assert torch.equal(out, v) and (out.double() - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("masked", [False, True])
def test_transformer_output_equals_materialised_control(flux_pipe, masked):
    """End to end through every site of FLUX (double and single blocks), with and without a text padding mask
    (FLUX's ``attention_mask``): fused SoftPAG = a control that materialises the full map in the processor."""
    tr = flux_pipe.transformer
    inputs = transformer_inputs(tr, batch=2)
    add = None
    if masked:
        keep = torch.ones(2, inputs["encoder_hidden_states"].shape[1] + 16, dtype=torch.bool)
        keep[:, 5:7] = False  # two padding text tokens (text comes first in FLUX)
        keep[0, 3] = False
        inputs["joint_attention_kwargs"] = {"attention_mask": keep}
        add = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))[:, None, None, :]

    class Materialised(attnctl.SoftPAG):
        kind = "test-materialised"

        def contribute(self, call, q, k, v, state):
            out = super().contribute(call, q, k, v, state)
            cfg = self.config
            u = cfg.u(state.step, state.num_steps)
            img, txt = call.image_slice(), call.text_slice()
            rows = slice(None) if cfg.scope == "joint" else img
            heads = list(self.heads_at(call.site))
            mask = None if add is None or not out else add[out[0].where.batch]

            def fn(o, q_, k_, v_, ctx=None):  # the full map of every head, then the selected heads' rows replaced
                ref = materialised(q_, k_, v_, u, cfg.target, cfg.scope, img, txt, mask=mask)[:, rows].to(o.dtype)
                res = o.clone()
                res[:, :, heads] = ref[:, :, heads]
                return res

            for c in out:  # same selection (perturbed rows, query rows), materialised map instead
                c.fn = fn
            return out

    pairs = half_the_heads(attnctl.list_sites(tr))
    for pag_scope in SCOPES:
        for target in TARGETS:
            kw = dict(u=0.6, target=target, scope=pag_scope)
            fused, _ = run(tr, [attnctl.SoftPAG.from_pairs(pairs, **kw)], ["cond", "perturbed"], inputs)
            ref, _ = run(tr, [Materialised.from_pairs(pairs, **kw)], ["cond", "perturbed"], inputs)
            assert (fused - ref).abs().max() <= 1e-5, (pag_scope, target)


# ------------------------------------------------------------------------------------ diffusers' PAG


def test_reproduces_diffusers_pag_processor_and_pipeline(sd3_pipe):
    from diffusers import StableDiffusion3PAGPipeline
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    tr = sd3_pipe.transformer
    assert tr.config.qk_norm is None
    # 1) the perturbed branch of one transformer call: [cond, ptb] with identical inputs
    inputs = transformer_inputs(tr, batch=1)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
        inputs[name] = inputs[name].repeat(2, *[1] * (inputs[name].ndim - 1))
    saved = dict(tr.attn_processors)
    tr.transformer_blocks[0].attn.set_processor(PAGJointAttnProcessor2_0())
    try:
        with torch.no_grad():
            theirs = tr(**inputs)[0]
    finally:
        tr.set_attn_processor(saved)
    pag = attnctl.SoftPAG(heads=["transformer_blocks.0"], u=1.0, target="identity", scope="image")
    ours, _ = run(tr, [pag], ["cond", "perturbed"], inputs)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours[1] - ours[0]).abs().max() > 1e-3  # the perturbation does something

    # 2) the full guided sample of StableDiffusion3PAGPipeline vs AttnCtlSD3Pipeline, with and without CFG
    from attnctl.pipelines import AttnCtlSD3Pipeline

    parts = {k: v for k, v in sd3_pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    theirs_pipe = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=["blocks.0"])
    theirs_pipe.set_progress_bar_config(disable=True)
    ours_pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    ours_pipe.set_progress_bar_config(disable=True)
    for cfg in (4.0, 1.0):
        kw = dict(KW, guidance_scale=cfg, output_type="latent")
        a = theirs_pipe("a red circle", pag_scale=2.5, generator=torch.Generator().manual_seed(0), **kw).images
        pag = attnctl.SoftPAG(heads=["transformer_blocks.0"], u=1.0, scope="image", scale=2.5)
        b = ours_pipe("a red circle", controls=[pag], generator=torch.Generator().manual_seed(0), **kw).images
        plain = ours_pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert (a - b).abs().max() <= 1e-5, cfg
        assert (b - plain).abs().max() > 1e-3
    assert {type(p).__name__ for p in tr.attn_processors.values()} == {"JointAttnProcessor2_0"}


# ------------------------------------------------------------------------------------ guidance


def test_batched_three_way_forward_equals_three_passes(sd35_pipe):
    tr = sd35_pipe.transformer
    pag = attnctl.SoftPAG(heads=["L0H0,2", "L1H1", "L3H0:4"], u=0.7, target="mean_query", scope="image")
    inputs = transformer_inputs(tr, batch=2)
    inputs = {k: (torch.cat([v, v[1:]]) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                 "timestep") else v) for k, v in inputs.items()}
    batched, _ = run(tr, [pag], ["uncond", "cond", "perturbed"], inputs)
    for i, role in enumerate(["uncond", "cond", "perturbed"]):
        one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 3 else v)
               for k, v in inputs.items()}
        alone, _ = run(tr, [pag], [role], one)
        assert (batched[i : i + 1] - alone).abs().max() <= 1e-5, role
    assert (batched[2] - batched[1]).abs().max() > 1e-3


def test_branches_batch_several_candidate_sets(flux_pipe):
    """A search scores several head sets in one forward: rows 'perturbed[i]' each get their own SoftPAG."""
    tr = flux_pipe.transformer
    sets = [[("transformer_blocks.0.attn", 0)], [("single_transformer_blocks.1.attn", 1)]]
    inputs = transformer_inputs(tr, batch=1)
    inputs = {k: (v.repeat(3, *[1] * (v.ndim - 1)) if k in ("hidden_states", "encoder_hidden_states",
                                                             "pooled_projections", "timestep") else v)
              for k, v in inputs.items()}
    controls = [attnctl.SoftPAG.from_pairs(s, branch=i) for i, s in enumerate(sets)]
    batched, _ = run(tr, controls, ["cond", "perturbed[0]", "perturbed[1]"], inputs)
    one = {k: (v[:1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep") else v)
           for k, v in inputs.items()}
    for i, s in enumerate(sets):
        alone, _ = run(tr, [attnctl.SoftPAG.from_pairs(s)], ["perturbed"], one)
        assert (batched[i + 1] - alone[0]).abs().max() <= 1e-5
    assert (batched[1] - batched[2]).abs().max() > 1e-4


def test_one_shift_on_every_prediction_of_an_image_gives_the_guided_formula_for_any_cfg_scale():
    """δ = w·(ε_cond − ε_ptb) added to the conditional and the unconditional prediction: the loop's CFG line gives
    the guided ε for every s (0 and 1 included); without CFG, ε_cond + δ is the guided ε."""
    g = torch.Generator().manual_seed(0)
    u, c, p = (torch.randn(2, 3, generator=g) for _ in range(3))
    w = 2.0
    delta = guidance_shift(c, p, w)
    for s in (4.5, 1.0, 0.0):
        assert torch.allclose((u + delta) + s * ((c + delta) - (u + delta)), guided(u, c, p, s, w), atol=1e-6)
        assert torch.allclose(guided(u, c, p, s, w), u + s * (c - u) + w * (c - p), atol=1e-6)
    assert torch.allclose(c + delta, guided(None, c, p, 1.0, w))
    assert torch.allclose(guided(None, c, p, 1.0, w), c + w * (c - p))


class Rows(Control):
    """Records the batch roles each attention call sees."""

    kind = "test-rows"
    Config = ControlConfig

    def __init__(self):
        super().__init__()
        self.seen = []

    def contribute(self, call, q, k, v, state):
        self.seen.append((state.step, tuple(state.roles), call.batch))
        return []


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_sd3_pipeline_runs_one_batched_forward_and_skips_w0_steps(sd3_pipe, cfg):
    from attnctl.pipelines import AttnCtlSD3Pipeline

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    rows = Rows()
    pag = attnctl.SoftPAG(heads=["L1H0:2"], scale="window(2.0, 0, 0.5)")  # w = 2 at step 0, 0 at step 1
    before = dict(pipe.transformer.attn_processors)
    pipe("a red circle", controls=[pag, rows], guidance_scale=cfg, output_type="latent", **KW)
    base = ("uncond", "cond") if cfg > 1 else ("cond",)
    assert {r for r in rows.seen if r[0] == 0} == {(0, (*base, "perturbed"), len(base) + 1)}
    assert {r for r in rows.seen if r[0] == 1} == {(1, base, len(base))}
    assert pipe.transformer.attn_processors == before and "forward" not in vars(pipe.transformer)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_flux_pipeline_shifts_the_cond_call_and_the_negative_call_after_it(flux_pipe, true_cfg):
    """Every transformer call the loop sees returns its plain ε plus δ = w(ε_cond − ε_ptb): the conditional call with
    its own perturbed rows, the true-CFG call for the negative prompt with the δ of its step's conditional call."""
    from attnctl.pipelines import AttnCtlFluxPipeline

    pipe = AttnCtlFluxPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    seen = []
    hook = tr.register_forward_hook(lambda m, a, kw, out: seen.append((dict(kw), out[0].clone())), with_kwargs=True)
    w = 1.5
    pairs = half_the_heads(attnctl.list_sites(tr))
    pag = attnctl.SoftPAG.from_pairs(pairs, u=0.8, scale=w)
    neg = {"negative_prompt": "a blue square", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    try:
        pipe("a red circle", controls=[pag], generator=torch.Generator().manual_seed(0), output_type="latent",
             **neg, **KW)
    finally:
        hook.remove()
    assert len(seen) == (4 if true_cfg > 1 else 2)
    delta = None
    for i, (kw, out) in enumerate(seen):
        negative = true_cfg > 1 and i % 2 == 1
        kw = {k: v for k, v in kw.items() if k != "joint_attention_kwargs"}
        plain, _ = run(tr, [], ["cond"], kw)
        if not negative:
            ptb, _ = run(tr, [attnctl.SoftPAG.from_pairs(pairs, u=0.8, scale=w)], ["perturbed"], kw)
            delta = w * (plain - ptb)
            assert (ptb - plain).abs().max() > 1e-4
        assert (out - (plain + delta)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_softpag_on_a_stock_pipeline_through_attach_and_set_attn_processor(sd3_pipe, flux_pipe, family):
    """On a stock diffusers pipeline, ``attnctl.attach`` and ``set_attn_processor(ctl.processors())`` run the
    perturbed branch themselves: the image equals the attnctl pipeline's with the same control and seed (CFG or
    FLUX's true CFG included), and differs from the unguided one; afterwards the pipeline is as it was."""
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    stock = sd3_pipe if family == "sd3" else flux_pipe
    ours = (AttnCtlSD3Pipeline if family == "sd3" else AttnCtlFluxPipeline)(**stock.components)
    ours.set_progress_bar_config(disable=True)
    calls = [{"guidance_scale": 3.0}, {"guidance_scale": 1.0}] if family == "sd3" else [
        {}, {"negative_prompt": "a blue square", "true_cfg_scale": 2.5}]

    def pag():
        return attnctl.SoftPAG(heads=["L0H1", "L1H0"], u=0.8, scale="window(2.0, 0, 0.5)")

    def gen(extra):
        return stock("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **extra,
                     **KW).images

    for extra in calls:
        plain = gen(extra)
        expect = ours("a red circle", controls=[pag()], generator=torch.Generator().manual_seed(0),
                      output_type="latent", **extra, **KW).images
        with attnctl.attach(stock, [pag()]):
            attached = gen(extra)
        ctl = attnctl.Controller(stock, [pag()])
        saved = dict(stock.transformer.attn_processors)
        stock.transformer.set_attn_processor(ctl.processors())
        try:
            by_processors = gen(extra)
        finally:
            stock.transformer.set_attn_processor(saved)
            ctl.close()
        assert (attached - expect).abs().max() <= 1e-5 and (by_processors - expect).abs().max() <= 1e-5, extra
        assert (expect - plain).abs().max() > 1e-4
        assert "forward" not in vars(stock.transformer) and (gen(extra) - plain).abs().max() == 0


def test_perturbed_rows_carry_a_per_image_attention_mask(flux_pipe):
    """A FLUX attention mask with one row per image is copied to the perturbed rows, as the other per-row inputs
    are (it was not, and the call failed on the mask's shape): the images equal those of one mask row shared."""
    from attnctl.pipelines import AttnCtlFluxPipeline

    pipe = AttnCtlFluxPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    n_keys = 24 + (32 // 8) ** 2 * 4  # the text, then the image tokens of a 32 px image

    def run(mask):
        return pipe("a red circle", controls=[attnctl.SoftPAG(heads=["L0H0"], scale=2.0)], num_images_per_prompt=2,
                    generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np",
                    joint_attention_kwargs={"attention_mask": mask}, **KW).images

    keep = torch.ones(1, n_keys, dtype=torch.bool)
    keep[:, 20:24] = False  # four padded text tokens
    assert abs(run(keep.expand(2, -1).clone()) - run(keep)).max() < 1e-6


def test_a_negative_prompt_call_before_the_conditional_one_is_an_error(flux_pipe):
    """The negative-prompt call of FLUX's true CFG takes the δ of its step's conditional call; a loop that made it
    first would leave that image without its guidance term, so the wrapper says so."""
    from attnctl.guidance import PerturbedBranch, perturbed_branches

    tr = flux_pipe.transformer
    inputs = transformer_inputs(tr, batch=1)
    ctl = attnctl.Controller(tr, [attnctl.SoftPAG(heads=["L0H0"], scale=1.0)], roles=["uncond"])
    ctl.install()
    try:
        ctl.begin_run(1, layout=TokenLayout(ctl.family, inputs["encoder_hidden_states"].shape[1], (4, 4)))
        with PerturbedBranch(tr, ctl, perturbed_branches(ctl.controls)), torch.no_grad(), \
                pytest.raises(ConfigError, match="negative prompt at step 0 before the conditional call"):
            tr(**inputs)
    finally:
        ctl.restore()


@pytest.mark.parametrize("offload", ["before attach", "inside attach"])
def test_softpag_through_attach_survives_model_cpu_offload(offload):
    """diffusers' model CPU offload takes its hooks off the transformer and puts new ones on at the end of every
    call, which drops a forward wrapper set on top of them: every call in an attach block is still guided, and
    after the block none is, whether offload was enabled before the block or inside it."""
    from attnctl.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline("sd3")  # its own modules: the offload hooks stay off the shared fixtures

    def gen():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                    output_type="latent", **KW).images

    plain = gen()
    if offload == "before attach":
        pipe.enable_model_cpu_offload(device="cpu")
    try:
        with attnctl.attach(pipe, [attnctl.SoftPAG(heads=["L0H1", "L1H0"], scale=2.0)]):
            if offload == "inside attach":
                pipe.enable_model_cpu_offload(device="cpu")
            first, second = gen(), gen()
        rows = []  # what the first block gets after the block: the CFG batch, no perturbed rows
        hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        after = gen()
        hook.remove()
    finally:
        pipe.remove_all_hooks()
    assert (first - plain).abs().max() > 1e-4
    assert (second - first).abs().max() <= 1e-6
    assert (after - plain).abs().max() <= 1e-6 and set(rows) == {2}


def test_sd3_skip_layer_guidance_term_stays_unbiased(sd3_pipe):
    """With SD3's skip-layer guidance, the skip-layer pass gets its step's δ too, so the loop's SLG term
    ``ε_cond' − ε_skip'`` equals the plain ``ε_cond − ε_skip``: the three guidance terms add up, none leaks into
    another."""
    seen = []
    tr = sd3_pipe.transformer
    hook = tr.register_forward_hook(lambda m, a, kw, out: seen.append((dict(kw), out[0].clone())), with_kwargs=True)
    pag = attnctl.SoftPAG(heads=["L0H1", "L1H0"], u=0.8, scale=2.0)
    try:
        with attnctl.attach(sd3_pipe, [pag]):
            sd3_pipe("a red circle", guidance_scale=3.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                     skip_layer_guidance_stop=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                     **KW)
    finally:
        hook.remove()
    assert [kw.get("skip_layers") is not None for kw, _ in seen] == [False, False, True]  # SLG at step 1 only
    (main_kw, main), (skip_kw, skip) = seen[1], seen[2]
    plain_main = tr(**main_kw)[0]
    plain_skip = tr(**skip_kw)[0]
    assert (main[1:] - plain_main[1:]).abs().max() > 1e-4  # the guidance moved the conditional prediction
    assert ((main[1:] - skip) - (plain_main[1:] - plain_skip)).abs().max() <= 1e-5


@pytest.mark.parametrize("extra", ["controlnet", "ip_adapter"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_perturbed_rows_carry_controlnet_residuals_and_ip_adapter_features(sd3_pipe, flux_pipe, family, extra):
    """The perturbed row gets its conditional row's ControlNet residuals (a ControlNet pipeline under
    attnctl.attach) or IP-adapter image features (an adapter on block 0): the folded ε equals separate calls of
    each row with its own inputs, and those inputs count (the conditional row moves with other ones)."""
    from attnctl.guidance import PerturbedBranch, perturbed_branches

    tr = (sd3_pipe if family == "sd3" else flux_pipe).transformer
    inputs = transformer_inputs(tr, batch=2)  # rows [uncond, cond]

    def extra_inputs(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        if extra == "controlnet":
            names = ["block_controlnet_hidden_states"] if family == "sd3" else ["controlnet_block_samples",
                                                                                "controlnet_single_block_samples"]
            return {name: [torch.randn(2, 16, tr.inner_dim, generator=g) for _ in range(2)] for name in names}
        if family == "sd3":  # what SD3's transformer makes of ip_adapter_image_embeds: features and their temb
            ip = {"ip_hidden_states": torch.randn(2, 4, 16, generator=g), "temb": torch.randn(2, 8, generator=g)}
        else:  # FLUX: one feature tensor per loaded adapter
            ip = {"ip_hidden_states": [torch.randn(2, 4, 16, generator=g) for _ in range(2)]}
        return {"joint_attention_kwargs": ip}

    inputs.update(extra_inputs(1))
    saved = dict(tr.attn_processors)
    base = dict(saved)
    if extra == "ip_adapter":
        base["transformer_blocks.0.attn.processor"] = ip_adapter_processor(family, tr)
    pairs = half_the_heads(attnctl.list_sites(tr))
    pag = attnctl.SoftPAG.from_pairs(pairs, u=0.8, scale=1.5)
    try:
        tr.set_attn_processor(dict(base))  # (diffusers empties the dict it is given)
        ctl = attnctl.Controller(tr, [pag], roles=["uncond", "cond"])
        tr.set_attn_processor(ctl.processors())
        ctl.close()
        ctl.begin_run(1, layout=TokenLayout(ctl.family, inputs["encoder_hidden_states"].shape[1], (4, 4)))
        with PerturbedBranch(tr, ctl, perturbed_branches(ctl.controls)) as branch, torch.no_grad():
            out = tr(**inputs)[0]
        assert branch.calls == 1
        tr.set_attn_processor(dict(base))  # the row calls below carry the adapter over as the batched call did
        uncond, _ = run(tr, [], ["uncond"], batch_row(inputs, 0, 2))
        cond, _ = run(tr, [], ["cond"], batch_row(inputs, 1, 2))
        ptb, _ = run(tr, [attnctl.SoftPAG.from_pairs(pairs, u=0.8, scale=1.5)], ["perturbed"], batch_row(inputs, 1, 2))
        other, _ = run(tr, [], ["cond"], batch_row({**inputs, **extra_inputs(2)}, 1, 2))
    finally:
        tr.set_attn_processor(saved)
    delta = 1.5 * (cond - ptb)  # the one shift of the image, on its unconditional and conditional prediction
    assert (out[:1] - (uncond + delta)).abs().max() <= 1e-5
    assert (out[1:] - (cond + delta)).abs().max() <= 1e-5
    assert (ptb - cond).abs().max() > 1e-4
    assert (other - cond).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_softpag_with_an_ip_adapter_through_the_pipelines(sd3_pipe, flux_pipe, family):
    """End to end: the pipeline's ``ip_adapter_image_embeds`` (what an image encoder gives) go through the
    transformer's own image projection for the perturbed rows too: SoftPAG runs its batched forward with the
    perturbed rows, and the image prompt changes the result."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, IPAdapterTimeImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    cls, stock = (AttnCtlSD3Pipeline, sd3_pipe) if family == "sd3" else (AttnCtlFluxPipeline, flux_pipe)
    pipe = cls(**stock.components)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    saved = dict(tr.attn_processors)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    # as load_ip_adapter leaves a transformer: an image projection (whose own attention layers keep their
    # processors) and an IP-adapter processor on every joint block
    if family == "sd3":
        proj, name = IPAdapterTimeImageProjection(embed_dim=12, output_dim=16, hidden_dim=16, depth=1, dim_head=8,
                                                  heads=2, num_queries=4, ffn_ratio=2, timestep_in_dim=8), "image_proj"

        def adapter():
            return SD3IPAdapterJointAttnProcessor2_0(tr.inner_dim, 16, tr.config.attention_head_dim, 16, scale=0.8)

        calls = [{"ip_adapter_image_embeds": torch.randn(2, 1, 12, generator=g)} for _ in range(2)]  # [neg, pos]
        roles = ("uncond", "cond", "perturbed")
    else:
        proj = MultiIPAdapterImageProjection([ImageProjection(image_embed_dim=12, cross_attention_dim=16,
                                                              num_image_text_embeds=4)])
        name = "encoder_hid_proj"

        def adapter():
            return FluxIPAdapterAttnProcessor(tr.inner_dim, 16, num_tokens=(4,), scale=[0.8])

        calls = [{"ip_adapter_image_embeds": [torch.randn(1, 1, 12, generator=g)],
                  "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 12)]} for _ in range(2)]
        roles = ("cond", "perturbed")
    setattr(tr, name, proj)
    ip = {key: adapter() if key in saved and key.startswith("transformer_blocks") else proc
          for key, proc in tr.attn_processors.items()}
    pag = attnctl.SoftPAG(heads=["L1H0:2"], scale=2.0)
    rows = Rows()
    try:
        tr.set_attn_processor(dict(ip))
        outs = [pipe("a red circle", controls=[pag, rows], generator=torch.Generator().manual_seed(0),
                     output_type="latent", **call, **KW).images for call in calls]
        assert dict(tr.attn_processors) == ip  # the adapter's processors are back after each call
    finally:
        delattr(tr, name)
        tr.set_attn_processor(saved)
    assert all(torch.isfinite(o).all() for o in outs)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # the image prompt reaches the result
    assert {r for _, r, _ in rows.seen} == {roles}


@pytest.mark.parametrize("name", ["ip_adapter_image_embeds", "ip_hidden_states"])
def test_ip_adapter_features_without_a_row_per_image_are_refused(sd3_pipe, name):
    from attnctl.guidance import PerturbedBranch, perturbed_branches

    tr = sd3_pipe.transformer
    inputs = transformer_inputs(tr, batch=2)
    inputs["joint_attention_kwargs"] = {name: torch.zeros(1, 4, 16), "temb": torch.zeros(2, 8)}
    ctl = attnctl.Controller(tr, [attnctl.SoftPAG(heads=["L0H0"], scale=1.0)], roles=["uncond", "cond"])
    ctl.install()
    try:
        ctl.begin_run(1, layout=TokenLayout(ctl.family, inputs["encoder_hidden_states"].shape[1], (4, 4)))
        with PerturbedBranch(tr, ctl, perturbed_branches(ctl.controls)), \
                pytest.raises(ConfigError, match=rf"{name}.*\(1, 4, 16\).*one entry per batch row \(2\)"):
            tr(**inputs)
    finally:
        ctl.restore()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_per_image_branches_equal_separate_calls(sd3_pipe, flux_pipe, family):
    """A search's batched call: image j of ``num_images_per_prompt=B`` guided by the control with ``branch=j``
    equals a call of its own with that control (same seed, same settings)."""
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    cls, base = (AttnCtlSD3Pipeline, sd3_pipe) if family == "sd3" else (AttnCtlFluxPipeline, flux_pipe)
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    sets = [["L0H1"], ["L1H0"], ["L0H1", "L1H1"]]
    extra = {"guidance_scale": 3.0} if family == "sd3" else {}

    def gen():
        return torch.Generator().manual_seed(7)

    batched = pipe("a red circle", controls=[attnctl.SoftPAG(heads=h, u=0.7, scale=2.0, branch=j)
                                             for j, h in enumerate(sets)],
                   num_images_per_prompt=len(sets), generator=[gen() for _ in sets], output_type="latent",
                   **extra, **KW).images
    plain = pipe("a red circle", generator=gen(), output_type="latent", **extra, **KW).images
    for j, h in enumerate(sets):
        alone = pipe("a red circle", controls=[attnctl.SoftPAG(heads=h, u=0.7, scale=2.0)], generator=gen(),
                     output_type="latent", **extra, **KW).images
        assert (batched[j] - alone[0]).abs().max() <= 1e-5
        assert (alone[0] - plain[0]).abs().max() > 1e-4  # the guidance did something


def test_pipeline_restores_forward_when_the_call_raises(sd3_pipe):
    from attnctl.pipelines import AttnCtlSD3Pipeline

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)

    def boom(*a, **k):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe("a red circle", controls=[attnctl.SoftPAG(heads=["L0H0"])], callback_on_step_end=boom, **KW)
    assert "forward" not in vars(pipe.transformer)
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())


# ------------------------------------------------------------------------------------ config and errors


def test_json_round_trip_and_head_sets(tmp_path, sd3_pipe, flux_pipe):
    pag = attnctl.SoftPAG(heads=["L0H1", "transformer_blocks.1.attn/H0,2"], u="linear(1, 0.25)",
                          target="uniform", scope="image", scale="window(3, 0, 0.6)")
    again = attnctl.control_from_json(pag.to_json())
    assert isinstance(again, attnctl.SoftPAG) and again.to_json() == pag.to_json()
    attnctl.Controller(sd3_pipe, [pag]).close()
    assert pag.heads_at("transformer_blocks.1.attn") == (0, 2)
    # a head set (as a search writes it) saved as a preset, loaded by path, round-trips with its heads
    pag.head_set.save(tmp_path / "preset.json")
    from_file = attnctl.SoftPAG(heads=str(tmp_path / "preset.json"))
    assert from_file.head_set.heads == pag.head_set.heads
    assert attnctl.control_from_json(from_file.to_json()).head_set.heads == pag.head_set.heads
    # ... and refuses a model it was not made for
    with pytest.raises(SiteError, match="made for a sd3 model and this is a flux model"):
        attnctl.Controller(flux_pipe, [from_file])


def test_preset_paths_fall_back_to_shipped_presets_by_bare_name_only(tmp_path, monkeypatch):
    """A mistyped folder silently loaded the shipped preset of the same file name; ``*.JSON`` was read as a site
    selector and a leading space made an existing file "not exist"."""
    from attnctl.controls.softpag import PRESETS_DIR

    monkeypatch.chdir(tmp_path)  # no preset of that name in the working directory
    shipped = attnctl.SoftPAG(heads="toy-sd3-headhunter.json").head_set  # a bare name: the shipped preset
    assert shipped.heads == attnctl.sites.HeadSet.load(PRESETS_DIR / "toy-sd3-headhunter.json").heads
    with pytest.raises(SiteError, match="'/nonexistent/dir/toy-sd3-headhunter.json' does not exist.*bare name"):
        attnctl.SoftPAG(heads="/nonexistent/dir/toy-sd3-headhunter.json")
    with pytest.raises(SiteError, match="does not exist"):
        attnctl.SoftPAG(heads=tmp_path / "sub" / "toy-sd3-headhunter.json")
    mine = attnctl.sites.HeadSet({"transformer_blocks.0.attn": (1,)})
    mine.save(tmp_path / "my-heads.JSON")
    mine.save(tmp_path / "my-heads.json")
    for spec in (str(tmp_path / "my-heads.JSON"), f" {tmp_path / 'my-heads.json'} ", "my-heads.JSON"):
        assert attnctl.SoftPAG(heads=spec).head_set.heads == mine.heads, spec


def _preset(folder, data):
    path = folder / "preset.json"
    path.write_text(json.dumps(data))
    return path


def test_bad_input_errors(sd3_pipe, tmp_path):
    with pytest.raises(SiteError, match="valid indices are 0..3"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["L0H7"])])
    with pytest.raises(SiteError, match="index 5 is out of range; valid indices are 0..1"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["L5H0"])])
    with pytest.raises(SiteError, match="matches no attention site"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["single_transformer_blocks.0.attn/H0"])])
    with pytest.raises(SiteError, match="has heads 0..3"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads={"transformer_blocks.0.attn": [4]})])
    with pytest.raises(SiteError, match="does not exist"):
        attnctl.SoftPAG(heads="no/such/preset.json")
    for wrong in ([1.7], [True], ["1"], 3, [None]):  # never read as some other head
        with pytest.raises(SiteError, match=r"heads of 'transformer_blocks.0.attn' are .*not a list of head numbers"):
            attnctl.SoftPAG(heads={"transformer_blocks.0.attn": wrong})
        with pytest.raises(SiteError, match=r"not a valid preset: the heads of .* not a list of head numbers"):
            attnctl.SoftPAG(heads=str(_preset(tmp_path, {"heads": {"transformer_blocks.0.attn": wrong}})))
    assert attnctl.SoftPAG(heads={"transformer_blocks.0.attn": [np.int64(2), 0, 2]}).head_set.heads == {
        "transformer_blocks.0.attn": (0, 2)}
    with pytest.raises(SiteError, match="not a head selection"):
        attnctl.SoftPAG(heads=3)
    with pytest.raises(ScheduleError, match=r"outside the allowed range \[0.0, 1.0\]"):
        attnctl.SoftPAG(heads=["L0H0"], u=1.5)
    with pytest.raises(ScheduleError, match=r"outside the allowed range"):
        attnctl.SoftPAG(heads=["L0H0"], u="linear(0, 2)")
    with pytest.raises(ScheduleError, match="nan"):
        attnctl.SoftPAG(heads=["L0H0"], u=float("nan"))
    with pytest.raises(ScheduleError, match="scale.*nan"):
        attnctl.SoftPAG(heads=["L0H0"], scale=float("nan"))
    with pytest.raises(ConfigError, match="target"):
        attnctl.SoftPAG(heads=["L0H0"], target="fisher_rao")
    two = [attnctl.SoftPAG(heads=["L0H0"], scale=1.0), attnctl.SoftPAG(heads=["L1H0"], scale=2.0)]
    with pytest.raises(ConfigError, match="different guidance scales"), attnctl.attach(sd3_pipe, two):
        pass
    assert "forward" not in vars(sd3_pipe.transformer) and "encode_prompt" not in vars(sd3_pipe)  # nothing left on
    assert not sd3_pipe.transformer._forward_pre_hooks
    from attnctl.pipelines import AttnCtlSD3Pipeline

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    two = [attnctl.SoftPAG(heads=["L0H0"], scale=2.0), attnctl.SoftPAG(heads=["L1H0"], scale=3.0)]
    with pytest.raises(ConfigError, match="same scale"):
        pipe("a red circle", controls=two, **KW)
    with pytest.raises(ConfigError, match=r"0\.\.1; missing \[0\]"):
        pipe("a red circle", controls=[attnctl.SoftPAG(heads=["L0H0"], branch=1)], **KW)
    with pytest.raises(ConfigError, match="some do not"):
        pipe("a red circle", controls=[attnctl.SoftPAG(heads=["L0H0"], branch=0), attnctl.SoftPAG(heads=["L1H0"])],
             **KW)
    with pytest.raises(ConfigError, match="num_images_per_prompt=2"):
        pipe("a red circle", controls=[attnctl.SoftPAG(heads=["L0H0"], branch=i) for i in range(2)], **KW)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scope", SCOPES)
def test_what_a_flux_padding_mask_removes_cannot_reach_the_perturbed_image(flux_pipe, target, scope):
    """With FLUX's text padding mask, every SoftPAG form perturbs the image, and the padded text tokens have no
    effect on it: changing their embeddings leaves the output as it was (it would not if a target read them)."""
    tr = flux_pipe.transformer
    inputs = transformer_inputs(tr, batch=1)
    mask = torch.ones(1, inputs["encoder_hidden_states"].shape[1] + 16, dtype=torch.bool)
    mask[0, 5:7] = False  # two padding text tokens
    inputs["joint_attention_kwargs"] = {"attention_mask": mask}
    pag = attnctl.SoftPAG(heads=["L0H0", "L1H1", "L2H0"], u=0.8, scale=1.0, target=target, scope=scope)
    cond, _ = run(tr, [], ["cond"], inputs)
    ptb, _ = run(tr, [pag], ["perturbed"], inputs)
    assert torch.isfinite(ptb).all() and (ptb - cond).abs().max() > 1e-4
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].clone()
    inputs["encoder_hidden_states"][0, 5:7] = 10 * torch.randn(2, inputs["encoder_hidden_states"].shape[-1])
    changed, _ = run(tr, [pag], ["perturbed"], inputs)
    assert (changed - ptb).abs().max() <= 1e-5

