"""LayoutGuidance and latent guidance: the maps and losses against plain references, the Euler pass-through
identity against the stock transformer, the gradient pass (conditional rows only, stops after the deepest site),
pipelines and attach, composition with SoftPAG, bad input."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch

import attnctl
from attnctl.controller import Controller
from attnctl.controls.layout_guidance import (
    LayoutGuidance,
    box_coverage,
    box_tokens,
    csg_loss,
    ratio_loss,
    self_boxes,
    self_maps,
    word_maps,
)
from attnctl.errors import ConfigError, LayoutError, SiteError
from attnctl.latent_guidance import rms_step
from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

KW = dict(num_inference_steps=3, height=32, width=48, max_sequence_length=24)
PROMPT = "a red circle and a blue square"
BOXES = {"circle": [0.0, 0.0, 0.5, 0.5], "square": [0.5, 0.5, 1.0, 1.0]}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the math


def test_box_coverage_is_the_cell_fraction_inside_each_box():
    cover = box_coverage([[0.0, 0.0, 0.5, 0.25], [0.3, 0.5, 0.4, 1.0]], (2, 4))  # 2 rows × 4 columns of cells
    # box 0: x in [0, 0.5] covers columns 0 and 1 fully; y in [0, 0.25] covers half of row 0
    expect0 = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # box 1: x in [0.3, 0.4] is 40% of column 1 (cell [0.25, 0.5]); y in [0.5, 1] is all of row 1
    expect1 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0])
    assert torch.allclose(cover[:, 0], expect0) and torch.allclose(cover[:, 1], expect1, atol=1e-6)
    # CSG's in-box tokens: cells at least half inside; a box that holds none takes the cell it covers most
    assert box_tokens(cover) == [([0, 1], [2, 3, 4, 5, 6, 7]), ([5], [0, 1, 2, 3, 4, 6, 7])]
    # boxes that tile the image leave no background, on any grid (float32 edges left 5e-7 of one in every cell of a
    # 12×12 grid, and the self-attention term got a third, empty box)
    for grid in ((12, 12), (6, 10), (16, 16)):
        tiled = box_coverage([[0, 0, 0.5, 1], [0.5, 0, 1, 1]], grid)
        assert self_boxes(tiled).shape[1] == 2 and set(tiled.sum(1).tolist()) == {1.0}, grid


def test_word_maps_equal_the_renormalised_image_text_slice_of_the_joint_softmax():
    torch.manual_seed(0)
    b, n_img, n_txt, h, d = 2, 6, 5, 3, 4
    q, k = torch.randn(b, n_img + n_txt, h, d), torch.randn(b, n_img + n_txt, h, d)
    columns = [[1, 3], [4], []]
    maps = word_maps(q[:, :n_img], k[:, n_img:], columns)
    # plainly: the joint attention probabilities, the image rows × text columns, divided by their row sum
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), dim=-1)
    txt = probs[:, :, :n_img, n_img:]
    txt = txt / txt.sum(-1, keepdim=True)
    ref = torch.stack([txt[..., [1, 3]].sum(-1), txt[..., [4]].sum(-1), torch.zeros(b, h, n_img)], -1).mean(1)
    assert torch.allclose(maps, ref, atol=1e-6)
    # in chunks of rows (recomputed in the backward): the same maps and the same gradients
    qg, kg = q[:, :n_img].clone().requires_grad_(), k[:, n_img:].clone().requires_grad_()
    whole = word_maps(qg, kg, columns)
    (gq, gk) = torch.autograd.grad((whole * torch.arange(3.0)).sum(), (qg, kg))
    chunked = word_maps(qg, kg, columns, max_elems=b * h * n_txt * 2)  # 2 rows per chunk: 3 chunks
    (cq, ck) = torch.autograd.grad((chunked * torch.arange(3.0)).sum(), (qg, kg))
    assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(cq, gq, atol=1e-6)
    assert torch.allclose(ck, gk, atol=1e-6)


def test_self_maps_are_the_box_weighted_rows_of_the_renormalised_image_block():
    torch.manual_seed(1)
    b, n_img, n_txt, h, d = 2, 6, 4, 3, 5
    q, k = torch.randn(b, n_img + n_txt, h, d), torch.randn(b, n_img + n_txt, h, d)
    cover = box_coverage([[0.0, 0.0, 0.5, 0.5]], (2, 3))  # cell 0 whole, cell 1 half
    own = self_boxes(cover)  # + the background: 1 − max cover
    assert torch.allclose(own[:, 1], torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0]))
    weights = own / own.sum(0)
    # plainly: the joint softmax, its image rows × image columns renormalised, rows averaged with the box weights
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), dim=-1)[:, :, :n_img, :n_img]
    probs = probs / probs.sum(-1, keepdim=True)
    ref = torch.stack([(probs * weights[:, c, None]).sum(2).mean(1) for c in range(2)], dim=-1)  # (b, keys, box)
    qg, kg = q[:, :n_img].clone().requires_grad_(), k[:, :n_img].clone().requires_grad_()
    whole = self_maps(qg, kg, weights)
    assert torch.allclose(whole, ref, atol=1e-6) and torch.allclose(whole.sum(1), torch.ones(b, 2))
    (gq, gk) = torch.autograd.grad((whole * torch.arange(2.0)).sum(), (qg, kg))
    chunked = self_maps(qg, kg, weights, max_elems=b * h * n_img * 4)  # 4 query rows per chunk: 2 chunks
    (cq, ck) = torch.autograd.grad((chunked * torch.arange(2.0)).sum(), (qg, kg))
    assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(cq, gq, atol=1e-6)
    assert torch.allclose(ck, gk, atol=1e-6)
    assert self_boxes(torch.ones(6, 1)).shape == (6, 1)  # a box over the whole image leaves no background


def test_ratio_loss_is_the_squared_out_of_box_share():
    maps = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 2.0]]])  # 1 image, 3 tokens, 2 words
    cover = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    # word 0: inside (1 + 1.5) / 4 = 0.625; word 1: inside 2 / 4 = 0.5
    expect = ((1 - 0.625) ** 2 + (1 - 0.5) ** 2) / 2
    assert torch.allclose(ratio_loss(maps, cover, [True, True]), torch.tensor([expect]))
    only0 = ratio_loss(maps, cover, [True, False])  # a word absent from the prompt does not count
    assert torch.allclose(only0, torch.tensor([(1 - 0.625) ** 2]))


def test_csg_loss_by_hand():
    # 1 image, 4 tokens, 2 words; box 0 = tokens 0 and 1, box 1 = token 3
    maps = torch.tensor([[[0.6, 0.1], [0.2, 0.3], [0.4, 0.1], [0.1, 0.8]]])
    cover = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    present = [True, True]
    tokens = box_tokens(cover)
    assert tokens == [([0, 1], [2, 3]), ([3], [0, 1, 2])]
    loss = csg_loss(maps, tokens, present, torch.Generator().manual_seed(0))
    # word 0: k = max(1, ⌊0.8·2⌋) = 1, r = 1: S_in = 0.6 (token 0), S_out = 0.4 (token 2's, the top outside value)
    intra0 = (1 - 0.6 / (0.6 + 0.4)) ** 2
    # inter: at token 0, word 0's mean is 0.6, the other word's 0.1: 0.1 < 0.6 − 0.1, so no term
    # word 1: k = 1, r = 1: S_in = 0.8, S_out = 0.3 (token 1); inter: 0.1 (word 0 at token 3) < 0.8 − 0.1: none
    intra1 = (1 - 0.8 / (0.8 + 0.3)) ** 2
    assert torch.allclose(loss, torch.tensor([intra0 + intra1]), atol=1e-6)
    # another word within the margin: word 0's map at token 3 raised to 0.75 > 0.8 − 0.1
    close = maps.clone()
    close[0, 3, 0] = 0.75
    inter1 = 50 * ((min(0.8 - 0.1, 0.75) - 0.75) ** 2)
    got = csg_loss(close, tokens, present, torch.Generator().manual_seed(0))
    s_out0 = 0.75  # word 0's top outside value is now token 3's
    assert torch.allclose(got, torch.tensor([(1 - 0.6 / (0.6 + s_out0)) ** 2 + intra1 + inter1]), atol=1e-6)
    # without the inter-token term (the self-attention constraint's use): the intra-token ratios only
    intra_only = csg_loss(close, tokens, present, torch.Generator().manual_seed(0), inter_weight=0.0)
    assert torch.allclose(intra_only, torch.tensor([(1 - 0.6 / (0.6 + s_out0)) ** 2 + intra1]), atol=1e-6)


def test_rms_step_is_a_unit_step_per_image():
    z = torch.zeros(2, 3)
    g = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = rms_step(z, g, 0.5)
    assert torch.allclose(out.pow(2).mean(1).sqrt(), torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[1], torch.full((3,), -0.5))


# ------------------------------------------------------------------------------------------------ pipelines


def _sd3_reference_step(transformer, z_moved, t, embeds, pooled, cfg_scale, sigma, sigma_next):
    """The loop's Euler step taken from the moved latent, with the stock transformer: z' + Δσ·v_cfg(z')."""
    with torch.no_grad():
        v = transformer(hidden_states=torch.cat([z_moved] * 2), timestep=t.expand(2 * z_moved.shape[0]),
                        encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
    v_u, v_c = v.chunk(2)
    return z_moved + (sigma_next - sigma) * (v_u + cfg_scale * (v_c - v_u))


def test_each_step_is_the_euler_step_from_the_guided_latent(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def spy(p, i, t, kw):
        step, z_moved, _ = p.attnctl._latent._moved
        assert step == i
        seen.append((i, t, z_moved.clone(), kw["latents"].clone(), kw["prompt_embeds"], kw["pooled_prompt_embeds"]))
        return {}

    ctl = LayoutGuidance(boxes=BOXES, scale=0.5, iterations=2)
    pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[ctl], output_type="latent",
         callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds",
                                                                       "pooled_prompt_embeds"], **KW)
    assert [s[0] for s in seen] == [0, 1, 2] and len(ctl.history) == 6  # 2 gradient steps at each of 3 steps
    sigmas = pipe.scheduler.sigmas
    for i, t, z_moved, after, embeds, pooled in seen:
        ref = _sd3_reference_step(pipe.transformer, z_moved, t, embeds, pooled, 4.0, float(sigmas[i]),
                                  float(sigmas[i + 1]))
        assert torch.allclose(after, ref, atol=1e-5), i
    assert dict(pipe.transformer.attn_processors) == dict(sd3_pipe.transformer.attn_processors)
    assert "forward" not in vars(pipe.transformer)  # the wrapper is gone


def _move_once(monkeypatch, noise):
    """Replace the gradient descent by a fixed move ``delta`` of the latent at the first guided call (none after):
    returns ``delta`` and the list of steps the descent was asked at."""
    from attnctl.latent_guidance import LatentGuidance

    delta = 0.3 * torch.randn(noise.shape, generator=gen(1))
    moves = []

    def descend(self, bound, cond, idx, z, size):
        moves.append(self.controller.state.step)
        return z + delta if len(moves) == 1 else z

    monkeypatch.setattr(LatentGuidance, "_descend", descend)
    return delta, moves


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("scheduler", ["euler", "midpoint"])
def test_a_move_at_the_first_guided_call_is_the_stock_run_from_the_moved_latent(family, scheduler, sd3_pipe,
                                                                                 flux_pipe, monkeypatch):
    """The first guided call moves every image's latent by a fixed δ: the run must then be the stock run from the
    moved noise, with CFG (SD3) or true CFG (FLUX), under the Euler step or the midpoint step (whose second call
    carries the move over its whole step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from attnctl.midpoint import FlowMatchMidpointScheduler

    stock = sd3_pipe if family == "sd3" else flux_pipe
    cls = FlowMatchMidpointScheduler if scheduler == "midpoint" else FlowMatchEulerDiscreteScheduler
    pipe = type(stock)(**{**stock.components, "scheduler": cls.from_config(stock.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    extra = {"guidance_scale": 4.0} if family == "sd3" else {"true_cfg_scale": 2.0, "negative_prompt": "a triangle"}
    noise = pipe.prepare_latents(1, pipe.transformer.config.in_channels // (4 if family == "flux" else 1), 32, 48,
                                 torch.float32, "cpu", gen())
    noise = noise[0] if isinstance(noise, tuple) else noise
    delta, moves = _move_once(monkeypatch, noise)
    with attnctl.attach(pipe, [LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.6)")]):
        guided = pipe(PROMPT, latents=noise.clone(), output_type="latent", **extra, **KW).images
    assert moves == ([0, 2] if scheduler == "midpoint" else [0, 1])  # the window's steps, a step's first call
    want = pipe(PROMPT, latents=noise + delta, output_type="latent", **extra, **KW).images
    torch.testing.assert_close(guided, want, atol=1e-5, rtol=1e-5)


def test_scale_zero_is_the_plain_run_and_the_step_moves_the_latent(sd3_pipe):
    plain = sd3_pipe(PROMPT, generator=gen(), output_type="np", **KW).images
    off = LayoutGuidance(boxes=BOXES, scale=0.0)
    with attnctl.attach(sd3_pipe, [off]) as ctl:
        same = sd3_pipe(PROMPT, generator=gen(), output_type="np", **KW).images
        assert ctl._latent.passes == 0
    assert np.array_equal(same, plain) and not off.history
    on = LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.6)")
    with attnctl.attach(sd3_pipe, [on]) as ctl:
        moved = sd3_pipe(PROMPT, generator=gen(), output_type="np", **KW).images
        assert ctl._latent.passes == 2  # steps 0 and 1 of 3
    assert abs(moved - plain).max() > 1e-3
    assert "forward" not in vars(sd3_pipe.transformer)
    ours = AttnCtlSD3Pipeline(**sd3_pipe.components)
    ours.set_progress_bar_config(disable=True)
    again = ours(PROMPT, generator=gen(), output_type="np",
                 controls=[LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.6)")], **KW).images
    assert abs(again - moved).max() < 1e-6  # attach on the stock pipeline = the attnctl pipeline


def test_self_weight_adds_the_self_attention_ratio_of_each_box_and_the_background(sd3_pipe, monkeypatch):
    seen = []
    original = LayoutGuidance.contribute

    def spy(self, call, q, k, v, state):
        if state.gradient_pass and self.config.self_weight:
            seen.append((q.detach().clone(), k.detach().clone(), call.image_slice(), state.layout.grid))
        return original(self, call, q, k, v, state)

    monkeypatch.setattr(LayoutGuidance, "contribute", spy)
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    losses = {}
    for w in (0.0, 0.7):
        ctl = LayoutGuidance(boxes=BOXES, sites="transformer_blocks.0", scale="window(0.5, 0, 0.3)", self_weight=w)
        pipe(PROMPT, generator=gen(), output_type="latent", controls=[ctl], **KW)
        losses[w] = ctl.history[0][1]  # step 0: both at the same latent
    (q, k, img, grid), = seen
    d = q.shape[-1]
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), dim=-1)[:, :, img, img]
    probs = probs / probs.sum(-1, keepdim=True)  # image queries over image keys
    cover = box_coverage(list(BOXES.values()), grid)
    cover = torch.cat([cover, 1 - cover.amax(1, keepdim=True)], dim=1)  # circle, square, background
    shares = []
    for c in range(3):
        looked = (probs * (cover[:, c] / cover[:, c].sum())[:, None]).sum(2).mean(1)  # (1, keys)
        shares.append((looked * cover[:, c]).sum(-1) / looked.sum(-1))
    self_loss = sum((1 - s) ** 2 for s in shares) / 3
    assert self_loss.item() > 1e-3
    assert math.isclose(losses[0.7] - losses[0.0], 0.7 * self_loss.item(), rel_tol=1e-4)


def test_gradient_pass_runs_the_conditional_rows_and_stops_after_the_deepest_site(flux_pipe, monkeypatch):
    from attnctl.processors import AttnCtlFluxProcessor

    calls = []
    original = AttnCtlFluxProcessor.__call__
    pipe = AttnCtlFluxPipeline(**flux_pipe.components)

    def spy(self, attn, hidden_states, *args, **kwargs):  # every site's processor, bound to a control or not
        calls.append((self.site.name, pipe.attnctl.state.gradient_pass, hidden_states.shape[0],
                      torch.is_grad_enabled()))
        return original(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(AttnCtlFluxProcessor, "__call__", spy)
    ctl = LayoutGuidance(boxes=BOXES, sites="transformer_blocks.0", scale="window(0.5, 0, 0.3)")
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, generator=gen(), num_images_per_prompt=2, true_cfg_scale=2.0, negative_prompt="",
         output_type="latent", controls=[ctl], **KW)
    grad = [c for c in calls if c[1]]
    assert grad and {c[0] for c in grad} == {"transformer_blocks.0.attn"}  # stopped after the one site
    assert all(c[2] == 2 and c[3] for c in grad)  # the 2 conditional rows, with gradients
    plain = [c for c in calls if not c[1]]
    assert {c[0] for c in plain} == {s.name for s in attnctl.list_sites(flux_pipe.transformer)}
    assert len(ctl.history) == 1  # step 0 only


def test_flux_negative_call_runs_on_the_guided_latent(flux_pipe, monkeypatch):
    cls = type(flux_pipe.transformer)
    forward = cls.forward
    inputs = []

    def spy(self, hidden_states, *args, **kwargs):
        inputs.append((hidden_states.detach().clone(), hidden_states.requires_grad))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    with attnctl.attach(flux_pipe, [LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.3)")]):
        flux_pipe(PROMPT, generator=gen(), true_cfg_scale=2.0, negative_prompt="", output_type="latent", **KW)
    # step 0: the gradient pass, the conditional call and the negative call; then 2 plain steps of 2 calls each
    assert [g for _, g in inputs] == [True, False, False, False, False, False, False]
    z, z_cond, z_neg = inputs[0][0], inputs[1][0], inputs[2][0]
    assert torch.equal(z_cond, z_neg) and (z_cond - z).abs().max() > 1e-4


def test_sd3_skip_layer_pass_runs_on_the_guided_latent(sd3_pipe, monkeypatch):
    cls = type(sd3_pipe.transformer)
    forward = cls.forward
    inputs = []

    def spy(self, hidden_states, *args, **kwargs):
        inputs.append((hidden_states.detach().clone(), kwargs.get("skip_layers") is not None))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    with attnctl.attach(sd3_pipe, [LayoutGuidance(boxes=BOXES, scale=0.5)]):
        sd3_pipe(PROMPT, generator=gen(), guidance_scale=3.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                 skip_layer_guidance_stop=1.0, output_type="latent", **KW)
    # diffusers runs the skip-layer pass from step 1 on: step 0 is [gradient pass, CFG call]; step 1 is the gradient
    # pass on z, the CFG call on [z', z'] and the skip-layer call on z'
    assert [skip for _, skip in inputs] == [False, False, False, False, True, False, False, True]
    (z, _), (cfg_rows, _), (skip, _) = inputs[2:5]
    assert torch.equal(cfg_rows[0], cfg_rows[1]) and torch.equal(skip[0], cfg_rows[1])
    assert (skip - z).abs().max() > 1e-4


def test_flux_dev_guidance_embedding_rows_follow_the_conditional_rows():
    from attnctl.testing import tiny_flux_pipeline

    pipe = AttnCtlFluxPipeline(**tiny_flux_pipeline(guidance_embeds=True).components)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, generator=gen(), num_images_per_prompt=2, guidance_scale=3.5, output_type="latent",
                 **KW).images
    lay = LayoutGuidance(boxes=BOXES, scale=0.5)
    moved = pipe(PROMPT, generator=gen(), num_images_per_prompt=2, guidance_scale=3.5, output_type="latent",
                 controls=[lay], **KW).images
    assert len(lay.history) == 3 and torch.isfinite(moved).all() and (moved - plain).abs().max() > 1e-3


def test_composes_with_softpag_and_the_perturbed_rows_stay_out_of_the_gradient_pass(sd35_pipe):
    pipe = AttnCtlSD3Pipeline(**sd35_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pag = attnctl.SoftPAG(heads=["L0H0"], scale=2.0)
    lay = LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.6)")
    seen = {}

    def spy(p, i, t, kw):
        seen[i] = (p.attnctl._latent.passes, p.attnctl._branch.calls)
        return {}

    both = pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[pag, lay], output_type="np",
                callback_on_step_end=spy, **KW).images
    assert seen == {0: (1, 1), 1: (2, 2), 2: (2, 3)}  # one gradient pass at steps 0, 1; the branch at every step
    only_pag = pipe(PROMPT, generator=gen(), guidance_scale=4.0, controls=[attnctl.SoftPAG(heads=["L0H0"],
                    scale=2.0)], output_type="np", **KW).images
    assert abs(both - only_pag).max() > 1e-3
    assert lay.sites and all(s.kind == "sd3_joint" for s in lay.sites)  # attn2 (image only) is not a word site


def test_several_prompts_in_one_call_each_use_their_own_tokens(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    prompts = [PROMPT, "a blue square and a big red circle"]  # the words at other positions
    lay = lambda: LayoutGuidance(boxes=BOXES, scale=0.5)  # noqa: E731
    both = pipe(prompts, generator=[gen(0), gen(1)], output_type="np", controls=[lay()], **KW).images
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, generator=gen(i), output_type="np", controls=[lay()], **KW).images[0]
        assert abs(both[i] - alone).max() < 1e-4, i
    plain = pipe(prompts, generator=[gen(0), gen(1)], output_type="np", **KW).images
    assert abs(both - plain).max() > 1e-3


def test_csg_images_do_not_depend_on_the_other_prompts_of_the_call(sd3_pipe):
    """CSG's random half draws from a generator of each prompt's own: the second prompt's image is the one it gets
    alone (a generator shared by the prompts of a call gave it the draws after the first prompt's)."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    prompts = [PROMPT, "a blue square and a big red circle"]
    lat = torch.randn(2, 12, 16, 24, generator=gen(1))
    kw = {**KW, "output_type": "latent"}
    lay = lambda: LayoutGuidance(boxes=BOXES, scale=0.5, loss="csg")  # noqa: E731
    both = pipe(prompts, latents=lat, controls=[lay()], **kw).images
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, latents=lat[i:i + 1], controls=[lay()], **kw).images
        assert (both[i] - alone[0]).abs().max() < 1e-4, i


def _controlnet_pipe(family: str, sd3_pipe, flux_pipe):
    """A diffusers ControlNet pipeline on the tiny model, with a one-block ControlNet whose residuals matter."""
    from diffusers import (
        FluxControlNetModel,
        FluxControlNetPipeline,
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
    )

    base = sd3_pipe if family == "sd3" else flux_pipe
    torch.manual_seed(0)
    if family == "sd3":
        cn = SD3ControlNetModel.from_transformer(base.transformer, num_layers=1, num_extra_conditioning_channels=0)
    else:
        tc = base.transformer.config
        cn = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=1,
                                                  attention_head_dim=tc.attention_head_dim,
                                                  num_attention_heads=tc.num_attention_heads)
    for p in cn.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.2)
    cls = StableDiffusion3ControlNetPipeline if family == "sd3" else FluxControlNetPipeline
    pipe = cls(**base.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")  # diffusers' own FLUX ControlNet
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_under_a_controlnet_pipeline_the_step_is_the_controlnet_and_transformer_at_the_moved_latent(
        family, sd3_pipe, flux_pipe, monkeypatch):
    """diffusers runs the ControlNet on the unmoved latent before the transformer; the step's call (and FLUX's
    negative call) must take its residuals at the moved latent, and the gradient pass runs the ControlNet too."""
    from PIL import Image


    pipe = _controlnet_pipe(family, sd3_pipe, flux_pipe)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    extra = {"guidance_scale": 4.0} if family == "sd3" else {"true_cfg_scale": 2.0, "negative_prompt": "a triangle"}
    kw = {**KW, "height": 32, "width": 32, "output_type": "latent", "control_image": image, **extra}
    noise = pipe.prepare_latents(1, pipe.transformer.config.in_channels // (4 if family == "flux" else 1), 32, 32,
                                 torch.float32, "cpu", gen())
    noise = noise[0] if isinstance(noise, tuple) else noise
    lay = LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.3)")
    grads = []
    forward = type(pipe.controlnet).forward

    def spy(self, *args, **kwargs):
        grads.append((kwargs["hidden_states"].requires_grad, torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(type(pipe.controlnet), "forward", spy)
        with attnctl.attach(pipe, [lay]):
            pipe(PROMPT, latents=noise.clone(), **kw)
    assert len(lay.history) == 1 and grads[:3] == [(False, False), (True, True), (False, False)]
    delta, moves = _move_once(monkeypatch, noise)
    with attnctl.attach(pipe, [LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.3)")]):
        guided = pipe(PROMPT, latents=noise.clone(), **kw).images
    assert moves == [0]
    want = pipe(PROMPT, latents=noise + delta, **kw).images
    torch.testing.assert_close(guided, want, atol=1e-5, rtol=1e-5)


def test_scale_assigned_after_construction_is_the_one_used(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    on = LayoutGuidance(boxes=BOXES, scale=0.0)
    on.config.scale = 0.5
    pipe(PROMPT, generator=gen(), output_type="latent", controls=[on], **KW)
    assert [s for s, _ in on.history] == [0, 1, 2]
    off = LayoutGuidance(boxes=BOXES, scale=0.5)
    off.config.scale = 0.0
    pipe(PROMPT, generator=gen(), output_type="latent", controls=[off], **KW)
    assert off.history == []


def test_with_gradient_checkpointing_the_losses_are_those_of_each_pass():
    """The backward recomputes checkpointed blocks; the maps made there must not add to the next pass's loss."""
    from attnctl.testing import tiny_sd3_pipeline

    pipe = AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3").components)  # its own modules: checkpointing stays here
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        lay = LayoutGuidance(boxes=BOXES, scale=0.5, iterations=2)
        out = pipe(PROMPT, generator=gen(), output_type="latent", controls=[lay], **KW).images
        runs.append(([v for _, v in lay.history], out))
        assert lay._loss_sum is None and lay._sites_seen == 0  # nothing left over for a next pass
    (plain, plain_out), (ckpt, ckpt_out) = runs
    assert ckpt == pytest.approx(plain, rel=1e-5) and (ckpt_out - plain_out).abs().max() < 1e-4


def test_missing_ignore_leaves_an_absent_words_box_out_of_the_self_attention_background(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    with_absent = LayoutGuidance(boxes={"circle": [0, 0, 0.5, 0.5], "triangle": [0.5, 0.5, 1, 1]}, missing="ignore",
                                 scale=0.5, self_weight=1.0)
    without = LayoutGuidance(boxes={"circle": [0, 0, 0.5, 0.5]}, scale=0.5, self_weight=1.0)
    for ctl in (with_absent, without):
        pipe(PROMPT, generator=gen(), output_type="latent", controls=[ctl], **KW)
    assert with_absent.history[0][1] == pytest.approx(without.history[0][1], rel=1e-5)


def test_the_gradient_pass_runs_with_the_weights_frozen_and_gives_their_flags_back(sd3_pipe, monkeypatch):
    """No weight gradient is wanted: none requires grad during the pass (autograd would keep activations for
    them), and each parameter's own flag comes back after it, also when the pass raises."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    params = list(pipe.transformer.parameters())
    before = [p.requires_grad for p in params]
    seen = []
    original = LayoutGuidance.latent_loss

    def spy(self):
        seen.append(any(p.requires_grad for p in params))
        return original(self)

    try:
        pipe.transformer.requires_grad_(True)
        params[0].requires_grad_(False)  # a mixed set: each parameter's own flag comes back
        monkeypatch.setattr(LayoutGuidance, "latent_loss", spy)
        pipe(PROMPT, generator=gen(), output_type="latent", controls=[LayoutGuidance(boxes=BOXES, scale=0.5)], **KW)
        assert seen == [False] * 3
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
        assert all(p.grad is None for p in params)

        def fail(self):
            raise RuntimeError("boom")

        monkeypatch.setattr(LayoutGuidance, "latent_loss", fail)
        with pytest.raises(RuntimeError, match="boom"):
            pipe(PROMPT, generator=gen(), output_type="latent", controls=[LayoutGuidance(boxes=BOXES)], **KW)
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


@pytest.mark.parametrize("offload", ["before attach", "inside attach"])
def test_both_wrappers_survive_model_cpu_offload(offload):
    """Model CPU offload drops forward wrappers at the end of every call; both come back at the next call (latent
    guidance outside the perturbed branch), so every call in the block is the same guided run, and none after it."""
    from attnctl.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline("sd3")  # its own modules: the offload hooks stay off the shared fixtures
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=gen(), guidance_scale=3.0, output_type="latent", **KW).images

    def controls():
        return [LayoutGuidance(boxes=BOXES, scale=0.5), attnctl.SoftPAG(heads=["L0H1"], scale=2.0)]

    plain = run()
    with attnctl.attach(pipe, controls()):
        reference = run()  # no offload
    if offload == "before attach":
        pipe.enable_model_cpu_offload(device="cpu")
    try:
        with attnctl.attach(pipe, controls()) as ctl:
            if offload == "inside attach":
                pipe.enable_model_cpu_offload(device="cpu")
            first, second = run(), run()
            assert ctl._latent.passes == 6 and ctl._branch.calls == 6  # 3 steps of each call, both guided
        after = run()
    finally:
        pipe.remove_all_hooks()
    assert (first - reference).abs().max() <= 1e-5 and (second - first).abs().max() <= 1e-6
    assert (first - plain).abs().max() > 1e-3 and (after - plain).abs().max() <= 1e-6
    # no wrapper is left inside the hooks' chain: the forward is the model's own, and nothing keeps the controller
    # (an offload hook put on top of a wrapper used to keep it as the forward it wraps)
    assert pipe.transformer.forward.__func__ is type(pipe.transformer).forward
    gone = weakref.ref(ctl)
    del ctl
    gc.collect()
    assert gone() is None


def test_bf16_on_cpu(sd3_pipe):
    from attnctl.testing import tiny_sd3_pipeline

    pipe = AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3", dtype=torch.bfloat16).components)
    pipe.set_progress_bar_config(disable=True)
    lay = LayoutGuidance(boxes=BOXES, scale="window(0.5, 0, 0.6)")
    out = pipe(PROMPT, generator=gen(), output_type="latent", controls=[lay], **KW).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and len(lay.history) == 2


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input(sd3_pipe, sd35_pipe):
    with pytest.raises(ConfigError, match="boxes is empty"):
        LayoutGuidance(boxes={})
    with pytest.raises(ConfigError, match="need 0 <= x0 < x1 <= 1"):
        LayoutGuidance(boxes={"circle": [0.5, 0.0, 0.2, 1.0]})
    with pytest.raises(ConfigError, match="four finite numbers"):
        LayoutGuidance(boxes={"circle": [0.0, 0.0, 1.0]})
    with pytest.raises(ConfigError, match="iterations=0"):
        LayoutGuidance(boxes=BOXES, iterations=0)
    with pytest.raises(ConfigError, match="self_weight"):
        LayoutGuidance(boxes=BOXES, self_weight=-1.0)
    with pytest.raises(ConfigError, match="more than once"):
        LayoutGuidance(boxes={"circle": [0, 0, 1, 1], "Circle": [0, 0, 1, 1]})
    for key in (",", "🟦", " "):  # guided the comma (or <unk>) token; the other word controls refuse these
        with pytest.raises(ConfigError, match="boxes holds an empty word or only punctuation"):
            LayoutGuidance(boxes={key: [0, 0, 1, 1]})
    with pytest.raises(LayoutError, match="boxed word 'triangle' is not in the prompt"):
        sd3_pipe_ = AttnCtlSD3Pipeline(**sd3_pipe.components)
        sd3_pipe_(PROMPT, generator=gen(), controls=[LayoutGuidance(boxes={"triangle": [0, 0, 1, 1]})], **KW)
    with pytest.raises(LayoutError, match=r"\(segments clip\).*\(this prompt has: a, red, circle\)"):  # not T5's
        sd3_pipe_("a red circle", prompt_3="a blue square", generator=gen(),
                  controls=[LayoutGuidance(boxes={"square": [0, 0, 1, 1]}, segments=["clip"])], **KW)
    with pytest.raises(ConfigError, match="needs the pipeline"):
        Controller(sd3_pipe.transformer, [LayoutGuidance(boxes=BOXES)])
    with pytest.raises(ConfigError, match="2 latent-guidance controls"):
        Controller(sd3_pipe, [LayoutGuidance(boxes=BOXES), LayoutGuidance(boxes=BOXES)])
    with pytest.raises(SiteError, match="no image-text attention"):
        Controller(sd35_pipe, [LayoutGuidance(boxes=BOXES, sites="transformer_blocks.0.attn2")])
    from diffusers import FlowMatchHeunDiscreteScheduler

    heun = AttnCtlSD3Pipeline(**{**sd3_pipe.components,
                                 "scheduler": FlowMatchHeunDiscreteScheduler.from_config(sd3_pipe.scheduler.config)})
    with pytest.raises(ConfigError, match="scheduler is FlowMatchHeunDiscreteScheduler"):
        heun(PROMPT, controls=[LayoutGuidance(boxes=BOXES)], **KW)
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        AttnCtlSD3Pipeline(**sd3_pipe.components)(PROMPT, controls=[LayoutGuidance(boxes=BOXES)], **KW)
    assert "forward" not in vars(sd3_pipe.transformer)


def test_missing_ignore_guides_the_words_present_and_leaves_a_prompt_without_any_alone(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    plain = pipe(PROMPT, generator=gen(), output_type="np", **KW).images
    none_present = LayoutGuidance(boxes={"triangle": [0, 0, 0.5, 0.5]}, missing="ignore", scale=0.5)
    with pytest.warns(UserWarning, match=r"none of the boxed words \['triangle'\] is in the run's prompt"):
        same = pipe(PROMPT, generator=gen(), output_type="np", controls=[none_present], **KW).images
    assert np.array_equal(same, plain)
    assert none_present.history == [] and "none guided" in none_present.summary()  # no gradient pass ran
    some = LayoutGuidance(boxes={"triangle": [0, 0, 0.5, 0.5], "circle": [0.5, 0, 1, 0.5]}, missing="ignore",
                          scale=0.5)
    moved = pipe(PROMPT, generator=gen(), output_type="np", controls=[some], **KW).images
    assert abs(moved - plain).max() > 1e-3 and len(some.history) == 3


def test_rows_of_a_call_pair_up_by_image():
    from attnctl.forward_wrap import image_rows

    assert image_rows(["uncond", "uncond", "cond", "cond"], 4, "x") == ([2, 3], [0, 1])
    assert image_rows(["cond", "cond"], 2, "x") == ([0, 1], [])
    with pytest.raises(ConfigError, match="knows 2 batch roles but the transformer got 3 rows"):
        image_rows(["uncond", "cond"], 3, "x")
    with pytest.raises(ConfigError, match="2 conditional and 1 unconditional rows; latent guidance pairs"):
        image_rows(["uncond", "cond", "cond"], 3, "latent guidance")


def test_json_round_trip():
    ctl = LayoutGuidance(boxes={"red circle": [0.1, 0.2, 0.5, 0.6]}, loss="csg", scale="linear(0.4, 0)",
                         self_weight=0.5)
    again = attnctl.control_from_json(ctl.to_json())
    assert isinstance(again, LayoutGuidance) and again.to_json() == ctl.to_json()


# ------------------------------------------------------------------------------------------------ toy world


@pytest.mark.parametrize("model", ["toy-sd3"])
def test_on_the_toy_models_the_objects_move_into_their_boxes(model):
    from attnctl.toyworld.evaluate import evaluate_set
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    call = {**default_call_kwargs(pipe), "output_type": "np"}
    items = prompt_set("pair")[:3]
    scores = {}
    for name in ("plain", "guided"):
        images, scored = [], []
        for it in items:
            boxes = {o["colour"]: b for o, b in zip(it["objects"], it["boxes"], strict=True)}
            controls = [LayoutGuidance(boxes=boxes)] if name == "guided" else []
            out = pipe([it["prompt"]] * 2, generator=[gen(0), gen(1)], controls=controls, **call).images
            images += [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in out]
            scored += [it, it]
            if controls:
                losses = [v for _, v in controls[0].history]
                assert losses[-1] < losses[0]  # the guided latents lower the layout loss
        scores[name] = evaluate_set(images, scored)["box_iou"]
    assert scores["guided"] > scores["plain"] + 0.1, scores
