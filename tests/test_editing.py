"""UnifyEdit: the losses against materialised references, the balance, the two branches of an edit on the toys,
and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnctl import UnifyEdit, attach, control_from_json, edit
from attnctl.controls.unify_edit import alignment_loss, differing_words, self_attention_gap
from attnctl.errors import ConfigError, LayoutError
from attnctl.inversion import invert

SOURCE, TARGET = "a red circle and a blue square", "a green circle and a blue square"


# ------------------------------------------------------------------------------------------ math


def test_differing_words_are_the_replaced_inserted_and_deleted_runs():
    assert differing_words(SOURCE, TARGET) == (["red"], ["green"])
    assert differing_words("a red circle", "a red circle and a square") == ([], ["and", "a", "square"])
    assert differing_words("A Red circle", "a red circle") == ([], [])
    assert differing_words("a red circle on the left", "a blue square on the left") == (["red", "circle"],
                                                                                      ["blue", "square"])


def _reference_gap(q, k, m=None):
    """The self-attention gap written out with the whole N×N maps."""
    def maps(i):
        logits = torch.einsum("nhd,mhd->hnm", q[i].double(), k[i].double()) / math.sqrt(q.shape[-1])
        return logits.softmax(-1).mean(0)

    a_s, a_t = maps(0), maps(1)
    w = torch.ones_like(a_s) if m is None else m.double()[:, None] * m.double()[None, :]
    return ((a_s - a_t) ** 2 * w).sum(), (a_s ** 2 * w).sum()


@pytest.mark.parametrize("region", [False, True])
def test_chunked_self_attention_gap_equals_the_materialised_maps_in_value_and_gradient(region):
    torch.manual_seed(0)
    n, heads, d = 24, 3, 8
    q = torch.randn(2, n, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n, heads, d, dtype=torch.float64)
    m = torch.rand(n) if region else None
    gap, ref = self_attention_gap(q, k, m, max_elems=2 * heads * n * 5)  # chunks of 5 query rows
    want_gap, want_ref = _reference_gap(q, k, m)
    torch.testing.assert_close(gap.double(), want_gap, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ref.double(), want_ref, atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(gap, q)
    (want,) = torch.autograd.grad(want_gap, q)
    assert float(g[0].abs().max()) == 0.0  # the source row is the reference: no gradient reaches it
    torch.testing.assert_close(g[1], want[1].to(g.dtype), atol=1e-6, rtol=1e-4)


def test_alignment_loss_is_the_in_mask_share_of_the_mean_attention():
    maps = torch.tensor([[0.5, 0.1], [0.3, 0.1], [0.1, 0.4], [0.1, 0.4]])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    share = [0.4 / (0.4 + 0.1), 0.1 / (0.1 + 0.4)]  # μ_in / (μ_in + μ_out) of each word
    want = np.mean([(1 - s) ** 2 for s in share])
    assert float(alignment_loss(maps, mask)) == pytest.approx(want)
    assert alignment_loss(maps, torch.zeros(4)) is None and alignment_loss(maps, torch.ones(4)) is None


def test_the_balance_gates_each_unit_gradient_by_how_far_its_constraint_is_from_met():
    c = UnifyEdit(sa_weight=2.0, ca_weight=1.0, sa_tolerance=0.1, ca_tolerance=0.2)
    g_sa, g_ca = torch.full((1, 4), 3.0), torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    d = c.direction({"sa": torch.tensor(0.05), "ca": torch.tensor(0.4)}, {"sa": g_sa, "ca": g_ca})
    # SA at half its tolerance pushes at half its weight; CA beyond its tolerance pushes fully; both at unit rms
    torch.testing.assert_close(d, 2.0 * 0.5 * torch.ones(1, 4) + 1.0 * g_ca)
    assert c.history[-1].sa_weight == pytest.approx(1.0) and c.history[-1].ca_weight == pytest.approx(1.0)
    fixed = UnifyEdit(sa_weight=2.0, balance="fixed")
    d = fixed.direction({"sa": torch.tensor(0.001), "ca": None}, {"sa": g_sa})
    torch.testing.assert_close(d, 2.0 * torch.ones(1, 4))


def test_localised_alignment_moves_the_latent_inside_the_mask_only():
    from attnctl.editing import EditBranches

    c = UnifyEdit(ca_weight=1.0, sa_weight=0.0, balance="fixed")
    c.mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the top-left token of a 2×2 grid
    wrapper = EditBranches.__new__(EditBranches)
    wrapper.control = c
    sd3 = wrapper._latent_mask(torch.zeros(1, 4, 4, 4))  # SD3: 2×2 pixels per token
    assert sd3.shape == (1, 1, 4, 4) and sd3[0, 0, :2, :2].eq(1).all() and float(sd3.sum()) == 4.0
    flux = wrapper._latent_mask(torch.zeros(1, 4, 16))  # FLUX: one packed row per token
    assert flux.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    g = torch.randn(1, 4, 16)
    d = c.direction({"ca": torch.tensor(1.0)}, {"ca": g}, flux)
    assert float(d[:, 1:].abs().max()) == 0.0 and float(d[:, 0].abs().max()) > 0
    free = UnifyEdit(sa_weight=0.0, balance="fixed", localise=False)
    assert float(free.direction({"ca": torch.tensor(1.0)}, {"ca": g}, flux)[:, 1:].abs().max()) > 0


def test_config_round_trips_through_json_and_refuses_bad_values():
    c = UnifyEdit(edit_words=["green"], box=[0.1, 0.1, 0.5, 0.5], sites="mid", sa_region="outside")
    back = control_from_json(c.to_json())
    assert isinstance(back, UnifyEdit) and back.config == c.config
    for bad, match in [({"iterations": 0}, "iterations"), ({"box": [0.5, 0.1, 0.2, 0.4]}, "box"),
                       ({"edit_words": []}, "edit_words"), ({"sa_weight": -1.0}, "sa_weight"),
                       ({"ca_tolerance": 0.0}, "ca_tolerance"), ({"balance": "magic"}, "balance")]:
        with pytest.raises(ConfigError, match=match):
            UnifyEdit(**bad)


# ------------------------------------------------------------------------------------------ the two branches


@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_unguided_edit_replays_the_source_and_runs_the_target_as_the_stock_pipeline(model, scene, request):
    pipe = request.getfixturevalue(model)
    steps = 6
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), output_type="latent",
               guidance_scale=1.0)
    path = res.path
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)  # the image's latent
    stock = pipe(TARGET, latents=path[0], num_inference_steps=steps, height=32, width=32, guidance_scale=1.0,
                 max_sequence_length=24, output_type="latent").images[0]
    torch.testing.assert_close(res.edited.float(), stock.float(), atol=1e-4, rtol=1e-4)
    again = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), output_type="latent",
                 guidance_scale=1.0, path=res.path)  # an inversion at hand is reused as it is
    assert again.path is res.path and torch.equal(again.edited, res.edited)


def test_with_cfg_the_target_rows_are_the_stock_cfg_run_and_the_source_still_replays(toy_sd3, scene):
    res = edit(toy_sd3, scene, SOURCE, TARGET, 5, control=UnifyEdit(scale=0.0), guidance_scale=4.5,
               output_type="latent")
    stock = toy_sd3(TARGET, latents=res.path[0], num_inference_steps=5, height=32, width=32, guidance_scale=4.5,
                    max_sequence_length=24, output_type="latent").images[0]
    torch.testing.assert_close(res.edited.float(), stock.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], res.path[-1].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_later_calls_of_a_step_get_the_terms_of_its_batched_call(model, scene, request):
    """SD3's skip-layer pass and FLUX's true-CFG negative call: unguided, the target is still the stock run."""
    pipe = request.getfixturevalue(model)
    extra = ({"skip_guidance_layers": [1], "guidance_scale": 4.5} if model == "toy_sd3"
             else {"true_cfg_scale": 2.0, "guidance_scale": 1.0})
    negative = {} if model == "toy_sd3" else {"negative_prompt": ["a blue circle"] * 2}
    res = edit(pipe, scene, SOURCE, TARGET, 5, control=UnifyEdit(scale=0.0), output_type="latent", **extra,
               **negative)
    stock = pipe(TARGET, latents=res.path[0], num_inference_steps=5, height=32, width=32, max_sequence_length=24,
                 output_type="latent", **extra, **{k: v[0] for k, v in negative.items()}).images[0]
    torch.testing.assert_close(res.edited.float(), stock.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], res.path[-1].float(), atol=1e-4, rtol=0)
    guided = UnifyEdit()  # and guided, both calls run: the source still replays
    res = edit(pipe, scene, SOURCE, TARGET, 5, control=guided, output_type="latent", **extra, **negative)
    assert guided.history
    torch.testing.assert_close(res.source.float()[None], res.path[-1].float(), atol=1e-4, rtol=0)


def test_the_source_image_comes_back_and_guidance_lowers_its_alignment_loss(toy_sd3, scene):
    probe = UnifyEdit(scale="window(1e-9, 0, 0.5)")  # records the losses, moves nothing
    plain = edit(toy_sd3, scene, SOURCE, TARGET, 20, control=probe, guidance_scale=4.5)
    assert np.abs(np.asarray(plain.source).astype(float) - scene).mean() < 1.0  # the toy autoencoder is lossless
    guided = UnifyEdit()
    res = edit(toy_sd3, scene, SOURCE, TARGET, 20, control=guided, guidance_scale=4.5)
    assert len(guided.history) == 10 and guided.mask is not None and guided.mask.any()
    unguided_ca = np.mean([h.ca_loss for h in probe.history[3:]])
    guided_ca = np.mean([h.ca_loss for h in guided.history[3:]])
    assert guided_ca < 0.8 * unguided_ca
    assert "UnifyEdit over 10 guided steps" in guided.summary()
    assert np.abs(np.asarray(res.source).astype(float) - scene).mean() < 1.0  # the source branch is untouched


def test_flux_edit_runs_the_gradient_pass_and_moves_the_target(toy_flux, scene):
    c = UnifyEdit(sites="mid")
    res = edit(toy_flux, scene, SOURCE, TARGET, 6, control=c, output_type="latent")
    assert c.history and all(h.ca_loss is not None and h.sa_loss is not None for h in c.history)
    plain = edit(toy_flux, scene, SOURCE, TARGET, 6, control=UnifyEdit(scale=0.0), output_type="latent")
    assert float((res.edited.float() - plain.edited.float()).abs().mean()) > 1e-3


def test_weights_of_zero_are_said_and_cost_nothing_and_history_counts_denoising_steps(toy_sd3, scene, monkeypatch):
    """Both weights 0 ran a gradient pass at every guided step for nothing and said nothing; under the midpoint
    scheduler the history counted the loop's calls (0, 2, 4) where everything else counts denoising steps."""
    from attnctl.editing import EditBranches
    from attnctl.midpoint import FlowMatchMidpointScheduler

    passes = []
    forward = EditBranches._forward
    monkeypatch.setattr(EditBranches, "_forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    path = invert(toy_sd3, scene, SOURCE, 4)
    with pytest.warns(UserWarning, match="UnifyEdit does nothing in this run: sa_weight and ca_weight are both 0"):
        none = edit(toy_sd3, scene, SOURCE, TARGET, 4, control=UnifyEdit(sa_weight=0, ca_weight=0), path=path,
                    output_type="latent")
    plain = edit(toy_sd3, scene, SOURCE, TARGET, 4, control=UnifyEdit(scale=0.0), path=path, output_type="latent")
    assert torch.equal(none.edited, plain.edited) and not none.control.history
    mid = _with_scheduler(toy_sd3, FlowMatchMidpointScheduler)
    c = UnifyEdit(scale="window(1, 0, 0.6)")
    edit(mid, scene, SOURCE, TARGET, 4, control=c, output_type="latent")
    assert [h.step for h in c.history] == [0, 1]


def _with_scheduler(pipe, scheduler_cls):
    return type(pipe)(**{**pipe.components, "scheduler": scheduler_cls.from_config(pipe.scheduler.config)})


@pytest.mark.parametrize("scheduler", ["euler", "midpoint"])
@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_a_move_of_the_target_latent_is_the_stock_run_from_the_moved_latent(model, scheduler, scene, request,
                                                                             monkeypatch):
    """The first guided call moves the target latent by a fixed δ: the edit's target must then be the stock run from
    ``path[0] + δ``, under either solver (the midpoint's second call carries the move over its whole step), while the
    source still replays its path (which has the midpoints too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from attnctl.editing import EditBranches
    from attnctl.midpoint import FlowMatchMidpointScheduler

    cls = FlowMatchMidpointScheduler if scheduler == "midpoint" else FlowMatchEulerDiscreteScheduler
    pipe = _with_scheduler(request.getfixturevalue(model), cls)
    steps = 4
    path = invert(pipe, scene, SOURCE, steps)
    assert len(path) == steps * pipe.scheduler.order + 1
    delta = 0.3 * torch.randn(path[0].shape, generator=torch.Generator().manual_seed(1))
    moves = []

    def descend(self, bound, batch, rows, z_src, z, size, share=None):
        moves.append(self.controller.state.step)
        return z + delta if len(moves) == 1 else z

    monkeypatch.setattr(EditBranches, "_descend", descend)
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale="window(1, 0, 0.5)"), path=path,
               output_type="latent", guidance_scale=1.0)
    assert moves == ([0, 2] if scheduler == "midpoint" else [0, 1])  # the first half, a step's first call only
    stock = pipe(TARGET, latents=path[0] + delta, num_inference_steps=steps, height=32, width=32, guidance_scale=1.0,
                 max_sequence_length=24, output_type="latent").images[0]
    torch.testing.assert_close(res.edited.float(), stock.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_a_guided_midpoint_edit_with_later_calls_still_replays_the_source(model, scene, request):
    from attnctl.midpoint import FlowMatchMidpointScheduler

    pipe = _with_scheduler(request.getfixturevalue(model), FlowMatchMidpointScheduler)
    extra = ({"skip_guidance_layers": [1], "guidance_scale": 4.5} if model == "toy_sd3"
             else {"true_cfg_scale": 2.0, "guidance_scale": 1.0, "negative_prompt": ["a blue circle"] * 2})
    guided = UnifyEdit()
    res = edit(pipe, scene, SOURCE, TARGET, 4, control=guided, output_type="latent", **extra)
    steps = [h.step for h in guided.history]  # denoising steps, one gradient pass each (the anchor call's)
    assert len(res.path) == 9 and steps and steps == sorted(set(steps)) and steps[-1] < 4
    torch.testing.assert_close(res.source.float()[None], res.path[-1].float(), atol=1e-4, rtol=0)
    euler_path = invert(request.getfixturevalue(model), scene, SOURCE, 4)
    with pytest.raises(ConfigError, match="the path is a 4-step euler inversion, and this edit runs 4 midpoint"):
        edit(pipe, scene, SOURCE, TARGET, 4, path=euler_path, output_type="latent", **extra)
    with pytest.raises(ConfigError, match="holds 5 latents, and a 4-step midpoint edit replays 9"):
        edit(pipe, scene, SOURCE, TARGET, 4, path=[z.clone() for z in euler_path], output_type="latent",
             **extra)  # as a path loaded from a file: unknown here, so checked by its length


# ------------------------------------------------------------------------------------------ bad input


def test_edit_refuses_bad_calls_with_named_errors(toy_sd3, scene):
    with pytest.raises(ConfigError, match="nothing to edit"):
        edit(toy_sd3, scene, SOURCE, SOURCE.upper(), 4)
    with pytest.raises(ConfigError, match="target_prompt must be a non-empty string"):
        edit(toy_sd3, scene, SOURCE, "  ", 4)
    with pytest.raises(ConfigError, match="sets latents itself"):
        edit(toy_sd3, scene, SOURCE, TARGET, 4, latents=torch.zeros(1))
    for grid in ({"sigmas": [1.0, 0.9, 0.8, 0.7]}, {"timesteps": [999, 900, 800, 700]}, {"mu": 0.5}):
        name = next(iter(grid))  # the edit ran at these noise levels, the inversion at the pipeline's own
        with pytest.raises(ConfigError, match=f"{name}=... would run the edit at other noise levels"):
            edit(toy_sd3, scene, SOURCE, TARGET, 4, **grid)
    with pytest.raises(ConfigError, match="takes a UnifyEdit control"):
        edit(toy_sd3, scene, SOURCE, TARGET, 4, control=object())
    with pytest.raises(LayoutError, match=r"edit_words \['purple'\] are not words of the prompt"):
        edit(toy_sd3, scene, SOURCE, TARGET, 4, control=UnifyEdit(edit_words=["purple"]))
    with pytest.raises(ConfigError, match="multiples of"):
        edit(toy_sd3, scene[:30, :30], SOURCE, TARGET, 4)
    big = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ConfigError, match="this model's largest side is 32 px"):
        edit(toy_sd3, big, SOURCE, TARGET, 4)
    with pytest.raises(ConfigError, match="largest side is 32 px"):
        invert(toy_sd3, big, SOURCE, 4)


def test_word_and_path_problems_are_refused_before_the_inversion(toy_sd3, scene, monkeypatch):
    """What the edit's words need is checked before the inversion runs (it takes as long as the edit); a path given
    is checked against the image (its last latent is the image's own) and the edit's steps and solver."""
    from attnctl.controls.unify_edit import differing_words

    assert differing_words("a red, small square", "a green, small square") == (["red"], ["green"])  # no "green,"
    path = invert(toy_sd3, scene, SOURCE, 4)
    with pytest.raises(ConfigError, match="path ends at another image's latent"):
        edit(toy_sd3, scene[::-1].copy(), SOURCE, TARGET, 4, path=path)
    with pytest.raises(ConfigError, match="the path is of an image of another size"):
        edit(toy_sd3, scene[:16, :16].copy(), SOURCE, TARGET, 4, path=path)
    with pytest.raises(ConfigError, match="the path is a 4-step euler inversion, and this edit runs 8 euler"):
        edit(toy_sd3, scene, SOURCE, TARGET, 8, path=path)

    def no_inversion(*args, **kwargs):
        raise AssertionError("the inversion ran before the words were checked")

    monkeypatch.setattr("attnctl.editing.invert", no_inversion)
    with pytest.raises(ConfigError, match=r"replaces no word of the source.*mask_words=\[...\], or give box"):
        edit(toy_sd3, scene, SOURCE, SOURCE, 4, control=UnifyEdit(edit_words=["red"]))
    with pytest.raises(ConfigError, match=r"nothing to edit.*mask_words"):
        edit(toy_sd3, scene, SOURCE, SOURCE, 4)
    with pytest.raises(ConfigError, match="adds no word to the source"):
        edit(toy_sd3, scene, "a red circle and a blue square", "a circle and a blue square", 4)
    with pytest.raises(LayoutError, match=r"mask_words \['green'\] are not words of the prompt"):
        edit(toy_sd3, scene, SOURCE, TARGET, 4, control=UnifyEdit(mask_words=["green"]))
    long = "a red circle and a blue square and a green triangle and a red circle and a blue " * 2
    with pytest.raises(LayoutError, match="'yellow' .* is past the tokens the text encoders read"):  # cut off
        edit(toy_sd3, scene, long + "blue square", long + "yellow square", 4)
    res = edit(toy_sd3, scene, SOURCE, SOURCE, 4, control=UnifyEdit(edit_words=["red"], box=[0, 0, 0.5, 0.5]),
               path=path, output_type="latent")  # a box instead of mask words; the path given, no inversion
    assert res.path is path


def test_default_words_are_taken_where_the_prompts_differ_not_at_every_occurrence(toy_sd3, scene):
    """In "a red circle and a red square" → "a red circle and a green square" the mask is the square's "red" only;
    it held both "red"s, so the mask took in the object the edit keeps."""
    from attnctl.layout import layout_for_pipeline

    source, target = "a red circle and a red square", "a red circle and a green square"
    control = UnifyEdit()
    clip = toy_sd3.tokenizer_max_length  # the toy's CLIP and T5 segments: 24 tokens each
    src, tgt = (layout_for_pipeline(toy_sd3, text, clip + 24, (1, 1)) for text in (source, target))
    control.check_layouts(src, tgt)
    mask, words = control._words("mask", src, tgt), control._words("edit", src, tgt)
    assert mask == [[6, clip + 6]] and words == [[6, clip + 6]]  # <start> a red circle and a [red|green]
    assert src.phrase_tokens("red") == [2, 6, clip + 2, clip + 6]  # (the word alone is both)
    res = edit(toy_sd3, scene, source, target, 2, output_type="latent")
    assert [cols for (_, which), (_, cols) in res.control._columns.items() if which == "mask"] == [[[6, clip + 6]]]


def test_attached_control_needs_its_source_path_the_same_steps_and_two_images(toy_sd3, scene):
    call = {"height": 32, "width": 32, "guidance_scale": 1.0, "max_sequence_length": 24}
    c = UnifyEdit()
    with attach(toy_sd3, [c]), pytest.raises(ConfigError, match="no source path"):
        toy_sd3([SOURCE, TARGET], num_inference_steps=4, **call)
    path = invert(toy_sd3, scene, SOURCE, 4)
    c.set_source(path)
    with attach(toy_sd3, [c]), pytest.raises(ConfigError, match="holds 5 latents and this run.s loop makes 5 calls"):
        toy_sd3([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=5, **call)
    with attach(toy_sd3, [c]), pytest.raises(ConfigError, match="source and a target image in one batch"):
        toy_sd3(TARGET, latents=path[0], num_inference_steps=4, **call)
    with attach(toy_sd3, [c]), torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        toy_sd3([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=4, **call)
    with pytest.raises(ConfigError, match="list of latents"):
        c.set_source(path[0])


def test_unify_edit_does_not_combine_with_a_perturbed_branch(toy_sd3):
    from attnctl import SoftPAG

    with pytest.raises(ConfigError, match="its own source and target rows"):
        attach(toy_sd3, [UnifyEdit(), SoftPAG(heads=["L0"], u=1.0)])


def test_unify_edit_refuses_a_controlnet_pipeline(sd3_pipe):
    """Its branches run the transformer only: the ControlNet's residuals would come from the unmoved latent."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    cn = SD3ControlNetModel.from_transformer(sd3_pipe.transformer, num_layers=1, num_extra_conditioning_channels=0)
    pipe = StableDiffusion3ControlNetPipeline(**sd3_pipe.components, controlnet=cn)
    with pytest.raises(ConfigError, match="runs its ControlNet before that call on the unmoved latent"):
        attach(pipe, [UnifyEdit()])


def test_scale_assigned_after_construction_is_the_one_used(toy_sd3, scene):
    path = invert(toy_sd3, scene, SOURCE, 4)
    c = UnifyEdit(scale=0.0)
    c.config.scale = "window(0.5, 0, 0.6)"
    edit(toy_sd3, scene, SOURCE, TARGET, 4, control=c, path=path, output_type="latent")
    assert [h.step for h in c.history] == [0, 1]


def test_with_gradient_checkpointing_each_pass_has_its_own_losses(toy_sd3, scene):
    """The backward recomputes checkpointed blocks; the terms made there must not join the next pass's losses (nor
    give sa_region='edit' a stale mask)."""
    path = invert(toy_sd3, scene, SOURCE, 4)
    runs = []
    try:
        for checkpointing in (False, True):
            if checkpointing:
                toy_sd3.transformer.enable_gradient_checkpointing()
            c = UnifyEdit(scale="window(0.5, 0, 0.6)", iterations=2, sa_region="edit")
            res = edit(toy_sd3, scene, SOURCE, TARGET, 4, control=c, path=path, output_type="latent")
            runs.append(([(h.sa_loss, h.ca_loss) for h in c.history], res.edited))
            assert not (c._gap or c._target_maps or c._source_maps)  # nothing left over for a next pass
    finally:
        toy_sd3.transformer.disable_gradient_checkpointing()
    (plain, plain_out), (ckpt, ckpt_out) = runs
    assert len(ckpt) == 4 and np.allclose(ckpt, plain, rtol=1e-5)
    assert float((ckpt_out.float() - plain_out.float()).abs().max()) < 1e-4


def test_the_edit_gradient_pass_runs_with_the_weights_frozen_and_gives_their_flags_back(toy_sd3, scene, monkeypatch):
    """The pass wants the target latent's gradient only; weights that require grad (as from_pretrained leaves them)
    made autograd keep activations for weight gradients nobody reads."""
    params = list(toy_sd3.transformer.parameters())
    before = [p.requires_grad for p in params]
    seen = []
    losses = UnifyEdit.edit_losses
    monkeypatch.setattr(UnifyEdit, "edit_losses", lambda self: seen.append(any(p.requires_grad for p in params))
                        or losses(self))
    try:
        toy_sd3.transformer.requires_grad_(True)
        params[0].requires_grad_(False)  # a mixed set: each parameter's own flag comes back
        edit(toy_sd3, scene, SOURCE, TARGET, 4, control=UnifyEdit(scale="window(1, 0, 0.5)"), output_type="latent")
        assert seen and not any(seen)
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
        assert all(p.grad is None for p in params)
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def test_edit_refuses_another_attached_controller_before_inverting(toy_sd3, scene, monkeypatch):
    """Under another attached controller the edit's own attach refused only after the whole inversion had run
    through that controller's controls."""
    from attnctl import AttentionProbe

    def no_inversion(*args, **kwargs):
        raise AssertionError("the inversion ran before the other controller was refused")

    monkeypatch.setattr("attnctl.editing.invert", no_inversion)
    for controls, named in (([AttentionProbe()], "AttentionProbe"), ([], "no controls")):
        with attach(toy_sd3, controls), pytest.raises(
                ConfigError, match=rf"another attnctl controller \({named}\) is already attached.*Fix: call "
                                   "attnctl.edit outside the attnctl.attach with-block"):
            edit(toy_sd3, scene, SOURCE, TARGET, 4)


def test_a_source_path_of_other_steps_names_the_steps_to_call_with(toy_sd3, scene):
    """The length message read "holds 5 latents and this run's loop makes 5 calls": two equal numbers, and no word
    of which steps to call with."""
    from attnctl.midpoint import FlowMatchMidpointScheduler

    call = {"height": 32, "width": 32, "guidance_scale": 1.0, "max_sequence_length": 24}
    path = invert(toy_sd3, scene, SOURCE, 4)
    c = UnifyEdit().set_source(path)
    with attach(toy_sd3, [c]), pytest.raises(
            ConfigError, match=r"holds 5 latents and this run.s loop makes 5 calls, which replay 6 .*Fix: call "
                               r"the pipeline with num_inference_steps=4, .* or invert the image with "
                               r"num_inference_steps=5"):
        toy_sd3([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=5, **call)
    mid = _with_scheduler(toy_sd3, FlowMatchMidpointScheduler)  # two calls a step: 8 calls replay 9 latents
    with attach(mid, [c]), pytest.raises(
            ConfigError, match=r"makes 8 calls, which replay 9 .*Fix: invert the image with num_inference_steps=4 and "
                               r"this pipeline's scheduler \(the path is a 4-step euler inversion"):
        mid([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=4, **call)
    with attach(mid, [c]), pytest.raises(  # the same number of latents, at other noise levels
            ConfigError, match=r"the source path is a 4-step euler inversion, and this run takes midpoint steps.*Fix: "
                               r"invert the image with num_inference_steps=2 and this pipeline's scheduler"):
        mid([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=2, **call)
    loaded = [z.clone() for z in path[:4]]  # a path not made here (loaded from a file): 3 calls, no whole step
    with attach(mid, [c.set_source(loaded)]), pytest.raises(
            ConfigError, match=r"holds 4 latents.*Fix: invert the image with num_inference_steps=2 .*no whole number"):
        mid([SOURCE, TARGET], latents=torch.cat([path[0]] * 2), num_inference_steps=2, **call)
