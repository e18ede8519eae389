"""AttentionRegulation: inner loss, plain-attention identity, materialised reference, restored columns, pipelines,
bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import transformer_inputs

import attnctl
from attnctl.controls.regulation import (
    AttentionRegulation,
    gaussian_basis,
    loss_and_grad,
    map_loss,
    mid_depth_sites,
    row_terms,
    special_positions,
    word_maps,
)
from attnctl.errors import ConfigError, LayoutError, SiteError, WordCutOffError
from attnctl.layout import TextSegment, TokenLayout
from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
from attnctl.processors.attend import attend, fused_attention
from attnctl.processors.base import SiteCall
from attnctl.sites import Site

KW = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=24, output_type="np")
PROMPT = "a red circle and a blue square"

# An SD3-style layout of a 4×6 (non-square) image and 10 text tokens: CLIP [<bos> circle square <eos> pad] and
# T5 [circle square </s> pad pad]. Special columns: CLIP 0 and 3, T5 7.
GRID, N_TEXT = (4, 6), 10
LAYOUT = TokenLayout("sd3", N_TEXT, GRID, (TextSegment("clip", 0, 5, {"circle": (1,), "square": (2,)}),
                                          TextSegment("t5", 5, 5, {"circle": (0,), "square": (1,)})),
                     "circle square")
B, H, D = 3, 4, 8
S = GRID[0] * GRID[1] + N_TEXT
ROLES = ["uncond", "cond", "cond"]
COND = [1, 2]
IMG = slice(0, GRID[0] * GRID[1])


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g) * 1.5 for _ in range(3)]


def run_direct(sd3_pipe, reg, seed=0, step=0, num_steps=4, attn_mask=None):
    """One attention call of the control on random q, k, v (with ``attn_mask``, if given); returns (output, q, k, v,
    contributions, captured bias)."""
    ctl = attnctl.Controller(sd3_pipe.transformer, [reg], roles=ROLES, layout=LAYOUT)
    ctl.begin_run(num_steps)
    ctl.set_step(step)
    q, k, v = qkv(seed)
    call = SiteCall(ctl.sites[0], B, S, N_TEXT, True, q.device, q.dtype, attn_mask=attn_mask)  # as processors do
    contribs = ctl.contributions(call, q, k, v)
    captured = []
    for c in contribs:
        f = c.bias
        c.bias = lambda logits, lse, f=f: captured.append(f(logits, lse)) or captured[-1]
    return attend(q, k, v, contribs, attn_mask=attn_mask), q, k, v, contribs, captured


def padding_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """A key padding mask on two untargeted text tokens (positions 4 and 9; row 1 only for 9), as a boolean
    ``(B, keys)`` mask for attend and as an additive ``(B, 1, 1, keys)`` tensor for the references."""
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[:, 24 + 4] = False
    keep[1, 24 + 9] = False
    return keep, torch.zeros(B, 1, 1, S).masked_fill(~keep[:, None, None, :], float("-inf"))


def materialised(q, k, v, cols, bias):
    """Full softmax over all keys with ``bias`` on (cond rows, image rows, all heads, cols): (out, probs)."""
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D)
    full = torch.zeros_like(s)
    sub = full[COND, IMG]
    sub[..., cols] = bias.expand(len(COND), IMG.stop, H, len(cols))
    full[COND, IMG] = sub
    p = torch.softmax(s + full, dim=-1)
    return torch.einsum("bqhk,bkhd->bqhd", p, v), p


def test_inner_loss_decreases(sd3_pipe):
    # the paper's step size (lr=100) overshoots on some maps; the best iterate is kept
    reg = AttentionRegulation(targets=["circle", "square"], sites="all")
    run_direct(sd3_pipe, reg)
    (rec,) = reg.records
    assert len(rec.losses) == 21 and len(rec.best) == len(COND)  # L(W_0) ... L(W_20), per cond row
    assert rec.best_loss <= min(rec.losses) + 1e-6 and rec.best_loss < 0.5 * rec.losses[0]
    # a smaller step: the loss falls (almost) monotonically
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", lr=10.0)
    run_direct(sd3_pipe, reg)
    losses = reg.records[0].losses
    falls = sum(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.5 * losses[0] and falls >= 16
    print("inner loss (lr=100):", [round(x, 3) for x in rec.losses])
    print("inner loss (lr=10): ", [round(x, 3) for x in losses])


@pytest.mark.parametrize("q_level", [0.9, 1.0])  # 24 rows: the quantile between two pixels, or one pixel
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("normalize", ["text", "joint"])
def test_closed_form_gradient_matches_autograd(normalize, per_head, q_level):
    g = torch.Generator().manual_seed(3)
    nb, n, h, words = 2, 24, 3, 2
    rel = torch.log_softmax(torch.randn(nb, n, h, 8, generator=g) * 2, -1)  # columns of one softmax row
    cfg = AttentionRegulation(targets=["circle", "square"], normalize=normalize, per_head=per_head,
                              q_level=q_level).config
    terms = row_terms(rel[..., :3], [0, 1, 1], words, rel[..., 3:5], torch.logsumexp(rel[..., 5:], -1), normalize)
    basis = gaussian_basis(4, 6)
    w = torch.rand(nb, h if per_head else 1, words, basis.shape[0], generator=g, dtype=torch.float32)
    loss, ml, gw = loss_and_grad(terms, w, basis, cfg)
    wr = w.clone().requires_grad_(True)
    m = word_maps(terms, torch.einsum("bhtk,kn->bnht", wr, basis))
    ref_ml = map_loss(m if per_head else m.mean(2, keepdim=True), cfg, words)
    ref = ref_ml + cfg.w_reg * (wr**2).mean(dim=(1, 2, 3))
    ref.sum().backward()
    assert torch.allclose(loss, ref.detach(), atol=1e-6) and torch.allclose(ml, ref_ml.detach(), atol=1e-6)
    assert torch.allclose(gw, wr.grad, atol=1e-6, rtol=1e-4)
    # biases of hundreds (W far from its start) neither overflow nor lose the maps
    big = w * 300 - 100
    loss, ml, gw = loss_and_grad(terms, big, basis, cfg)
    m = word_maps(terms, torch.einsum("bhtk,kn->bnht", big, basis))
    assert torch.isfinite(loss).all() and torch.isfinite(gw).all()
    assert torch.allclose(ml, map_loss(m if per_head else m.mean(2, keepdim=True), cfg, words), atol=1e-6)


def test_keep_best_off_applies_the_last_iterate(sd3_pipe):
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", keep_best=False, iterations=7)
    run_direct(sd3_pipe, reg)
    (rec,) = reg.records
    assert rec.best == [7, 7] and rec.best_loss == pytest.approx(rec.losses[-1], rel=1e-6)


def test_zero_iterations_is_plain_attention(sd3_pipe):
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", iterations=0)
    out, q, k, v, contribs, _ = run_direct(sd3_pipe, reg)
    assert contribs  # the control is active: its path runs, with a zero bias
    assert (out - fused_attention(q, k, v)).abs().max() <= 1e-6


@pytest.mark.parametrize("normalize", ["text", "joint"])
@pytest.mark.parametrize("restore", [True, False])
def test_memory_light_form_equals_materialised_reference(sd3_pipe, normalize, restore):
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", normalize=normalize,
                              restore_special=restore, smoothing=0.0, decay=1.0)
    out, q, k, v, (kb,), (bias,) = run_direct(sd3_pipe, reg, seed=1)
    cols = kb.cols.tolist()
    assert cols == ([24 + p for p in (1, 5, 2, 6)] + ([24 + p for p in (0, 3, 7)] if restore else []))
    ref_out, p = materialised(q, k, v, cols, bias)
    assert (out - ref_out).abs().max() <= 1e-5
    # the loss the optimiser saw at the applied iterate equals the loss of the materialised maps
    pc = p[COND, IMG]  # (cond rows, image rows, heads, keys)
    words = torch.stack([pc[..., [24 + 1, 24 + 5]].sum(-1), pc[..., [24 + 2, 24 + 6]].sum(-1)], -1)
    if normalize == "text":
        words = words / pc[..., 24:].sum(-1, keepdim=True)
    maps = words.mean(dim=2, keepdim=True)  # average over heads
    (rec,) = reg.records
    assert float(map_loss(maps, reg.config, 2).mean()) == pytest.approx(rec.map_loss, rel=1e-4, abs=1e-6)


def test_restored_columns_keep_their_unedited_probability(sd3_pipe):
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", smoothing=0.0, decay=1.0)
    out, q, k, v, (kb,), (bias,) = run_direct(sd3_pipe, reg, seed=2)
    cols = kb.cols.tolist()
    _, p = materialised(q, k, v, cols, bias)
    _, plain = materialised(q, k, v, cols, torch.zeros(()))
    special = [24 + 0, 24 + 3, 24 + 7]
    target = [24 + 1, 24 + 5, 24 + 2, 24 + 6]
    # 1. start/end-of-text columns: exactly their plain probability on the regulated rows
    assert (p[COND, IMG][..., special] - plain[COND, IMG][..., special]).abs().max() <= 1e-6
    # 2. every other key keeps its biased relative weight and they share the remaining 1 − P_special
    others = [c for c in range(S) if c not in special]
    w = plain[COND, IMG][..., others].clone()
    b = torch.zeros(len(COND), IMG.stop, H, S)
    b[..., target] = bias[..., :4]
    w = w * torch.exp(b[..., others])
    w = w / w.sum(-1, keepdim=True) * (1 - plain[COND, IMG][..., special].sum(-1, keepdim=True))
    assert (p[COND, IMG][..., others] - w).abs().max() <= 1e-6
    assert bias[..., :4].abs().max() > 0.1  # the targets really were moved
    # 3. rows outside the regulation (uncond row, text queries) are the plain attention
    assert (p[0] - plain[0]).abs().max() <= 1e-7 and (p[:, IMG.stop:] - plain[:, IMG.stop:]).abs().max() <= 1e-7


def test_the_text_normalised_loss_leaves_masked_keys_out(sd3_pipe):
    """normalize="text" divides a word's probability by the row's text attention: a key the attention mask removes
    (FLUX's padding) is no part of it. The loss the optimiser reports equals the loss of the maps materialised under
    the bias it applied (it counted the padded keys in the denominator)."""
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", smoothing=0.0, decay=1.0)
    keep, add = padding_mask()
    out, q, k, v, (kb,), (bias,) = run_direct(sd3_pipe, reg, seed=4, attn_mask=keep)
    cols = kb.cols.tolist()
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D) + add.permute(0, 2, 1, 3)
    full = torch.zeros_like(s)
    block = full[COND, IMG]
    block[..., cols] = bias.expand(len(COND), IMG.stop, H, len(cols))
    full[COND, IMG] = block
    p = torch.softmax(s + full, -1)[COND, IMG]
    text = p[..., IMG.stop:]  # the text keys (SD3: after the image)
    words = torch.stack([text[..., [1, 5]].sum(-1), text[..., [2, 6]].sum(-1)], -1) / text.sum(-1, keepdim=True)
    expected = float(map_loss(words.mean(dim=2, keepdim=True), reg.config, 2).mean())
    assert reg.records[0].map_loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("restore", [True, False])
def test_text_scope_keeps_every_rows_text_attention(sd3_pipe, restore, masked):
    """bias_scope='text': the bias splits each regulated row's text attention anew (a materialised text-only
    softmax); the image keys keep their plain probability, the start/end tokens their plain share, and the loss the
    optimiser saw is the loss of the materialised maps. Under a key padding mask the same holds with the mask in
    every logit (padded keys get nothing)."""
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", bias_scope="text", restore_special=restore,
                              smoothing=0.0, decay=1.0)
    mask, add = padding_mask() if masked else (None, torch.zeros(1, 1, 1, S))
    out, q, k, v, (kb,), (bias,) = run_direct(sd3_pipe, reg, seed=4, attn_mask=mask)
    assert kb.within == slice(24, S)
    cols = kb.cols.tolist()
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D) + add.permute(0, 2, 1, 3)
    plain = torch.softmax(s, dim=-1)
    b = torch.zeros(len(COND), IMG.stop, H, N_TEXT)
    b[..., [c - 24 for c in cols]] = bias.expand(len(COND), IMG.stop, H, len(cols))
    p = plain.clone()
    text_mass = plain[COND, IMG][..., 24:].sum(-1, keepdim=True)
    sub = p[COND, IMG]
    sub[..., 24:] = torch.softmax(s[COND, IMG][..., 24:] + b, dim=-1) * text_mass
    p[COND, IMG] = sub
    assert (out - torch.einsum("bqhk,bkhd->bqhd", p, v)).abs().max() <= 1e-5
    assert bias[..., :4].abs().max() > 0.1  # the targets really were moved
    if masked:
        assert p[..., 24 + 4].max() == 0 and p[1, ..., 24 + 9].max() == 0
    if restore:
        # The restoring bias is log(rest + Σx) − log(1 − P_special) with rest = 1 − P_targets − P_special: on this
        # 10-token text some rows give the other text tokens < 1% of their text attention, and that difference of
        # fp32 shares carries a relative error of about eps32 / rest into the bias (exact in float64: ≤ 5e-6 here).
        # So the check is relative, as the error is; a wrong restoring formula is off by orders of magnitude more.
        special = [24 + 0, 24 + 3, 24 + 7]
        got, want = p[COND, IMG][..., special], plain[COND, IMG][..., special]
        assert ((got - want).abs() / want).max() <= 2e-5
    pc = p[COND, IMG]
    words = torch.stack([pc[..., [24 + 1, 24 + 5]].sum(-1), pc[..., [24 + 2, 24 + 6]].sum(-1)], -1) / text_mass
    (rec,) = reg.records
    maps = words.mean(dim=2, keepdim=True)
    assert float(map_loss(maps, reg.config, 2).mean()) == pytest.approx(rec.map_loss, rel=1e-4, abs=1e-6)
    zero = AttentionRegulation(targets=["circle", "square"], sites="all", bias_scope="text", iterations=0)
    out0, q, k, v, _, _ = run_direct(sd3_pipe, zero)
    assert (out0 - fused_attention(q, k, v)).abs().max() <= 1e-6
    with pytest.raises(ConfigError, match="normalize='text'"):
        AttentionRegulation(targets=["circle"], bias_scope="text", normalize="joint")


def test_special_positions_and_basis():
    assert special_positions(LAYOUT) == [0, 3, 7]
    g = gaussian_basis(4, 6, grid=2, sigma=0.25)
    assert g.shape == (4, 24) and float(g.max()) <= 1.0
    # no denormal tails (they make CPU matmuls several times slower): zero or a normal float
    wide = gaussian_basis(64, 64)
    assert not ((wide > 0) & (wide < torch.finfo(torch.float32).tiny)).any() and (wide == 0).any()
    # bump 1 (top row, right column) is largest in the top-right quadrant of the 4×6 grid
    assert int(g[1].reshape(4, 6).argmax()) // 6 in (0, 1) and int(g[1].reshape(4, 6).argmax()) % 6 >= 3


def test_mid_depth_sites_defaults():
    sd35_large = [Site(f"transformer_blocks.{i}.attn", i, "sd3_joint", 38, 64) for i in range(38)]
    picked = [s.index for s in mid_depth_sites(sd35_large)]
    assert picked == list(range(13, 25))
    tiny = [Site("transformer_blocks.0.attn", 0, "sd3_joint", 4, 8), Site("transformer_blocks.0.attn2", 1,
            "sd3_image", 4, 8), Site("transformer_blocks.1.attn", 2, "sd3_joint", 4, 8)]
    assert [s.name for s in mid_depth_sites(tiny)] == ["transformer_blocks.0.attn"]


def test_inside_attnctl_pipeline_with_softpag_and_a_probe(sd35_pipe):
    pipe = AttnCtlSD3Pipeline(**sd35_pipe.components)
    before = dict(pipe.transformer.attn_processors)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pag = lambda: attnctl.SoftPAG(heads=["L0H0"])  # noqa: E731  (adds "perturbed" rows to the batch)
    base = pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[pag()], **KW).images
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps="window(1, 0, 0.5)")
    probe = attnctl.AttentionProbe(words=["circle"])
    img = pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[reg, probe, pag()], **KW).images
    assert {r.step for r in reg.records} == {0}  # first half of 2 steps
    assert {r.site for r in reg.records} == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}  # no attn2
    assert all(len(r.best) == 2 for r in reg.records)  # the cond row and its perturbed copy, not uncond
    assert abs(img - base).max() > 1e-4
    assert probe.word_maps()["circle"].shape == (1, 8, 12)  # non-square 32×48 image
    assert dict(pipe.transformer.attn_processors) == before
    again = pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[reg, pag()], **KW).images
    assert abs(again - img).max() < 1e-6  # deterministic (seeded W)


def test_attach_on_stock_flux_reaches_single_blocks(flux_pipe):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = flux_pipe(PROMPT, generator=gen(), **KW).images
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps=1.0)
    with attnctl.attach(flux_pipe, [reg]):
        img = flux_pipe(PROMPT, generator=gen(), **KW).images
    assert {r.site for r in reg.records} == {s.name for s in attnctl.list_sites(flux_pipe.transformer)}
    assert {r.step for r in reg.records} == {0, 1}
    assert abs(img - base).max() > 1e-4
    # with SoftPAG in the same attach: one run, the regulation on the conditional row and its perturbed copy, the
    # attnctl pipeline's image
    reg, pag = AttentionRegulation(targets=["circle", "square"]), attnctl.SoftPAG(heads=["L0H0"], scale=2.0)
    with attnctl.attach(flux_pipe, [reg, pag]):
        both = flux_pipe(PROMPT, generator=gen(), **KW).images
    assert reg.records and all(len(r.best) == 2 for r in reg.records)
    ours = AttnCtlFluxPipeline(**flux_pipe.components)
    ours.set_progress_bar_config(disable=True)
    same = ours(PROMPT, generator=gen(), controls=[AttentionRegulation(targets=["circle", "square"]),
                                                   attnctl.SoftPAG(heads=["L0H0"], scale=2.0)], **KW).images
    assert abs(both - same).max() < 1e-5 and abs(both - base).max() > 1e-4


def test_decay_and_smoothing_count_denoising_steps_under_the_midpoint_scheduler(sd3_pipe, monkeypatch):
    """The midpoint scheduler makes two calls per step: both are step t for the decay, the smoothing and W's start
    (they were steps 2t and 2t + 1, so the decay ran twice as fast)."""
    from attnctl.midpoint import use_solver

    reg = AttentionRegulation(targets=["circle"], sites=["transformer_blocks.0"], steps=1.0)
    steps = []
    smooth = reg._smooth
    monkeypatch.setattr(reg, "_smooth", lambda memory, step, w, **kw: steps.append(step) or smooth(memory, step, w,
                                                                                                **kw))
    with use_solver(sd3_pipe, "midpoint"), attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe("a red circle", **KW)
    assert steps == [0, 0, 1, 1]  # 2 steps, two calls each


def test_bad_input(sd3_pipe, sd35_pipe):
    with pytest.raises(ConfigError, match="targets is an empty list"):
        AttentionRegulation(targets=[])
    with pytest.raises(ConfigError, match="iterations=-1 is negative"):
        AttentionRegulation(targets=["circle"], iterations=-1)
    with pytest.raises(ConfigError, match="more than once"):
        AttentionRegulation(targets=["circle", "Circle"])
    with pytest.raises(SiteError, match="no image-text attention"):
        attnctl.Controller(sd35_pipe, [
            AttentionRegulation(targets=["circle"], sites="re:.*attn2")])
    reg = AttentionRegulation(targets=["circle", "triangle"], sites="all")
    absent = r"target word 'triangle' is not in the prompt .*Fix: .*missing='ignore'"
    with pytest.raises(LayoutError, match=absent), attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(PROMPT, **KW)
    assert not any(type(p).__name__.startswith("AttnCtl") for p in sd3_pipe.transformer.attn_processors.values())
    # a run given only prompt embeddings has no words to find: said so, with the way out
    embeds = sd3_pipe.encode_prompt(PROMPT, None, None, max_sequence_length=KW["max_sequence_length"])
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    with pytest.raises(LayoutError, match="only prompt_embeds.*pass the prompt text instead"), \
            attnctl.attach(sd3_pipe, [AttentionRegulation(targets=["circle"], sites="all")]):
        sd3_pipe(**dict(zip(names, embeds, strict=True)), **KW)
    # missing='ignore' regulates the words that are present
    reg = AttentionRegulation(targets=["circle", "triangle"], sites="all", missing="ignore")
    run_direct(sd3_pipe, reg)
    assert reg.resolved_targets()[0].words == ["circle"]


def test_a_target_cut_off_by_the_token_limit_is_named_as_such(flux_pipe):
    long = "a red circle and a blue square " * 3 + "and a green triangle"  # the triangle is past 24 T5 tokens
    reg = AttentionRegulation(targets=["circle", "triangle"], sites="all")
    with pytest.raises(WordCutOffError, match=r"'triangle' is in the prompt but past .*cut off.*Fix: shorten"), \
            attnctl.attach(flux_pipe, [reg]):
        flux_pipe(long, **KW)
    with pytest.raises(WordCutOffError, match="cut off"), attnctl.attach(flux_pipe, [attnctl.AttentionProbe(
            words=["triangle"])]):
        flux_pipe(long, **KW)


def test_json_round_trip():
    reg = AttentionRegulation(targets=["circle", "square"], sites=["transformer_blocks.0"], steps="window(1, 0, 0.3)",
                              iterations=5, per_head=True, normalize="joint")
    data = reg.to_json()
    assert data["kind"] == "regulation"
    again = attnctl.control_from_json(data)
    assert isinstance(again, AttentionRegulation) and again.to_json() == data
    assert AttentionRegulation(targets=["circle"]).to_json()["steps"]["kind"] == "window"


def test_a_phrase_is_one_target_over_its_words_tokens(sd3_pipe):
    reg = AttentionRegulation(targets=["circle square"], sites="all")
    run_direct(sd3_pipe, reg)
    tg = reg.resolved_targets()[0]
    assert tg.words == ["circle square"] and tg.positions == [1, 2, 5, 6] and tg.word_of == [0, 0, 0, 0]
    with pytest.raises(LayoutError, match="'circle square' and 'square' share tokens"):  # one bias per token
        run_direct(sd3_pipe, AttentionRegulation(targets=["circle square", "square"], sites="all"))
    with pytest.raises(LayoutError, match="'circle triangle' is not in"):
        run_direct(sd3_pipe, AttentionRegulation(targets=["circle triangle"], sites="all"))


@pytest.mark.parametrize("init", ["random", "previous"])
def test_warm_start_begins_where_the_previous_step_ended(sd3_pipe, init):
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", init=init)
    ctl = attnctl.Controller(sd3_pipe.transformer, [reg], roles=ROLES, layout=LAYOUT)
    ctl.begin_run(4)
    q, k, v = qkv(0)
    site = ctl.sites[0]
    for step in (0, 1):  # the same q, k at both steps: the maps are the same, only W's start differs
        ctl.set_step(step)
        attend(q, k, v, ctl.contributions(SiteCall(site, B, S, N_TEXT, True, q.device, q.dtype), q, k, v))
    first, second = reg.records
    if init == "previous":  # L(W_0) at step 1 is the loss of the iterate step 0 applied
        assert second.losses[0] == pytest.approx(first.best_loss, rel=1e-5)
        assert second.best_loss <= first.best_loss + 1e-6
    else:  # a fresh U[0, 1) start
        assert second.losses[0] > 1.5 * first.best_loss
    ctl.begin_run(4)  # a new run starts from U[0, 1) again
    ctl.set_step(0)
    attend(q, k, v, ctl.contributions(SiteCall(site, B, S, N_TEXT, True, q.device, q.dtype), q, k, v))
    assert reg.records[0].losses[0] == pytest.approx(first.losses[0], rel=1e-6)


@pytest.mark.parametrize("model", ["toy-sd3", "toy-flux"])
def test_on_the_toy_models_the_applied_bias_meets_the_objective_the_plain_maps_miss(model):
    """What the control sets out to do, on the trained models: at every regulated call the loss's map terms
    under the bias actually applied (after smoothing and decay) are far below those of the plain maps."""
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline

    pipe = load_pipeline(model)
    reg = AttentionRegulation(targets=["red circle", "blue square"])
    call = {**default_call_kwargs(pipe), "num_inference_steps": 6, "output_type": "np"}
    pipe(["a red circle and a blue square"] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
         controls=[reg], **call)
    assert len(reg.records) == 2 * 3  # the two mid-depth sites at the first half of 6 steps
    for rec in reg.records:
        assert rec.applied_map_loss < 0.5 * rec.plain_map_loss, rec
    print(model, [(round(r.plain_map_loss, 3), round(r.applied_map_loss, 3)) for r in reg.records])


def test_several_prompts_in_one_call_each_regulate_their_own_words(sd3_pipe):
    """A list of different prompts: every prompt's rows get the bias of its own words' columns, as if it were
    generated alone (words sit at other token positions in the two prompts)."""
    prompts = [PROMPT, "a blue square beside a red circle"]
    kw = dict(KW, guidance_scale=4.0)
    cfg = dict(targets=["circle", "square"], sites="all", lr=10.0, iterations=5)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    reg = AttentionRegulation(**cfg)
    with attnctl.attach(sd3_pipe, [reg]):
        both = sd3_pipe(prompts, generator=[gen(0), gen(1)], **kw).images
    assert {r.prompt for r in reg.records} == set(prompts)
    assert len({tuple(t.positions) for t in reg.resolved_targets()}) == 2
    plain = sd3_pipe(prompts, generator=[gen(0), gen(1)], **kw).images
    assert abs(both - plain).max() > 1e-3  # the regulation acted
    for i, prompt in enumerate(prompts):
        with attnctl.attach(sd3_pipe, [AttentionRegulation(**cfg)]):
            alone = sd3_pipe(prompt, generator=gen(i), **kw).images
        assert abs(alone[0] - both[i]).max() < 1e-4
    # several images per prompt: rows [p0, p0, p1, p1] of the conditional half, two per record; each image is the
    # one its generator makes alone (W starts from the same draw in every row, not one draw per place in the batch)
    reg = AttentionRegulation(**cfg)
    with attnctl.attach(sd3_pipe, [reg]):
        four = sd3_pipe(prompts, num_images_per_prompt=2, generator=[gen(s) for s in range(4)], **kw).images
    assert all(len(r.best) == 2 for r in reg.records) and {r.prompt for r in reg.records} == set(prompts)
    for i in range(4):
        with attnctl.attach(sd3_pipe, [AttentionRegulation(**cfg)]):
            alone = sd3_pipe(prompts[i // 2], generator=gen(i), **kw).images
        assert abs(alone[0] - four[i]).max() < 1e-4
    # a word probe maps each prompt's own tokens of the word, in the rows of that prompt
    probe = attnctl.AttentionProbe(words=["circle", "square"])
    with attnctl.attach(sd3_pipe, [probe]):
        sd3_pipe(prompts, generator=[gen(0), gen(1)], **kw)
    maps = probe.word_maps()
    assert maps["circle"].shape[0] == 2
    for i, prompt in enumerate(prompts):
        alone = attnctl.AttentionProbe(words=["circle", "square"])
        with attnctl.attach(sd3_pipe, [alone]):
            sd3_pipe(prompt, generator=gen(i), **kw)
        for word, m in alone.word_maps().items():
            assert (m[0] - maps[word][i]).abs().max() < 1e-5
    # a word with more tokens in one prompt than in another: its columns cannot line up
    with pytest.raises(LayoutError, match="take other tokens"), attnctl.attach(sd3_pipe, [attnctl.AttentionProbe(
            words=["circle"])]):
        sd3_pipe([PROMPT, "a red circle and a blue circle"], **kw)


def test_several_prompts_on_flux(flux_pipe):
    prompts = [PROMPT, "a blue square beside a red circle"]
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", iterations=3)
    with attnctl.attach(flux_pipe, [reg]):
        flux_pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **KW)
    assert {r.prompt for r in reg.records} == set(prompts) and all(len(r.best) == 1 for r in reg.records)


@pytest.mark.parametrize("fixture", ["sd35_pipe", "flux_pipe"])
def test_device_and_dtype_agnostic(request, fixture):
    """Regulation on the meta device (shape-only: any tensor made on a fixed device fails) and in bf16."""
    pipe = request.getfixturevalue(fixture)
    for (device, dtype), scope in itertools.product((("meta", torch.float32), ("cpu", torch.bfloat16)),
                                                    ("joint", "text")):
        tr = copy.deepcopy(pipe.transformer).to(device=device, dtype=dtype)
        kw = transformer_inputs(tr, batch=2, grid=(4, 4), dtype=dtype)
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        n_text = kw["encoder_hidden_states"].shape[1]
        family = "flux" if fixture == "flux_pipe" else "sd3"
        layout = TokenLayout(family, n_text, (4, 4), (TextSegment("t5", 0, n_text, {"circle": (1,), "square": (2,)}),),
                             "circle square")
        reg = AttentionRegulation(targets=["circle", "square"], sites="all", iterations=3, bias_scope=scope)
        with attnctl.attach(tr, [reg], layout=layout):
            out = tr(**kw)[0]
        assert out.device.type == device and out.dtype == dtype and reg.records
        if device == "cpu":
            assert torch.isfinite(out.float()).all()
            assert all(r.applied_map_loss < r.plain_map_loss for r in reg.records)
        else:
            assert all(math.isnan(r.best_loss) for r in reg.records)  # no values on the meta device


def test_several_prompts_with_softpag_regulate_each_perturbed_copy_with_its_prompt(sd3_pipe):
    """Two prompts and SoftPAG in one call: every perturbed copy is regulated on its conditional row's prompt, and
    each image is the one made alone with the same controls."""
    prompts = [PROMPT, "a blue square beside a red circle"]
    kw = dict(KW, guidance_scale=4.0)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731

    def controls() -> list:
        return [AttentionRegulation(targets=["circle", "square"], sites="all", iterations=3),
                attnctl.SoftPAG(heads=["L0H0"])]

    both = controls()
    with attnctl.attach(sd3_pipe, both):
        images = sd3_pipe(prompts, generator=[gen(0), gen(1)], **kw).images
    reg = both[0]
    assert {r.prompt for r in reg.records} == set(prompts) and all(len(r.best) == 2 for r in reg.records)
    calls = len(reg.sites)  # every site at step 0; one record per call and prompt, and the summary counts the calls
    assert len(reg.records) == 2 * calls
    assert f": {calls} attention calls at 1 step ({2 * calls} regulated (call, prompt) pairs);" in reg.summary()
    for i, prompt in enumerate(prompts):
        with attnctl.attach(sd3_pipe, controls()):
            alone = sd3_pipe(prompt, generator=gen(i), **kw).images
        assert abs(alone[0] - images[i]).max() < 1e-4


def test_one_prompt_with_two_t5_texts_keeps_a_memory_for_each(sd3_pipe):
    """The same ``prompt`` with two ``prompt_3`` texts (what SD3's T5 reads) is two prompts: each keeps its own
    smoothing and warm start, and each image is the one made alone."""
    texts = [PROMPT, "a blue square beside a red circle"]
    kw = dict(KW, guidance_scale=4.0)
    cfg = dict(targets=["circle", "square"], sites="all", steps=1.0, iterations=3, init="previous")
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    with attnctl.attach(sd3_pipe, [AttentionRegulation(**cfg)]):
        both = sd3_pipe([PROMPT, PROMPT], prompt_3=texts, generator=[gen(0), gen(1)], **kw).images
    for i, text in enumerate(texts):
        with attnctl.attach(sd3_pipe, [AttentionRegulation(**cfg)]):
            alone = sd3_pipe(PROMPT, prompt_3=text, generator=gen(i), **kw).images
        assert abs(alone[0] - both[i]).max() < 1e-4


def _call_biases(ctl, step: int, roles: list[str], rows: list[int], q, k, v, skip_layer: bool = False):
    """The bias the control gives the regulated rows of one direct call on the batch rows ``rows`` of q, k, v."""
    ctl.set_step(step)
    ctl.state.roles, ctl.state.skip_layer_pass = roles, skip_layer
    q, k, v = (t[rows] for t in (q, k, v))
    contribs = ctl.contributions(SiteCall(ctl.sites[0], len(rows), S, N_TEXT, True, q.device, q.dtype), q, k, v)
    captured = []
    for c in contribs:
        c.bias = lambda logits, lse, f=c.bias: captured.append(f(logits, lse)) or captured[-1]
    attend(q, k, v, contribs)
    ctl.state.skip_layer_pass = False
    return captured[0]


@pytest.mark.parametrize("init", ["random", "previous"])
def test_rows_keep_their_earlier_w_when_the_regulated_rows_change(sd3_pipe, init):
    """The regulated rows change within a run when SoftPAG's scale starts after step 0 (perturbed copies join) and at
    SD3's skip-layer pass (the conditional rows alone): every row is still smoothed and warm-started from its own
    earlier W — a perturbed copy new to the run from its conditional row's — so each gets the bias it gets when the
    rows do not change."""
    q, k, v = qkv(5)
    cond, ptb = ROLES, [*ROLES, "perturbed", "perturbed"]

    def control():
        reg = AttentionRegulation(targets=["circle", "square"], sites=["transformer_blocks.0"], steps=1.0,
                                  iterations=3, init=init)
        ctl = attnctl.Controller(sd3_pipe.transformer, [reg], roles=ROLES, layout=LAYOUT)
        ctl.begin_run(4)
        return ctl

    steady = control()
    _call_biases(steady, 0, cond, [0, 1, 2], q, k, v)
    want = _call_biases(steady, 1, cond, [0, 1, 2], q, k, v)
    joined = control()
    _call_biases(joined, 0, cond, [0, 1, 2], q, k, v)
    got = _call_biases(joined, 1, ptb, [0, 1, 2, 1, 2], q, k, v)  # the copies repeat the conditional rows
    assert (got[:2] - want).abs().max() < 1e-5 and (got[2:] - want).abs().max() < 1e-5
    skipped = _call_biases(joined, 1, ["cond", "cond"], [1, 2], q, k, v, skip_layer=True)
    assert (skipped - want).abs().max() < 1e-5  # regulated as the step's call was, from the same earlier W
    assert len(joined.controls[0].records) == 2  # (and not recorded)


def test_a_schedule_assigned_to_the_config_takes_effect(sd3_pipe):
    kw = dict(KW, num_inference_steps=3, guidance_scale=4.0)
    reg = AttentionRegulation(targets=["circle", "square"], sites=["transformer_blocks.0"], iterations=2)
    reg.config.steps = 0.0
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(PROMPT, **kw)
    assert reg.records == []
    reg.config.steps = 1.0
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(PROMPT, **kw)
    assert {r.step for r in reg.records} == {0, 1, 2}


def test_reading_the_records_mid_run_leaves_the_adaptive_report_alone(sd3_pipe):
    """An Adaptive ``steps`` on regulation's own loss reads the step's numbers at the step's end; a callback that reads
    ``records`` or ``summary()`` first (to show progress) must not take them away."""
    from attnctl.schedules import Adaptive

    kw = dict(KW, num_inference_steps=4, guidance_scale=4.0)
    regulated = []
    for read in (False, True):
        steps = Adaptive(base=1.0, rule="threshold", metric="loss", threshold=1e9, goal="lower")  # off once reported
        reg = AttentionRegulation(targets=["circle", "square"], sites="all", iterations=2, steps=steps)

        def callback(pipe, i, t, kwargs, reg=reg, read=read):
            if read:
                reg.summary()
            return {}

        with attnctl.attach(sd3_pipe, [reg]):
            sd3_pipe(PROMPT, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **kw)
        regulated.append(sorted({r.step for r in reg.records}))
    assert regulated == [[0], [0]]


def test_any_integer_seed_draws_w(sd3_pipe):
    """The seed enters the generator modulo 2**64, as the generator reads a negative seed: a huge seed works, and the
    seeds that worked before draw the same W (-1 and 2**64 - 1 are one seed)."""
    losses = {}
    for seed in (-1, 2**64 - 1, 2**62, 10**13 + 2**64, 10**13):
        reg = AttentionRegulation(targets=["circle", "square"], sites="all", seed=seed)
        run_direct(sd3_pipe, reg)
        losses[seed] = reg.records[0].losses
    assert losses[-1] == losses[2**64 - 1] and losses[10**13] == losses[10**13 + 2**64]
    assert losses[-1] != losses[2**62]


def test_a_diverging_w_stops_the_run_with_the_way_out(sd3_pipe, monkeypatch):
    """With a huge step size and keep_best=False the inner descent overflows W: the image came out NaN without a
    word. On the host the step's end now says so and names the setting; where reading the value would wait for the
    device (a GPU), the records say it when read."""
    import importlib

    reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps=1.0, iterations=3, lr=1e37,
                              keep_best=False)
    with pytest.raises(ConfigError, match=r"bias is not finite at step 0: W diverged .*lr=1e\+37.*lower lr"), \
            attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=4.0, **KW)
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps=1.0, iterations=3, lr=1e37)
    with attnctl.attach(sd3_pipe, [reg]):  # keep_best keeps the finite start
        out = sd3_pipe(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=4.0, **KW).images
    assert torch.isfinite(torch.as_tensor(out)).all()
    monkeypatch.setattr(importlib.import_module("attnctl.processors.attend"), "_on_host", lambda t: False)
    reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps=1.0, iterations=3, lr=1e37,
                              keep_best=False)
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=4.0, **KW)
    with pytest.warns(UserWarning, match=r"bias is not finite at .*step 0: W diverged .*lower lr"):
        reg.summary()
