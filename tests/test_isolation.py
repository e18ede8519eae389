"""IsolationAttention: Otsu masks and relocation against plain loops, the attention against a materialised reference
(SD3 order, FLUX order with RoPE turned to the target positions), the pipelines, the off state, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnctl
from attnctl import IsolationAttention
from attnctl.controls.base import RunState
from attnctl.errors import ConfigError, LayoutError
from attnctl.layout import TokenLayout
from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
from attnctl.processors.attend import attend
from attnctl.processors.base import SiteCall
from attnctl.sites import Site
from attnctl.subject_masks import mask_box, otsu_masks, relocation

KW = dict(num_inference_steps=3, height=32, width=48, max_sequence_length=24)
SCENE = "a red circle and a blue square"
SETS = ["a red circle", "a blue square", SCENE]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ masks


def test_otsu_threshold_is_the_best_split_by_brute_force():
    g = torch.Generator().manual_seed(0)
    maps = torch.cat([torch.rand(5, 30, generator=g) * 0.3, 0.6 + torch.rand(5, 18, generator=g) * 0.4], 1)
    maps = maps[:, torch.randperm(48, generator=g)]
    got = otsu_masks(maps)
    for m, mask in zip(maps, got, strict=True):
        best, best_t = -1.0, None
        for t in sorted(set(m.tolist()))[:-1]:  # every split between distinct values, written plainly
            lo, hi = m[m <= t], m[m > t]
            var = len(lo) / len(m) * len(hi) / len(m) * (float(lo.mean()) - float(hi.mean())) ** 2
            if var > best + 1e-12:
                best, best_t = var, t
        assert torch.equal(mask, m > best_t)
        assert int(mask.sum()) == 18  # the bright class of the two
    assert not otsu_masks(torch.full((1, 9), 0.5)).any()  # a constant map splits nowhere
    assert otsu_masks(torch.rand(2, 3, 1)).shape == (2, 3, 1) and not otsu_masks(torch.rand(2, 1)).any()  # one token


def test_relocation_resizes_the_source_box_onto_the_target_box():
    h, w = 6, 8
    src = torch.zeros(h, w, dtype=torch.bool)
    src[1:3, 1:3] = True  # a 2 × 2 subject ...
    src[1, 1] = False
    dst = torch.zeros(h, w, dtype=torch.bool)
    dst[2:6, 4:8] = True  # ... shown 4 × 4 elsewhere
    index, valid = relocation(src, dst)
    assert mask_box(dst) == (2, 6, 4, 8)
    for y in range(h):
        for x in range(w):
            p = y * w + x
            if 2 <= y < 6 and 4 <= x < 8:
                sy, sx = 1 + (y - 2) // 2, 1 + (x - 4) // 2  # nearest: each source token covers 2 × 2
                assert int(index[p]) == sy * w + sx
                assert bool(valid[p]) == bool(src[sy, sx])
            else:
                assert not valid[p]
    assert relocation(torch.zeros(h, w, dtype=torch.bool), dst) is None


# ------------------------------------------------------------------------------------------------ the attention


def _rotary(S: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.rand(S, d // 2, generator=g) * 6).repeat_interleave(2, 1)
    return theta.cos(), theta.sin()


def _rotate(x, cos, sin):
    """RoPE by hand: channel pairs (x₀, x₁) → (x₀·c − x₁·s, x₁·c + x₀·s)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2)


def _reference(q, k, v, img, masks, keep, sets, iso, rep, grid, rotary):
    """Each target's image queries by hand: own keys with the isolation bias, then per subject the reference's
    relocated keys (turned to their canvas positions under RoPE) allowed where query and canvas token are in the
    masks; every other row its plain attention."""
    B, S, H, d = q.shape
    h, w = grid
    n_img = h * w
    out = torch.einsum("bhst,bthd->bshd", torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d), -1), v)
    for refs, t in sets:
        n = masks.shape[1]
        bias = torch.zeros(n_img, S)
        for r in range(n_img):
            for c in range(n_img):
                if any(masks[t, i, r] and any(masks[t, j, c] for j in range(n) if j != i) and not masks[t, i, c]
                       for i in range(n)):
                    bias[r, img.start + c] = math.log(1 - iso) if iso < 1 else -math.inf
        keys, vals, biases = [k[t]], [v[t]], [bias]
        for i, ref in enumerate(refs):
            moved = relocation(masks[ref, i].view(h, w), masks[t, i].view(h, w))
            canvas_k = torch.zeros(n_img, H, d)
            canvas_v = torch.zeros(n_img, H, d)
            b = torch.full((n_img, n_img), -math.inf)
            for p in range(n_img):
                src = int(moved[0][p])
                key = k[ref, img.start + src]
                if rotary is not None:
                    cos, sin = rotary
                    key = _rotate(_rotate(key, cos[img.start + src], -sin[img.start + src]),
                                  cos[img.start + p], sin[img.start + p])
                canvas_k[p], canvas_v[p] = key, v[ref, img.start + src]
                for r in range(n_img):
                    if moved[1][p] and masks[t, i, r] and keep[t, i, r]:
                        b[r, p] = math.log(rep)
            keys.append(canvas_k)
            vals.append(canvas_v)
            biases.append(b)
        K, V, Bs = torch.cat(keys), torch.cat(vals), torch.cat(biases, 1)
        s = torch.einsum("shd,thd->hst", q[t, img], K) / math.sqrt(d) + Bs[None]
        out[t, img] = torch.einsum("hst,thd->shd", torch.softmax(s, -1), V)
    return out


def _masks(B, n, grid):
    h, w = grid
    m = torch.zeros(B, n, h, w, dtype=torch.bool)
    m[0, 0, 0:2, 0:2] = True  # reference 0: subject 0, a 2 × 2 blob
    m[1, 1, 1:3, 2:5] = True  # reference 1: subject 1, 2 × 3
    m[2, 0, 0:3, 0:3] = True  # the target: subject 0 large on the left ...
    m[2, 1, 1:4, 3:5] = True  # ... subject 1 on the right, overlapping it in no token
    m[2, 1, 2, 2] = True  # one token in both masks
    return m.flatten(2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("iso,rep", [(1.0, 0.9), (0.6, 2.0)])
def test_attention_equals_a_materialised_reference(family, iso, rep):
    torch.manual_seed(0)
    grid, n_txt, H, d = (4, 5), 3, 2, 8
    n_img = grid[0] * grid[1]
    B, S = 3, n_img + n_txt
    image_first = family == "sd3"
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True, isolation=iso, reposition=rep)
    ctl._sets = [([0, 1], 2)]
    ctl._masks = _masks(B, 2, grid)
    ctl._keep = torch.rand(B, 2, n_img) > 0.3
    rotary = _rotary(S, d) if family == "flux" else None
    kind = "sd3_joint" if image_first else "flux_double"
    site = Site("transformer_blocks.0.attn", 0, kind, H, d)
    call = SiteCall(site, B, S, n_txt, image_first, q.device, q.dtype, rotary)
    state = RunState(step=1, num_steps=3, roles=["cond"] * B, layout=TokenLayout(family, n_txt, grid))
    got = attend(q, k, v, ctl._steer(call, k, v, state, grid), max_chunk_elems=60)  # several row chunks
    ref = _reference(q, k, v, call.image_slice(), ctl._masks, ctl._keep, ctl._sets, iso, rep, grid, rotary)
    assert torch.allclose(got, ref, atol=1e-5)
    plain = attend(q, k, v, [])
    assert torch.equal(got[:2], plain[:2])  # the references keep their attention
    assert torch.allclose(got[2, call.text_slice()], plain[2, call.text_slice()], atol=1e-6)  # and text queries


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_maps_are_the_plain_attention_over_the_text(family):
    """The subjects' maps are cross-attention maps, as ConsiStory and IR-Diffusion read them: each image query's
    plain softmax over the text keys alone. The control's bias and the reference keys at the same call, and how
    much of a query's attention goes to the image, leave them as they are."""
    torch.manual_seed(1)
    grid, n_txt, H, d = (4, 5), 3, 2, 8
    n_img = grid[0] * grid[1]
    B, S = 3, n_img + n_txt
    image_first = family == "sd3"
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    ctl._sets, ctl._masks, ctl._keep = [([0, 1], 2)], _masks(B, 2, grid), torch.rand(B, 2, n_img) > 0.3
    kind = "sd3_joint" if image_first else "flux_double"
    call = SiteCall(Site("transformer_blocks.0.attn", 0, kind, H, d), B, S, n_txt, image_first, q.device, q.dtype,
                    _rotary(S, d) if family == "flux" else None)
    state = RunState(step=1, num_steps=3, roles=["cond"] * B, layout=TokenLayout(family, n_txt, grid))
    text, img = call.text_slice(), call.image_slice()
    # subject 0 is text token 0, subject 1 tokens 1 and 2; the target probes both, each reference its own
    ctl._own = {0: (0,), 1: (1,), 2: (0, 1)}
    ctl._parts[(text.start, "cpu")] = [
        (state.index([text.start]), state.index([0]), torch.tensor([[1.0, 0.0]])),
        (state.index([text.start + 1, text.start + 2]), state.index([1]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])),
        (state.index([text.start + c for c in range(3)]), state.index([2]),
         torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))]
    attend(q, k, v, ctl._steer(call, k, v, state, grid) + ctl._probes(call, state, img), max_chunk_elems=60)
    p = torch.softmax(torch.einsum("brhd,bchd->brhc", q[:, img], k[:, text]) / math.sqrt(d), -1).sum(2)  # (B, N, T)
    expect = torch.stack([p[0, :, 0], torch.zeros(n_img)]), torch.stack([torch.zeros(n_img), p[1, :, 1:].sum(-1)]), \
        torch.stack([p[2, :, 0], p[2, :, 1:].sum(-1)])
    assert torch.allclose(ctl._sum, torch.stack(expect), atol=1e-5)


# ------------------------------------------------------------------------------------------------ pipelines


def test_sd3_isolation_and_reposition_run_and_zero_is_the_plain_run(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(SETS, generator=gen(), output_type="np", **KW).images
    off = IsolationAttention(subjects=["red circle", "blue square"], references=True, isolation=0.0, reposition=0.0)
    out = pipe(SETS, generator=gen(), output_type="np", controls=[off], **KW).images
    assert np.array_equal(out, plain) and off.coverage  # the masks are made, nothing is changed
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    with attnctl.attach(sd3_pipe, [ctl]):
        on = sd3_pipe(SETS, generator=gen(), output_type="np", **KW).images
    assert np.array_equal(on[:2], plain[:2])  # the references are plain runs
    assert abs(on[2] - plain[2]).max() > 1e-3 and ctl.calls > 0
    assert 0 < ctl.coverage[-1] < 1 and ctl.summary().startswith("isolation of 2 subjects at")
    assert "reposition from references" in ctl.summary()
    n_late = len(attnctl.list_sites(sd3_pipe.transformer)) - len(attnctl.list_sites(sd3_pipe.transformer)) // 2
    assert ctl.calls == n_late * (KW["num_inference_steps"] - 1)  # from the second step, at the late sites


def test_a_reposition_set_gives_the_same_images_wherever_it_stands_in_the_call(sd3_pipe):
    """The reference queries' dropout was one draw over all the call's rows, so a set's scene changed with the sets
    (and CFG rows) before it; with the same generators it is now the same image alone or second in a call."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    other = ["a large red circle", "a small blue square", "a blue square and a red circle"]

    def run(prompts, seeds):
        ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True)
        return pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in seeds], output_type="np",
                    controls=[ctl], **KW).images

    alone = run(SETS, [3, 4, 5])
    second = run(other + SETS, range(6))
    assert np.allclose(alone, second[3:], atol=1e-5)  # (batch rounding only; the old draw moved it by 0.9)
    with pytest.raises(ConfigError, match="reposition is set but references=False"):
        IsolationAttention(subjects=["red circle", "blue square"], reposition=0.5)
    assert IsolationAttention(subjects=["a", "b"], reposition=0).config.reposition(0, 3) == 0  # "none": fine


def test_flux_with_references_and_sd35_isolation_alone(flux_pipe, sd35_pipe):
    flux = AttnCtlFluxPipeline(**flux_pipe.components)
    flux.set_progress_bar_config(disable=True)
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True, sites="all")
    out = flux(SETS, generator=gen(), output_type="np", controls=[ctl], **KW).images
    assert np.isfinite(out).all() and ctl.calls > 0
    sd35 = AttnCtlSD3Pipeline(**sd35_pipe.components)
    sd35.set_progress_bar_config(disable=True)
    iso = IsolationAttention(subjects=["red circle", "blue square"], sites="all")
    plain = sd35(SCENE, generator=gen(), output_type="np", **KW).images
    out = sd35(SCENE, generator=gen(), output_type="np", controls=[iso], **KW).images
    assert np.isfinite(out).all() and iso.calls > 0 and abs(out - plain).max() > 1e-4


def _record_rows(iso: IsolationAttention) -> list[tuple[tuple[str, ...], str, list[int]]]:
    """(the call's roles, probe or steer, the batch rows acted on) of every call the control acts in."""
    seen: list[tuple[tuple[str, ...], str, list[int]]] = []
    probes, steer = iso._probes, iso._steer

    def _probes(call, state, img):
        out = probes(call, state, img)
        seen.extend((tuple(state.roles), "probe", c.where.batch.tolist()) for c in out)
        return out

    def _steer(call, k, v, state, *args):
        out = steer(call, k, v, state, *args)
        seen.extend((tuple(state.roles), "steer", c.where.batch.tolist()) for c in out)
        return out

    iso._probes, iso._steer = _probes, _steer
    return seen


def test_the_unconditional_call_stays_plain_and_skip_layer_passes_are_steered(flux_pipe, sd3_pipe):
    """FLUX's true CFG calls the transformer for the negative prompt on its own; SD3's skip-layer guidance makes a
    pass on the conditional rows alone. Isolation probes and steers only conditional rows: none of the negative
    call, and in the skip-layer pass the conditional row with that row's masks."""
    flux = AttnCtlFluxPipeline(**flux_pipe.components)
    flux.set_progress_bar_config(disable=True)
    iso = IsolationAttention(subjects=["red circle", "blue square"], sites="all")
    seen = _record_rows(iso)
    flux(SCENE, negative_prompt="a green triangle", true_cfg_scale=4.0, generator=gen(), output_type="np",
         controls=[iso], **KW)
    assert {(roles, what) for roles, what, _ in seen} == {(("cond",), "probe"), (("cond",), "steer")}
    alone = IsolationAttention(subjects=["red circle", "blue square"], sites="all")
    flux(SCENE, generator=gen(), output_type="np", controls=[alone], **KW)
    assert iso.calls == alone.calls  # as many steered calls as without the negative call

    sd3 = AttnCtlSD3Pipeline(**sd3_pipe.components)
    sd3.set_progress_bar_config(disable=True)
    iso = IsolationAttention(subjects=["red circle", "blue square"], sites="all")
    seen = _record_rows(iso)
    out = sd3(SCENE, guidance_scale=4.0, skip_guidance_layers=[1], skip_layer_guidance_stop=1.0,
              generator=gen(), output_type="np", controls=[iso], **KW).images
    assert np.isfinite(out).all()
    kinds = {(roles, what, tuple(rows)) for roles, what, rows in seen}
    assert kinds == {(("uncond", "cond"), "probe", (1,)), (("uncond", "cond"), "steer", (1,)),
                     (("cond",), "steer", (0,))}  # the skip-layer pass: its one row, steered as the cond row


def test_a_reposition_call_makes_one_image_per_prompt_said_before_any_model_runs(sd3_pipe, monkeypatch):
    """A reposition call's prompts are its sets (references, then the scene): epipolar views or several images per
    prompt cannot be laid out in them, and the attnctl pipeline says so before the transformer runs."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(type(pipe.transformer), "forward", lambda *a, **k: pytest.fail("the model ran"))
    iso = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    with pytest.raises(ConfigError, match="an epipolar control's views with reference prompts"):
        pipe(SETS, controls=[attnctl.EpipolarAttention(rig={"kind": "stereo"}), iso], **KW)
    with pytest.raises(ConfigError, match="num_images_per_prompt 2 with reference prompts.*one image per call"):
        pipe(SETS, controls=[iso], num_images_per_prompt=2, **KW)


def test_bf16_on_cpu():
    from attnctl.testing import tiny_sd3_pipeline

    pipe = AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3", dtype=torch.bfloat16).components)
    pipe.set_progress_bar_config(disable=True)
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    out = pipe(SETS, generator=gen(), output_type="latent", controls=[ctl], **KW).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and ctl.calls > 0


def test_with_softpag_the_references_copies_are_steered_too(sd3_pipe):
    """With references, each perturbed copy of a scene row takes its references' keys from their own copies: a
    vanishing SoftPAG perturbation leaves the reposition image as it is."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)

    def run(*extra):
        iso = IsolationAttention(subjects=["red circle", "blue square"], references=True)
        return pipe(SETS, controls=[iso, *extra], generator=torch.Generator().manual_seed(0), output_type="np",
                    **KW).images, iso

    alone, _ = run()
    guided, iso = run(attnctl.SoftPAG(heads=["L1H0"], u=1e-6, scale=3.0))
    assert iso.reposition_calls > 0 and abs(guided - alone).max() < 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_references_with_regulation_on_every_conditional_row(family, request, monkeypatch):
    """docs/isolation.md: with references, AttentionRegulation (missing='ignore') acts where its words are. Its key
    biases on every conditional row and the scene's reference keys meet in one explicit softmax, which refused the
    keys for not covering the reference rows; now each row reads its own keys only: the references come out as
    under regulation alone."""
    import importlib

    attend_mod = importlib.import_module("attnctl.processors.attend")
    cls = AttnCtlSD3Pipeline if family == "sd3" else AttnCtlFluxPipeline
    pipe = cls(**request.getfixturevalue(f"{family}_pipe").components)
    pipe.set_progress_bar_config(disable=True)
    sets = ["a large red circle", "a small blue square", SCENE]
    met = []  # explicit calls where a bias sits on a row the extra keys are not on
    real_explicit = attend_mod._explicit

    def explicit(q, k, v, out, lse, biases, extras, *args):
        on = {r for e in extras for r in e.where.batch.tolist()}
        met.extend(1 for c in biases if extras and not set(c.where.batch.tolist()) <= on)
        return real_explicit(q, k, v, out, lse, biases, extras, *args)

    monkeypatch.setattr(attend_mod, "_explicit", explicit)

    def run(*controls):
        return pipe(sets, generator=gen(), output_type="np", controls=list(controls), **KW).images

    def regulation():  # at every step and site, so that it meets isolation's steered calls
        return attnctl.AttentionRegulation(targets=["circle", "square"], missing="ignore", sites="all", steps=1.0,
                                           iterations=3)

    iso = IsolationAttention(subjects=["circle", "square"], references=True, sites="all")
    reg = regulation()
    both = run(iso, reg)
    assert met and iso.reposition_calls > 0 and {r.prompt for r in reg.records} == set(sets)
    alone = run(regulation())
    assert np.isfinite(both).all() and np.allclose(both[:2], alone[:2], atol=1e-4)
    assert abs(both[2] - alone[2]).max() > 1e-4  # the scene is steered by both


def test_bad_input_and_json_round_trip(sd3_pipe):
    with pytest.raises(ConfigError, match="subjects is empty"):
        IsolationAttention(subjects=[])
    with pytest.raises(ConfigError, match="no other subject"):
        IsolationAttention(subjects=["circle"])
    with pytest.raises(ConfigError, match="references=True"):
        IsolationAttention(subjects=["circle", "square"], reposition=0.5)
    with pytest.raises(ConfigError, match="dropout"):
        IsolationAttention(subjects=["circle", "square"], dropout=1.0)
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    refs = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    with pytest.raises(ConfigError, match="sets of 3"):
        pipe(["a red circle", SCENE], controls=[refs], **KW)
    with pytest.raises(LayoutError, match="'blue square' is not in the prompt 'a red circle'"):
        pipe(["a red circle", "a red circle", SCENE], controls=[refs], **KW)
    with pytest.raises(ConfigError, match="num_images_per_prompt 2 with reference prompts"):
        pipe(SETS, num_images_per_prompt=2, controls=[refs], **KW)  # [ref 1, ref 1, ref 2, ref 2, ...] is no set
    with pytest.raises(ConfigError, match="takes one image per prompt.*num_images_per_prompt > 1"), \
            attnctl.attach(sd3_pipe, [refs]):  # the same through attach, where the call's options are not seen
        sd3_pipe(SETS, num_images_per_prompt=2, **KW)
    with pytest.raises(LayoutError, match="'green triangle'"):
        pipe(SCENE, controls=[IsolationAttention(subjects=["red circle", "green triangle"])], **KW)
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True, reposition="linear(1, 0)",
                             dropout=0.25, sites="all")
    again = attnctl.control_from_json(ctl.to_json())
    assert isinstance(again, IsolationAttention) and again.to_json() == ctl.to_json()


def test_reference_prompts_out_of_order_are_named_so(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    refs = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    with pytest.raises(LayoutError, match=r"prompt 2 of the call \('a red circle'\) is read as reference 2 of its "
                                          r"set, the prompt of the subject 'blue square' alone.*in the order "
                                          r"\[reference_1 … reference_2, scene\]"):
        pipe([SCENE, "a red circle", "a blue square"], controls=[refs], **KW)  # the scene first
    with pytest.raises(LayoutError, match=r"prompt 3 of the call \('a red circle alone'\) is read as the scene"):
        pipe(["a red circle", "a blue square", "a red circle alone"], controls=[refs], **KW)


def test_subjects_that_share_tokens_are_refused(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle and a blue circle"
    with pytest.raises(ConfigError, match="'red circle' and 'circle' share the word\\(s\\) 'circle' of the prompt"):
        pipe(prompt, controls=[IsolationAttention(subjects=["red circle", "circle"])], **KW)
    ok = IsolationAttention(subjects=["red circle", "blue circle"])  # the same word, at two places: apart
    pipe(prompt, controls=[ok], output_type="latent", **KW)
    assert ok.calls > 0


def test_under_the_midpoint_scheduler_the_masks_are_made_once_per_denoising_step(sd3_pipe, monkeypatch):
    """Two model calls per denoising step: the first step (both calls) runs plain, the maps of a step's calls are
    summed and split once at its end, and the dropout is drawn once per step."""
    from attnctl.controls import isolation as module

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = attnctl.FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)
    ctl = IsolationAttention(subjects=["red circle", "blue square"], references=True)
    steered, splits, keeps = [], [], []
    real_steer, real_split, real_end = ctl._steer, module.otsu_masks, ctl.end_step
    ctl._steer = lambda call, k, v, state, *a: steered.append(state.step) or real_steer(call, k, v, state, *a)
    monkeypatch.setattr(module, "otsu_masks", lambda maps: splits.append(1) or real_split(maps))
    ctl.end_step = lambda state: (real_end(state), keeps.append(ctl._keep))
    pipe(SETS, controls=[ctl], output_type="latent", **KW)  # 3 denoising steps, 6 model calls
    assert min(steered) == 2 and ctl.calls > 0  # from the second denoising step's first call
    assert len(splits) == 3  # at the end of each denoising step, not of each call
    assert keeps[1] is keeps[2] and keeps[2] is not keeps[3]  # drawn at the end of a step, for both its calls


def test_late_sites_are_the_second_half_of_the_blocks_by_depth():
    """SD3.5's first blocks hold two sites each (attn, attn2): half the site list reached back to block 9 of 24."""
    from attnctl.configs import build_empty, transformer_config
    from attnctl.controls.isolation import late_sites
    from attnctl.sites import list_sites

    sd35 = list_sites(build_empty(transformer_config("sd3.5-medium")))
    assert sorted({s.block[1] for s in late_sites(sd35)}) == list(range(12, 24))
    assert {s.name for s in late_sites(sd35)} == {s.name for s in sd35 if s.block[1] >= 12}
    flux = list_sites(build_empty(transformer_config("flux.1-dev")))  # one site a block: the second half of the list
    assert late_sites(flux) == flux[len(flux) // 2:]
