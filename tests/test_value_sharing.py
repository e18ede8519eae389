"""Value sharing (RF-Solver-Edit's feature sharing): the value swap against plain indexing, an edit with sharing
against a plain loop over the stock processors with the late sites' value projections swapped by hooks, the late
sites of the full-size models, and bad input."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attnctl import UnifyEdit, ValueSharing, attach, control_from_json, edit, invert
from attnctl.configs import build_empty, transformer_config
from attnctl.errors import ConfigError, SiteError
from attnctl.inversion import has_guidance_embedding, run_sigmas, text_length
from attnctl.midpoint import FlowMatchMidpointScheduler
from attnctl.processors import KeyBias, Selection, SharedValues, attend, fused_attention
from attnctl.processors.attend import share_values
from attnctl.sites import family_of, list_sites

SOURCE, TARGET = "a red circle and a blue square", "a green circle and a blue square"
NEGATIVE = "a blue circle"


# ------------------------------------------------------------------------------------------ the swap


def test_shared_values_are_the_source_rows_values_blended_by_the_weight():
    torch.manual_seed(0)
    v = torch.randn(4, 6, 3, 5, requires_grad=True)
    rows, src = torch.tensor([1, 3]), torch.tensor([0, 2])
    full = share_values(v, [SharedValues(src, 1.0, Selection(batch=rows))])
    assert torch.equal(full[1], v[0]) and torch.equal(full[3], v[2]) and torch.equal(full[[0, 2]], v[[0, 2]])
    part = share_values(v, [SharedValues(src, 0.25, Selection(batch=rows, rows=slice(2, 5),
                                                              heads=torch.tensor([0, 2])))])
    want = v.detach().clone()
    for r, s in ((1, 0), (3, 2)):
        for h in (0, 2):
            want[r, 2:5, h] = 0.75 * v[r, 2:5, h] + 0.25 * v[s, 2:5, h]
    torch.testing.assert_close(part, want)
    assert torch.equal(share_values(v, [SharedValues(src, 0.0, Selection(batch=rows))]), v)
    part.sum().backward()  # out of place: autograd reaches both the rows and their sources
    assert float(v.grad[0, 3, 0, 0]) == pytest.approx(1.25) and float(v.grad[1, 3, 0, 0]) == pytest.approx(0.75)
    for bad, match in [(SharedValues(torch.tensor([0]), 1.0, Selection(batch=rows)), "one source row"),
                       (SharedValues(src, 1.5, Selection(batch=rows)), "outside \\[0, 1\\]"),
                       (SharedValues(torch.tensor([0, 9]), 1.0, Selection(batch=rows)), "outside this call's batch")]:
        with pytest.raises(ValueError, match=match):
            share_values(v, [bad])


def test_attention_with_shared_values_is_attention_over_the_swapped_values_with_other_contributions_too():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 10, 2, 8) for _ in range(3))
    share = SharedValues(torch.tensor([0]), 1.0, Selection(batch=torch.tensor([1])))
    swapped = v.clone()
    swapped[1] = v[0]
    torch.testing.assert_close(attend(q, k, v, [share]), fused_attention(q, k, swapped))
    bias = KeyBias(torch.tensor([3]), torch.tensor(1.5), Selection(batch=torch.tensor([1])))
    torch.testing.assert_close(attend(q, k, v, [share, bias]), attend(q, k, swapped, [bias]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ the edit


@contextlib.contextmanager
def _swapped_values(transformer, site_names, pairs, text: bool = True):
    """Forward hooks on the value projections of ``site_names``: batch row ``t`` gets row ``s``'s values for each
    ``(t, s)`` of ``pairs``, with the stock processors doing the attention. ``text=False`` leaves the text tokens'
    projection (``add_v_proj``) alone."""
    def hook(module, args, out):
        out = out.clone()
        for t, s in pairs:
            out[t] = out[s]
        return out

    handles = []
    for name in site_names:
        attn = transformer.get_submodule(name)
        handles.append(attn.to_v.register_forward_hook(hook))
        if getattr(attn, "add_v_proj", None) is not None and text:
            handles.append(attn.add_v_proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _encoded(pipe, prompts, cfg: bool):
    """What the pipeline feeds the transformer for ``prompts`` (with the negative rows first under CFG)."""
    n, length = len(prompts), text_length(pipe)
    if family_of(pipe.transformer) == "flux":
        emb, pooled, txt_ids = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=length)
        side = 32 // pipe.vae_scale_factor // 2
        img_ids = pipe._prepare_latent_image_ids(n, side, side, "cpu", emb.dtype)
        g = torch.full((n,), 1.0) if has_guidance_embedding(pipe) else None
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": txt_ids, "img_ids": img_ids,
                "guidance": g}, 1.0
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                      max_sequence_length=length, do_classifier_free_guidance=cfg)
    if cfg:
        emb, pooled = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])
    return {"encoder_hidden_states": emb, "pooled_projections": pooled}, 1000.0


@pytest.mark.parametrize("model,cfg", [("toy_sd3", False), ("toy_sd3", True), ("toy_flux", False)])
def test_an_edit_with_sharing_is_the_plain_loop_with_the_late_value_projections_swapped(model, cfg, scene, request):
    """The target's Euler loop written out: at a sharing step one forward of ``[source on path[k], target]`` (under
    CFG ``[uncond source, uncond target, source, target]``) through the stock processors, with the value projections
    of the late sites copying each source row into its target row; other steps the target alone."""
    pipe = request.getfixturevalue(model)
    steps, scale = 5, 3.0 if cfg else 1.0
    path = invert(pipe, scene, SOURCE, steps)
    share = ValueSharing(weight="window(1, 0, 0.5)")  # steps 0, 1 of 5 (progress 0, 0.25)
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), share=share, path=path,
               output_type="latent", guidance_scale=scale)
    assert share.shared_steps == [0, 1]
    late = [s.name for s in share.sites]
    assert late == (["transformer_blocks.4.attn", "transformer_blocks.5.attn"] if model == "toy_sd3"
                    else ["single_transformer_blocks.2.attn", "single_transformer_blocks.3.attn"])
    s = [float(x) for x in run_sigmas(pipe, steps, 32, 32)]
    both, t_scale = _encoded(pipe, [SOURCE, TARGET], cfg)
    alone, _ = _encoded(pipe, [TARGET], cfg)
    pairs = [(1, 0), (3, 2)] if cfg else [(1, 0)]
    z = path[0]
    with torch.no_grad():
        for i in range(steps):
            shared = i < 2
            rows = [path[i], z] if shared else [z]
            hidden = torch.cat(rows * (2 if cfg else 1))
            ctx = _swapped_values(pipe.transformer, late, pairs) if shared else contextlib.nullcontext()
            with ctx:
                out = pipe.transformer(hidden_states=hidden, timestep=torch.full((len(hidden),), s[i] * t_scale),
                                       return_dict=False, **(both if shared else alone))[0]
            target = out[len(rows) - 1::len(rows)]  # the target rows: [uncond, cond] under CFG
            v = target[0] + scale * (target[1] - target[0]) if cfg else target[0]
            z = z + (s[i + 1] - s[i]) * v[None]
    torch.testing.assert_close(res.edited.float()[None], z.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)
    plain = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), path=path, output_type="latent",
                 guidance_scale=scale)
    assert float((plain.edited.float() - res.edited.float()).abs().mean()) > 1e-3  # the sharing did something
    with pytest.warns(UserWarning, match="shares nothing"):
        off = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), share=ValueSharing(weight=0.0),
                   path=path, output_type="latent", guidance_scale=scale)
    assert torch.equal(off.edited, plain.edited)  # weight 0: the run without sharing


def test_image_tokens_only_leave_the_target_prompts_text_values_its_own(toy_sd3, scene):
    steps = 4
    path = invert(toy_sd3, scene, SOURCE, steps)
    share = ValueSharing(weight=1.0, tokens="image", sites=["transformer_blocks.3.attn"])
    res = edit(toy_sd3, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), share=share, path=path,
               output_type="latent", guidance_scale=1.0)
    s = [float(x) for x in run_sigmas(toy_sd3, steps, 32, 32)]
    both, _ = _encoded(toy_sd3, [SOURCE, TARGET], False)
    z = path[0]
    with torch.no_grad(), _swapped_values(toy_sd3.transformer, ["transformer_blocks.3.attn"], [(1, 0)], text=False):
        for i in range(steps):  # SD3's to_v holds the image tokens only; add_v_proj (the text) is left alone
            out = toy_sd3.transformer(hidden_states=torch.cat([path[i], z]), timestep=torch.full((2,), s[i] * 1000.0),
                                      return_dict=False, **both)[0]
            z = z + (s[i + 1] - s[i]) * out[1:]
    torch.testing.assert_close(res.edited.float()[None], z.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_sharing_reaches_the_later_calls_of_a_step_and_both_calls_of_a_midpoint_step(model, solver, scene, request):
    """SD3 with CFG and its skip-layer pass (on at every call after the first), FLUX with its true-CFG negative call,
    each under the Euler and the midpoint step: the edit equals the loop written here, in which every call of a
    sharing step (the batched call, the later call, the midpoint's second call) runs the source rows on their path
    latent beside the target with the late value projections swapped; and the window counts denoising steps."""
    pipe = request.getfixturevalue(model)
    if solver == "midpoint":
        pipe = type(pipe)(**{**pipe.components,
                             "scheduler": FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)})
    steps, sd3 = 4, model == "toy_sd3"
    extra = ({"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0,
              "guidance_scale": 3.0} if sd3
             else {"true_cfg_scale": 2.0, "guidance_scale": 1.0, "negative_prompt": [NEGATIVE] * 2})
    path = invert(pipe, scene, SOURCE, steps)
    share = ValueSharing(weight="window(1, 0, 0.5)")  # denoising steps 0 and 1 of 4
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), share=share, path=path,
               output_type="latent", **extra)
    assert share.shared_steps == [0, 1]
    late = [s.name for s in share.sites]
    sig = [float(x) for x in run_sigmas(pipe, steps, 32, 32)]
    per = pipe.scheduler.order
    if sd3:
        main, main_alone = _encoded(pipe, [SOURCE, TARGET], True)[0], _encoded(pipe, [TARGET], True)[0]
        later, later_alone = _encoded(pipe, [SOURCE, TARGET], False)[0], _encoded(pipe, [TARGET], False)[0]
    else:
        main, main_alone = _encoded(pipe, [SOURCE, TARGET], False)[0], _encoded(pipe, [TARGET], False)[0]
        later, later_alone = _encoded(pipe, [NEGATIVE] * 2, False)[0], _encoded(pipe, [NEGATIVE], False)[0]
    t_scale = 1000.0 if sd3 else 1.0

    def target(z_src, z, sigma, shared, both, alone, copies, **more):
        """The target rows of one transformer call (``copies`` = 2: CFG's two halves)."""
        rows = [z_src, z] if shared else [z]
        hidden = torch.cat(rows * copies)
        pairs = [(1, 0), (3, 2)][:copies]
        ctx = _swapped_values(pipe.transformer, late, pairs) if shared else contextlib.nullcontext()
        with ctx:
            out = pipe.transformer(hidden_states=hidden, timestep=torch.full((len(hidden),), sigma * t_scale),
                                   return_dict=False, **(both if shared else alone), **more)[0]
        return out[len(rows) - 1::len(rows)]

    z = anchor = path[0]
    with torch.no_grad():
        for i in range(len(sig) - 1):
            shared, first = i // per < 2, i % per == 0
            if first:
                anchor = z
            if sd3:
                u, c = target(path[i], z, sig[i], shared, main, main_alone, 2)
                v = u + 3.0 * (c - u)
                if 0 < i < steps:  # diffusers' window: loop index i against num_inference_steps · start/stop
                    skip = target(path[i], z, sig[i], shared, later, later_alone, 1, skip_layers=[1])[0]
                    v = v + 2.8 * (c - skip)
            else:
                c = target(path[i], z, sig[i], shared, main, main_alone, 1)[0]
                u = target(path[i], z, sig[i], shared, later, later_alone, 1)[0]
                v = u + 2.0 * (c - u)
            z = anchor + (sig[i + 1] - sig[i - (0 if first else 1)]) * v[None]
    torch.testing.assert_close(res.edited.float()[None], z.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)
    guided = UnifyEdit()  # and with the gradient pass: the source still replays
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=guided, share=ValueSharing(), path=path,
               output_type="latent", **extra)
    assert guided.history
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)


def test_the_gradient_pass_reads_the_shared_values(toy_sd3, scene):
    """UnifyEdit's losses at a sharing step are those of the target run with the source's values: sharing at a
    site before the deepest loss site changes the first step's loss."""
    path = invert(toy_sd3, scene, SOURCE, 4)
    losses = []
    for share in (None, ValueSharing(weight=1.0, sites=["transformer_blocks.0.attn"])):
        guided = UnifyEdit(sites=["transformer_blocks.5.attn"])
        edit(toy_sd3, scene, SOURCE, TARGET, 4, control=guided, share=share, path=path, output_type="latent",
             guidance_scale=1.0)
        losses.append(guided.history[0].sa_loss)
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)


# ------------------------------------------------------------------------------------------ sites, settings, errors


def test_late_sites_are_flux_single_blocks_20_to_37_and_the_same_share_of_sd3():
    flux = ValueSharing().select_sites(list_sites(build_empty(transformer_config("flux.1-dev"))))
    assert [s.name for s in flux] == [f"single_transformer_blocks.{i}.attn" for i in range(20, 38)]
    sd35 = ValueSharing().select_sites(list_sites(build_empty(transformer_config("sd3.5-large"))))
    assert [s.name for s in sd35] == [f"transformer_blocks.{i}.attn" for i in range(26, 38)]
    medium = ValueSharing().select_sites(list_sites(build_empty(transformer_config("sd3.5-medium"))))
    assert {s.kind for s in medium} == {"sd3_joint"}  # the image-only attn2 sites have no text to pair


def test_settings_round_trip_through_json_and_bad_input_is_named(toy_sd3, scene):
    c = ValueSharing(weight="window(0.5, 0, 0.3)", sites=["transformer_blocks.5.attn"], tokens="image")
    back = control_from_json(c.to_json())
    assert isinstance(back, ValueSharing) and back.config == c.config
    for bad, match in [({"weight": 1.5}, "weight"), ({"tokens": "text"}, "tokens")]:
        with pytest.raises(ConfigError, match=match):
            ValueSharing(**bad)
    with pytest.raises(ConfigError, match="no edit"):
        attach(toy_sd3, [ValueSharing()])
    with pytest.raises(SiteError, match="no image-text attention|selector"), \
            attach(toy_sd3, [UnifyEdit(), ValueSharing(sites="kind:sd3_image")]):
        pass
    with pytest.raises(ConfigError, match="share takes value-sharing settings"):
        edit(toy_sd3, scene, SOURCE, TARGET, 2, share={"weight": 1.0})
    idle = ValueSharing(weight="window(1, 0.6, 0.7)")  # on between the progress 0, 0.5, 1 of a 3-step run
    assert idle.canonical(3) is None and idle.canonical(20) is idle and idle.canonical() is idle
    with pytest.warns(UserWarning, match="shares nothing in this edit"):
        edit(toy_sd3, scene, SOURCE, TARGET, 3, control=UnifyEdit(scale=0.0), share=idle, output_type="latent")
    assert idle.shared_steps == []


@pytest.mark.parametrize("name", ["toy-sd3", "toy-flux"])
def test_in_bf16_the_target_reads_the_source_values_in_bf16(name, scene):
    """The swap keeps the model's dtype: a bf16 edit with sharing runs in bf16, the source still replays its path, and
    sharing the values at every step moves the target by more than bf16's resolution, toward the source image."""
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline(name, dtype=torch.bfloat16)
    path = invert(pipe, scene, SOURCE, 4)
    kwargs = {"control": UnifyEdit(scale=0.0), "path": path, "output_type": "latent", "guidance_scale": 1.0}
    shared = edit(pipe, scene, SOURCE, TARGET, 4, share=ValueSharing(weight=1.0), **kwargs)
    plain = edit(pipe, scene, SOURCE, TARGET, 4, **kwargs)
    assert shared.edited.dtype == torch.bfloat16 and torch.isfinite(shared.edited.float()).all()
    assert torch.equal(shared.source, plain.source)  # the source rows' outputs are dropped: the path, exactly
    moved = (shared.edited.float() - plain.edited.float()).abs().mean()
    toward = (shared.edited.float() - path[-1][0].float()).abs().mean() - (plain.edited.float() - path[-1][0].float()
                                                                          ).abs().mean()
    assert float(moved) > 2.0 ** -7 and float(toward) < 0  # sharing all the way holds the target nearer the image


def test_weight_assigned_after_construction_is_the_one_used():
    c = ValueSharing(weight=0.0)
    c.config.weight = "window(1, 0, 0.5)"
    assert [c.weight_at(s, 4) for s in range(4)] == [1.0, 1.0, 0.0, 0.0]
    assert [id(s) for s in c.schedules()] == [id(c.config.weight)]  # no stale copy is given the metrics
