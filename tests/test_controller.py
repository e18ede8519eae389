"""Controller: run tracking on stock pipelines, AttentionProbe against a materialised reference, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ip_adapter_processor
from diffusers.models.attention_processor import JointAttnProcessor2_0

import attnctl
from attnctl.controls.base import Control, ControlConfig
from attnctl.errors import ConfigError, LayoutError, ScheduleError, SiteError, UnsupportedModelError
from attnctl.sites import Site, select_sites

KW = dict(num_inference_steps=3, height=32, width=48, max_sequence_length=24, output_type="np")


class Recorder(Control):
    """Records what the controller tells controls at every call, and materialises reference maps."""

    kind = "test-recorder"
    Config = ControlConfig

    def __init__(self, word: str | None = None, families=("sd3", "flux")):
        super().__init__()
        self.word, self.calls, self.maps = word, [], None
        self.families = families

    def contribute(self, call, q, k, v, state):
        self.calls.append((call.site.name, state.step, state.num_steps, tuple(state.roles), state.layout.grid,
                           call.n_text, call.batch))
        if self.word is not None and call.n_text:
            cols = [call.text_slice().start + p for p in state.layout.word_tokens(self.word)]
            s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
            p = torch.softmax(s, -1)[:, :, call.image_slice()][..., cols]  # full map, then the slice
            rows = [i for i, r in enumerate(state.roles) if r == "cond"]
            m = p[rows].sum(1)  # sum over heads -> (rows, N_img, tokens)
            self.maps = m if self.maps is None else self.maps + m
        return []


@pytest.mark.parametrize("fixture", ["sd3_pipe", "sd35_pipe", "flux_pipe"])
def test_probe_equals_materialised_reference(request, fixture):
    pipe = request.getfixturevalue(fixture)
    probe = attnctl.AttentionProbe(words=["circle", "red"])
    rec = Recorder("circle")
    guidance = {"guidance_scale": 4.0} if fixture != "flux_pipe" else {}
    with attnctl.attach(pipe, [probe, rec]):
        pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **guidance, **KW)
    maps = probe.word_maps()
    assert set(maps) == {"circle", "red"}
    assert maps["circle"].shape == (1, 8, 12)  # one cond row; 32×48 image -> 8×12 tokens (non-square)
    ref = rec.maps.sum(-1)  # sum over the word's tokens (CLIP and T5 positions)
    ref = ref / probe._mass  # the probe averages over heads × sites × steps
    assert torch.allclose(maps["circle"].reshape(1, -1), ref, atol=1e-6)
    heat = probe.heatmap("circle", (32, 48))
    assert heat.shape == (32, 48) and float(heat.max()) == pytest.approx(1.0)


def test_run_tracking_on_stock_sd3_with_cfg(sd3_pipe):
    rec = Recorder()
    with attnctl.attach(sd3_pipe, [rec]):
        sd3_pipe("a red circle", guidance_scale=3.0, **KW)
    steps = sorted({c[1] for c in rec.calls})
    assert steps == [0, 1, 2] and {c[2] for c in rec.calls} == {3}
    assert {c[3] for c in rec.calls} == {("uncond", "cond")}
    assert {c[4] for c in rec.calls} == {(8, 12)}
    # a second call starts a new run at step 0
    rec.calls.clear()
    with attnctl.attach(sd3_pipe, [rec]):
        sd3_pipe("a red circle", guidance_scale=1.0, **KW)
    assert {c[3] for c in rec.calls} == {("cond",)}


def test_flux_single_blocks_get_text_length_and_true_cfg_roles(flux_pipe):
    rec = Recorder()
    with attnctl.attach(flux_pipe, [rec]):
        flux_pipe("a red circle", negative_prompt="a blue square", true_cfg_scale=2.0, **KW)
    single = [c for c in rec.calls if c[0].startswith("single_")]
    assert single and {c[5] for c in single} == {24}
    roles = {c[3] for c in rec.calls}
    assert roles == {("cond",), ("uncond",)}
    assert sorted({c[1] for c in rec.calls}) == [0, 1, 2]


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_every_call_reads_its_own_prompt_and_rows(request, fixture):
    """A call starts at the pipeline's check_inputs. So after a call that raised between encode_prompt and its first
    forward, or after an encode_prompt of the caller's own inside the block, the next call still reads its own prompt
    and its conditional rows (before, FLUX took the next prompt for a negative one and SD3 kept the failed call's)."""
    pipe = request.getfixturevalue(fixture)
    prompt = "a red circle and a blue square"
    cfg = ({"guidance_scale": 4.0} if fixture == "sd3_pipe" else
           {"negative_prompt": "a green triangle", "true_cfg_scale": 2.0})

    def controls():
        return [attnctl.AttentionProbe(words=["square"]), attnctl.SoftPAG(heads=["L1H0:2"], scale=2.0)]

    clean = controls()
    with attnctl.attach(pipe, clean):
        expected = pipe(prompt, generator=torch.Generator().manual_seed(0), **cfg, **KW).images

    after_failure = controls()
    with attnctl.attach(pipe, after_failure):
        with pytest.raises(ValueError, match="generators"):  # raised in prepare_latents, after encode_prompt
            pipe("a green triangle", generator=[torch.Generator()] * 3, **cfg, **KW)
        images = pipe(prompt, generator=torch.Generator().manual_seed(0), **cfg, **KW).images
    assert torch.equal(after_failure[0].word_maps()["square"], clean[0].word_maps()["square"])
    assert (images == expected).all()

    if fixture == "sd3_pipe":
        def encode():
            return pipe.encode_prompt(prompt, prompt, prompt, max_sequence_length=24)

        pe, npe, pooled, npooled = encode()
        call = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled, **cfg)
    else:
        def encode():
            return pipe.encode_prompt(prompt, prompt, max_sequence_length=24)

        pe, pooled, _ = encode()
        npe, npooled, _ = pipe.encode_prompt(cfg["negative_prompt"], cfg["negative_prompt"], max_sequence_length=24)
        call = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=npe,
                    negative_pooled_prompt_embeds=npooled, true_cfg_scale=cfg["true_cfg_scale"])
    own_embeds = [attnctl.AttentionProbe(tokens=[5]), attnctl.SoftPAG(heads=["L1H0:2"], scale=2.0)]  # no words:
    with attnctl.attach(pipe, own_embeds):  # a run given only embeddings has no prompt to find them in
        encode()  # the caller's own encode_prompt, inside the block
        images = pipe(generator=torch.Generator().manual_seed(0), **call, **KW).images
    assert (images == expected).all()
    assert own_embeds[0].word_maps()["5"].shape == (1, 8, 12)


def test_restore_undoes_set_attn_processor(sd3_pipe):
    """Way 3 of the README: ``set_attn_processor(ctl.processors())``; ``ctl.restore()`` brings back the stock
    processors and removes every hook and wrapper, so the next plain call is the stock one."""
    tr = sd3_pipe.transformer
    before = dict(tr.attn_processors)
    stock = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    ctl = attnctl.Controller(sd3_pipe, [attnctl.IsolationAttention(subjects=["circle", "square"])])
    tr.set_attn_processor(ctl.processors())
    controlled = sd3_pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **KW).images
    assert "check_inputs" in vars(sd3_pipe) and "encode_prompt" in vars(sd3_pipe) and tr._forward_pre_hooks
    ctl.restore()
    assert tr.attn_processors == before
    assert "check_inputs" not in vars(sd3_pipe) and "encode_prompt" not in vars(sd3_pipe)
    assert not tr._forward_pre_hooks and "forward" not in vars(tr)
    assert (sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images == stock).all()
    assert controlled.shape == stock.shape


def test_a_probe_weight_assigned_after_construction_counts(sd3_pipe):
    """probe.config.weight = ... after construction is the weight the run uses (and the one to_json records), as
    for every control's settings: the maps equal those of a probe built with that weight."""
    def maps(probe):
        with attnctl.attach(sd3_pipe, [probe]):
            sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
        return probe.word_maps()["circle"]

    built = maps(attnctl.AttentionProbe(words=["circle"], weight="window(1, 0.9, 1)"))
    assigned = attnctl.AttentionProbe(words=["circle"])
    plain = maps(assigned)
    assigned.config.weight = "window(1, 0.9, 1)"
    again = maps(assigned)
    assert (built - plain).abs().max() > 1e-4  # the weight matters here
    assert (again - built).abs().max() <= 1e-7
    assert (maps(attnctl.control_from_json(assigned.to_json())) - again).abs().max() <= 1e-7


def test_a_second_controller_on_one_pipeline_is_refused_naming_the_way_out(sd3_pipe):
    """Two controllers would each take the run's prompt, rows and forward: nested attach, an attnctl pipeline's
    controls= inside attach, and a controller left installed are refused; the first keeps working."""
    from attnctl.pipelines import AttnCtlSD3Pipeline

    probe = attnctl.AttentionProbe(words=["circle"])
    pag = attnctl.SoftPAG(heads=["L1H0:2"])
    ours = AttnCtlSD3Pipeline(**sd3_pipe.components)
    ours.set_progress_bar_config(disable=True)
    before = dict(sd3_pipe.transformer.attn_processors)
    with attnctl.attach(sd3_pipe, [probe]):
        with pytest.raises(ConfigError, match=r"already attached.*attached: AttentionProbe.*in one list"), \
                attnctl.attach(sd3_pipe, [pag]):
            pass
        with pytest.raises(ConfigError, match="already attached"):
            ours("a red circle", controls=[pag], **KW)  # the same transformer
        sd3_pipe("a red circle", **KW)  # the first controller is untouched
    assert probe.word_maps()["circle"].shape == (1, 8, 12)
    assert sd3_pipe.transformer.attn_processors == before
    left = attnctl.Controller(sd3_pipe, [probe])
    sd3_pipe.transformer.set_attn_processor(left.processors())
    with pytest.raises(ConfigError, match="ctl.restore"):
        attnctl.attach(sd3_pipe, [pag]).install()
    left.restore()
    with attnctl.attach(sd3_pipe, [pag]):  # once it is gone, another may come
        sd3_pipe("a red circle", **KW)
    assert sd3_pipe.transformer.attn_processors == before


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_controls_run_under_inference_mode_as_under_no_grad(request, fixture):
    """torch.inference_mode() makes tensors without a version counter (FLUX's position ids among them): the controls
    run under it and give the images they give under no_grad; latent guidance, which needs gradients, says so."""
    pipe = request.getfixturevalue(fixture)

    def controls():
        return [attnctl.SoftPAG(heads=["L1H0:2"]), attnctl.AttentionProbe(words=["circle"]),
                attnctl.AttentionRegulation(targets=["circle"], iterations=2),
                attnctl.IsolationAttention(subjects=["circle", "square"])]

    images = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), attnctl.attach(pipe, controls()):
            images.append(pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0),
                               **KW).images)
    assert (images[0] == images[1]).all()
    with pytest.raises(ConfigError, match="under torch.inference_mode"), torch.inference_mode(), \
            attnctl.attach(pipe, [attnctl.LayoutGuidance(boxes={"circle": [0, 0, 0.5, 0.5]})]):
        pipe("a red circle and a blue square", **KW)


def test_flux_single_block_without_text_length_is_an_error(flux_pipe):
    from conftest import transformer_inputs

    tr = flux_pipe.transformer
    ctl = attnctl.Controller(tr, [attnctl.AttentionProbe(tokens=[0, 1], sites="kind:flux_single")])
    saved = dict(tr.attn_processors)
    tr.set_attn_processor(ctl.processors())
    ctl.close()  # no tracking: the run's layout is unknown
    try:
        with pytest.raises(LayoutError, match="FLUX single block"):
            tr(**transformer_inputs(tr))
    finally:
        tr.set_attn_processor(saved)


def sharing_components(cls, pipe, **kwargs):
    """A pipeline of class ``cls`` on ``pipe``'s modules (those ``cls`` takes), e.g. the img2img form of a pipeline."""
    import inspect

    takes = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in pipe.components.items() if k in takes}, **kwargs)


def test_flux_kontext_reference_tokens_are_kept_apart_from_the_generated_grid(flux_pipe, monkeypatch):
    """FLUX Kontext appends its input image's tokens to the generated grid: the layout counts them apart; SoftPAG,
    the probe (equal to the materialised maps of the generated queries), regulation, layout guidance (moving the
    generated tokens only) and isolation (the input image's keys open to every subject) run; epipolar attention
    says why it cannot, naming the way out."""
    from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline
    from PIL import Image

    from attnctl.controls.layout_guidance import LayoutGuidance

    pipe = sharing_components(FluxKontextPipeline, flux_pipe)
    kw = dict(image=Image.new("RGB", (16, 24), "red"), prompt="a red circle", num_inference_steps=2, height=32,
              width=48, max_area=32 * 48, max_sequence_length=16, output_type="np", _auto_resize=False)
    stock = dict(pipe.transformer.attn_processors)
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    probe, rec = attnctl.AttentionProbe(words=["circle"]), Recorder("circle")
    with attnctl.attach(pipe, [attnctl.SoftPAG(heads="all", scale=2.0), probe, rec]) as ctl:
        guided = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        layout = ctl.state.layout
    assert (layout.grid, layout.reference_tokens) == ((8, 12), 4 * 6)  # 32×48 generated, 16×24 reference (÷4)
    assert plain.shape == guided.shape and not torch.allclose(torch.from_numpy(plain), torch.from_numpy(guided))
    assert rec.maps.shape[1] == 8 * 12 + 4 * 6  # the recorder's maps: every image-stream query
    ref = rec.maps[:, : 8 * 12].sum(-1) / probe._mass  # the generated image's queries, softmax over every key
    assert probe.word_maps()["circle"].shape == (1, 8, 12)
    assert torch.allclose(probe.word_maps()["circle"].reshape(1, -1), ref, atol=1e-6)

    reg = attnctl.AttentionRegulation(targets=["circle"], sites="all")
    with attnctl.attach(pipe, [reg]):
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    assert reg.records and all(r.applied_map_loss < r.plain_map_loss for r in reg.records)

    # layout guidance moves the generated image's latent only: the input image's tokens stay the edit's condition
    seen = []
    hook = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        pipe(**kw, generator=torch.Generator().manual_seed(0))
        plain_inputs, seen[:] = list(seen), []
        boxes = LayoutGuidance(boxes={"circle": [0.1, 0.1, 0.5, 0.5]}, scale=0.5)
        with attnctl.attach(pipe, [boxes]):
            pipe(**kw, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert boxes.history and len(seen) > len(plain_inputs)  # gradient passes ran
    n = 8 * 12
    assert all(torch.equal(x[:, n:], plain_inputs[0][:, n:]) for x in seen)  # the reference tokens never move
    assert not torch.equal(seen[-1][:, :n], plain_inputs[-1][:, :n])  # the generated ones do

    # isolation bars the other subjects' generated keys; the input image's keys stay open to every subject
    import attnctl.controls.isolation as isolation_module

    biases, dense = [], isolation_module.DenseBias
    monkeypatch.setattr(isolation_module, "DenseBias", lambda fn, where: biases.append(fn) or dense(fn, where))
    isolation = attnctl.IsolationAttention(subjects=["red", "circle"], sites="all", isolation=1.0)
    with attnctl.attach(pipe, [isolation]):
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    assert isolation.calls > 0 and len(biases) == isolation.calls
    n_text = 16
    full = [fn(0, n_text + n + 24) for fn in biases]  # (targets, queries, 1, keys): [text, generated, reference]
    assert all(float(b[..., n_text + n:].abs().max()) == 0 for b in full)
    assert any(bool(torch.isinf(b[..., n_text:n_text + n]).any()) for b in full)

    epipolar = attnctl.EpipolarAttention(rig=attnctl.OrbitRig(views=2))
    with pytest.raises(LayoutError) as caught, attnctl.attach(pipe, [epipolar]):
        pipe(**{**kw, "num_images_per_prompt": 2}, generator=torch.Generator().manual_seed(0))
    text = str(caught.value)
    assert "the 8×12 generated grid and 24 tokens of a reference image (FLUX Kontext's input image)" in text, text
    assert "Fix: use it with FluxPipeline or FluxImg2ImgPipeline" in text, text
    assert dict(pipe.transformer.attn_processors) == stock  # restored after the error

    # the way out the error names: img2img keeps the text-to-image token layout
    img2img = sharing_components(FluxImg2ImgPipeline, flux_pipe)
    reg = attnctl.AttentionRegulation(targets=["circle"], sites="all")
    with attnctl.attach(img2img, [attnctl.AttentionProbe(words=["circle"]), reg]) as ctl:
        img2img(image=kw["image"], prompt="a red circle", num_inference_steps=4, strength=0.75, height=32, width=48,
                max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0))
        assert (ctl.state.layout.grid, ctl.state.layout.reference_tokens) == ((8, 12), 0)
    assert reg.records and all(r.applied_map_loss < r.plain_map_loss for r in reg.records)


def test_diffusers_pag_pipeline_is_refused_while_its_pag_runs(sd3_pipe):
    """StableDiffusion3PAGPipeline swaps its own processors onto its PAG layers during a call with pag_scale > 0 (and
    adds a perturbed row): a clear error that names SoftPAG, not controls that silently stop acting there."""
    from diffusers import StableDiffusion3PAGPipeline

    pipe = sharing_components(StableDiffusion3PAGPipeline, sd3_pipe, pag_applied_layers=["blocks.1"])
    stock = dict(pipe.transformer.attn_processors)
    probe = attnctl.AttentionProbe(words=["circle"], sites="all")
    with pytest.raises(UnsupportedModelError, match=r"running diffusers' PAG \(pag_scale > 0\).*attnctl.SoftPAG\("), \
            attnctl.attach(pipe, [probe]):
        pipe("a red circle", pag_scale=3.0, **KW)
    assert dict(pipe.transformer.attn_processors) == stock  # the PAG processors left by the interrupted call too
    with attnctl.attach(pipe, [probe]) as ctl:  # pag_scale=0: a plain CFG call, which attnctl follows
        pipe("a red circle", pag_scale=0.0, **KW)
        assert ctl.state.roles == ["uncond", "cond"]
        grid = ctl.state.layout.grid
    assert probe.maps().shape[0] == 1 and probe.maps().shape[-2:] == grid  # the conditional row, on the grid


def test_a_modular_pipeline_is_refused_before_anything_is_installed(flux_pipe):
    from diffusers.modular_pipelines import FluxAutoBlocks

    pipe = FluxAutoBlocks().init_pipeline()
    pipe.update_components(**flux_pipe.components)
    stock = dict(flux_pipe.transformer.attn_processors)
    with pytest.raises(UnsupportedModelError, match="modular pipelines.*Fix: load the classic pipeline"):
        attnctl.attach(pipe, [attnctl.SoftPAG(heads="all")])
    assert dict(flux_pipe.transformer.attn_processors) == stock


class HostReads:
    """Counts reads of tensor values into Python (``.item()``, ``float(t)``, ``int(t)``): on a GPU each one waits
    for the device to finish its queued work."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_controls_read_no_tensor_value_per_step(request, fixture, monkeypatch):
    """The controller and the controls keep what they read from the device per run, not per step: the reads a
    controlled run adds to the stock pipeline's own do not grow with the steps (FLUX: its image positions, once).
    The attention core takes a few shortcuts that read values only where they sit on the host (CPU); they are
    turned off here, so the count is a GPU run's."""
    import importlib

    monkeypatch.setattr(importlib.import_module("attnctl.processors.attend"), "_on_host", lambda t: False)
    pipe = request.getfixturevalue(fixture)
    controls = lambda: [attnctl.AttentionProbe(words=["circle"]), attnctl.SoftPAG(heads="all", scale=2.0),  # noqa: E731
                        attnctl.AttentionRegulation(targets=["circle", "square"], sites="all", iterations=2),
                        attnctl.IsolationAttention(subjects=["red circle", "blue square"], sites="all")]
    added = {}
    for steps in (2, 4):
        kw = {**KW, "num_inference_steps": steps}
        with HostReads() as stock:
            pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **kw)
        made = controls()
        with attnctl.attach(pipe, made) as ctl, HostReads() as controlled:
            pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **kw)
            assert ctl.state.step == steps - 1
        added[steps] = controlled.n - stock.n
        iso = made[-1]  # every control acted (isolation from the second step on)
        assert made[2].records and iso.calls > 0 and len(iso.coverage) == steps  # the last step's: when asked
        assert all(isinstance(c, float) and 0 < c < 1 for c in iso.coverage)  # read after the run
    assert added[2] == added[4] <= (3 if fixture == "flux_pipe" else 0), added
    with attnctl.attach(pipe, controls()) as ctl:  # a new size with as many tokens: the positions are read anew
        pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **KW)
        assert ctl.state.layout.grid == (8, 12)
        pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0),
             **{**KW, "height": 48, "width": 32})
        assert ctl.state.layout.grid == (12, 8)
        assert ctl.state.timestep is not None and isinstance(ctl.state.timestep, float)
        assert isinstance(ctl.state.sigma, float)


def _fake_sites(n_blocks=12):
    return [Site(f"transformer_blocks.{i}.attn", i, "sd3_joint", 4, 8) for i in range(n_blocks)]


def test_selectors_are_anchored():
    sites = _fake_sites()
    assert [s.name for s in select_sites(sites, "transformer_blocks.1")] == ["transformer_blocks.1.attn"]
    assert len(select_sites(sites, "transformer_blocks.2:5")) == 3
    assert len(select_sites(sites, "transformer_blocks.10:")) == 2
    assert [s.index for s in select_sites(sites, "L3:5")] == [3, 4]
    assert len(select_sites(sites, r"re:transformer_blocks\.1\d?\.attn")) == 3  # 1, 10, 11
    with pytest.raises(SiteError, match="matches no attention site"):
        select_sites(sites, "re:blocks\\.1.*")
    with pytest.raises(SiteError, match="matches no attention site"):
        select_sites(sites, "transformer_blocks.12")
    with pytest.raises(SiteError, match="out of range"):
        select_sites(sites, "L12")
    assert len(select_sites(sites, "L3:12")) == 9  # to the end exactly
    for sel, fix in [("L3:40", "write '3:' for every index from 3"), ("L20:40", "give indices from 0 to 11"),
                     ("transformer_blocks.2:40", "write '2:'")]:  # a range past the end is not cut short
        with pytest.raises(SiteError, match=f"reaches past the last index, 11. Fix: {fix}"):
            select_sites(sites, sel)
    with pytest.raises(SiteError, match="range '0:9' reaches past the last index, 3"):
        attnctl.HeadSet.parse(sites, "L3H0:9")


def test_head_sets_parse_resolve_and_refuse_other_models(tmp_path):
    sites = _fake_sites()
    hs = attnctl.HeadSet.parse(sites, ["L3H1", "L3H2:4", "transformer_blocks.5.attn/H0,2"])
    assert hs.heads == {"transformer_blocks.3.attn": (1, 2, 3), "transformer_blocks.5.attn": (0, 2)}
    hs.save(tmp_path / "p.json")
    assert attnctl.HeadSet.load(tmp_path / "p.json").heads == hs.heads
    with pytest.raises(SiteError, match="valid indices are 0..3"):
        attnctl.HeadSet.parse(sites, "L3H4")
    with pytest.raises(SiteError, match="made for a sd3 model with 12 attention sites of 4 heads, and this one has 4"):
        hs.resolve(_fake_sites(4))
    with pytest.raises(SiteError, match="with 12 attention sites .* this one has 24 sites"):  # a toy's set on a big
        hs.resolve(_fake_sites(24))  # model of the same family: it named sites that exist, and was taken
    with pytest.raises(SiteError, match="does not have"):  # a set without a record of its model
        attnctl.HeadSet(hs.heads, None).resolve(_fake_sites(4))


def test_bad_input_errors(flux_pipe, sd3_pipe):
    with pytest.raises(UnsupportedModelError, match="supports sd3"):
        attnctl.Controller(flux_pipe, [Recorder(families=("sd3",))])
    with pytest.raises(SiteError, match="matches no attention site"):
        attnctl.Controller(sd3_pipe, [attnctl.AttentionProbe(sites="transformer_blocks.9")])
    with pytest.raises(ScheduleError):
        attnctl.AttentionProbe(weight=float("nan"))
    with pytest.raises(ConfigError, match="empty"):
        attnctl.AttentionProbe(words=[])
    with pytest.raises(ConfigError, match="not an attnctl control"):
        attnctl.Controller(sd3_pipe, ["probe"])
    probe = attnctl.AttentionProbe(words=["triangle"])
    with pytest.raises(LayoutError, match="'triangle' is not in the prompt"), attnctl.attach(sd3_pipe, [probe]):
        sd3_pipe("a red circle", **KW)


def test_settings_that_would_do_nothing_are_refused(flux_pipe, sd3_pipe):
    """A misspelt role matches no row, an empty site or head list selects nothing, words and tokens together leave
    one ignored, a segment the model lacks finds no word: each is an error naming the way out, not a silent no-op."""
    for make in (lambda: attnctl.AttentionProbe(words=["circle"], roles=["conditional"]),
                 lambda: attnctl.AttentionRegulation(targets=["circle"], roles=["conditional"])):
        with pytest.raises(ConfigError, match=r"unknown batch roles \['conditional'\].*uncond, cond, perturbed"):
            make()
    assert attnctl.AttentionProbe(roles=["perturbed[0]", "reference[1]"]).config.roles == ["perturbed[0]",
                                                                                           "reference[1]"]
    with pytest.raises(ConfigError, match="heads is an empty list"):
        attnctl.AttentionProbe(heads=[])
    with pytest.raises(ConfigError, match="heads: repeats 0, 2; list each once"):
        attnctl.AttentionProbe(heads=[2, 0, 2, 0])
    with pytest.raises(ConfigError, match="words or tokens, not both"):
        attnctl.AttentionProbe(words=["circle"], tokens=[7])
    with pytest.raises(ConfigError, match="'clip' or 't5'"):
        attnctl.AttentionRegulation(targets=["circle"], segments=["foo"])
    for control in (attnctl.AttentionProbe(sites=[]),
                    attnctl.IsolationAttention(subjects=["circle", "square"], sites=[])):
        with pytest.raises(SiteError, match="empty list, which selects no site"):
            attnctl.Controller(sd3_pipe, [control])
    for control in (attnctl.AttentionProbe(words=["circle"], segments=["clip"]),
                    attnctl.AttentionRegulation(targets=["circle"], segments=["clip"])):
        with pytest.raises(LayoutError, match=r"segments \['clip'\] are not text segments of this flux model.*t5"), \
                attnctl.attach(flux_pipe, [control]):
            flux_pipe("a red circle", **KW)


def test_word_lookup_errors_say_what_the_text_tokens_read(flux_pipe, sd3_pipe):
    """FLUX's text tokens read prompt_2 when it is given: a word only in prompt is not "cut off"; the probe maps a
    phrase as the other controls take one; isolation's error offers no option it does not have."""
    probe = attnctl.AttentionProbe(words=["circle"])
    with pytest.raises(LayoutError, match=r"not in the prompt 'a red circle' as the text tokens read it "
                                          r"\(the t5 tokens read 'a blue square'\)") as e, \
            attnctl.attach(flux_pipe, [probe]):
        flux_pipe("a red circle", prompt_2="a blue square", **KW)
    assert "cut off" not in str(e.value)
    phrase, words = attnctl.AttentionProbe(words=["red circle"]), attnctl.AttentionProbe(words=["red", "circle"])
    with attnctl.attach(sd3_pipe, [phrase, words]):
        sd3_pipe("a red circle", **KW)
    maps = words.word_maps()
    assert torch.allclose(phrase.word_maps()["red circle"], maps["red"] + maps["circle"], atol=1e-6)
    iso = attnctl.IsolationAttention(subjects=["circle", "square"])
    with pytest.raises(LayoutError, match="'square' is not in the prompt") as e, attnctl.attach(sd3_pipe, [iso]):
        sd3_pipe("a red circle", **KW)
    assert "missing=" not in str(e.value)


def _t5(ctl, word: str = "circle") -> list[int]:
    """Positions of ``word`` in the T5 segment of the run's layout, relative to that segment."""
    seg = next(s for s in ctl.state.layout.segments if s.name == "t5")
    return [p - seg.start for p in ctl.state.layout.word_tokens(word, ("t5",))]


def test_words_are_found_in_the_texts_each_encoder_read(flux_pipe, sd3_pipe):
    """FLUX's T5 reads prompt_2 and SD3's prompt_3; SD3's CLIP-G reads prompt_2 at CLIP-L's positions. A second call
    with the same prompt and another T5 text reads the new text; a list of equal prompts with different T5 texts
    gives each row its own positions (the tiny tokenizers put one word on one token, after a start token)."""
    for pipe, t5 in ((flux_pipe, "prompt_2"), (sd3_pipe, "prompt_3")):
        probe = attnctl.AttentionProbe(words=["circle"], segments=["t5"])
        with attnctl.attach(pipe, [probe]) as ctl:
            pipe("a red circle", **{t5: "a red circle"}, **KW)
            assert _t5(ctl) == [3]
            pipe("a red circle", **{t5: "a blue square and a red circle"}, **KW)
            assert _t5(ctl) == [7]  # not the first call's 3
            pipe(["a red circle"] * 2, **{t5: ["a red circle", "a blue square and a red circle"]}, **KW)
            rows = ctl.state.row_layouts
            assert rows is not None and [lay.word_tokens("circle", ("t5",))[0] - lay.text_len + lay.segments[-1].length
                                         for lay in rows if lay is not None] == [3, 7]
    probe = attnctl.AttentionProbe(words=["square"], segments=["clip"])
    with attnctl.attach(sd3_pipe, [probe]) as ctl:
        sd3_pipe("a red circle", prompt_2="a blue square", **KW)
        assert ctl.state.layout.word_tokens("square", ("clip",)) == [3]  # CLIP-G's features at position 3
        assert ctl.state.layout.word_tokens("circle", ("clip",)) == [3]  # and CLIP-L's


def test_a_phrase_is_where_it_stands_in_the_prompt(sd3_pipe):
    """'red circle' in "a red circle and a blue circle" is "red" and the first circle, not the second; a phrase
    whose words are apart is refused; punctuation and full-width letters read as the tokenizers read them."""
    probe = attnctl.AttentionProbe(words=["red circle", "blue circle"], segments=["t5"])
    with attnctl.attach(sd3_pipe, [probe]) as ctl:
        sd3_pipe("a red circle and a blue circle", **KW)
    lay, start = ctl.state.layout, ctl.state.layout.segments[-1].start
    assert [p - start for p in lay.phrase_tokens("red circle", ("t5",))] == [2, 3]
    assert [p - start for p in lay.phrase_tokens("blue circle", ("t5",))] == [6, 7]
    assert [p - start for p in lay.phrase_tokens("circle,", ("t5",))] == [3, 7]
    assert lay.phrase_tokens("ＲＥＤ", ("t5",)) == lay.word_tokens("red", ("t5",))
    with pytest.raises(LayoutError, match="'red blue' is not in the prompt as written"):
        lay.phrase_tokens("red blue")
    with pytest.raises(LayoutError, match="'circle red' share tokens|'red circle' and 'circle' share tokens"), \
            attnctl.attach(sd3_pipe, [attnctl.AttentionRegulation(targets=["red circle", "circle"])]):
        sd3_pipe("a red circle and a blue circle", **KW)


def test_word_controls_refuse_the_negative_prompt_rows(sd3_pipe):
    """The unconditional rows hold the negative prompt's tokens: words found in the prompt would land on other
    words there, so a word control asked to act on them is refused (as with several prompts)."""
    for control in (attnctl.AttentionProbe(words=["circle"], roles=["uncond"]),
                    attnctl.AttentionRegulation(targets=["circle"], roles=["uncond", "cond"])):
        with pytest.raises(LayoutError, match=r"batch row 0 \(uncond\) of this call holds the negative prompt's"), \
                attnctl.attach(sd3_pipe, [control]):
            sd3_pipe("a red circle", negative_prompt="a blue square and a red circle", guidance_scale=4.0, **KW)
    probe = attnctl.AttentionProbe(roles=["uncond"], tokens=[1, 2])  # token positions, not words: the user's call
    with attnctl.attach(sd3_pipe, [probe]):
        sd3_pipe("a red circle", negative_prompt="a blue square", guidance_scale=4.0, **KW)
    assert probe.calls > 0


def test_word_lists_are_checked_and_missing_ignore_still_reports_a_cut_off_word(sd3_pipe):
    for make, field in ((lambda w: attnctl.AttentionProbe(words=w), "words"),
                        (lambda w: attnctl.AttentionRegulation(targets=w), "targets"),
                        (lambda w: attnctl.IsolationAttention(subjects=w), "subjects")):
        with pytest.raises(ConfigError, match=f"{field} holds an empty word or only punctuation"):
            make(["circle", " , "])
        with pytest.raises(ConfigError, match=f"{field} names 'circle' more than once"):
            make(["circle", "Circle"])
    long = "a red circle and " * 8 + "a green triangle"  # "triangle" is past the 24 T5 tokens (and in CLIP's 77)
    reg = attnctl.AttentionRegulation(targets=["triangle"], segments=["t5"], missing="ignore")
    with pytest.raises(LayoutError, match="'triangle' is in the prompt but past the tokens"), \
            attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe(long, **KW)
    reg = attnctl.AttentionRegulation(targets=["triangle"], missing="ignore")
    with pytest.warns(UserWarning, match="none of the targets \\['triangle'\\] is in the run's prompt"), \
            attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe("a red circle", **KW)
    assert reg.summary() is None


def test_a_phrase_cut_by_truncation_an_empty_prompt_and_word_errors_say_what_happened(flux_pipe):
    """A phrase whose last word the truncation cut off became its other words; an empty prompt was called a run
    given only prompt_embeds (also in a list, with missing='ignore'); the word errors dropped the layout's reason."""
    kw = {**KW, "max_sequence_length": 8}  # <bos> a red circle and a blue <eos>: the last "circle" is cut off
    for control in (attnctl.AttentionProbe(words=["blue circle"]),
                    attnctl.AttentionRegulation(targets=["blue circle", "red circle"], missing="ignore"),
                    attnctl.IsolationAttention(subjects=["blue circle", "red circle"])):
        with pytest.raises(LayoutError, match="'blue circle' is in the prompt, but a word of it is past the tokens"), \
                attnctl.attach(flux_pipe, [control]):
            flux_pipe("a red circle and a blue circle", **kw)
    for make in (lambda: attnctl.AttentionRegulation(targets=["circle"]),
                 lambda: attnctl.LayoutGuidance(boxes={"circle": [0, 0, 0.5, 0.5]})):
        with pytest.raises(LayoutError, match="is not in the prompt ''.*this prompt has no words"), \
                attnctl.attach(flux_pipe, [make()]):
            flux_pipe("", **KW)
    reg = attnctl.AttentionRegulation(targets=["circle"], missing="ignore")
    with attnctl.attach(flux_pipe, [reg]):  # the empty prompt's rows are left alone, the other's regulated
        flux_pipe(["", "a red circle"], **KW)
    assert {r.prompt for r in reg.records} == {"a red circle"}
    reg = attnctl.AttentionRegulation(targets=["circle"])
    with pytest.raises(LayoutError, match="the t5 tokens read 'a blue square'"), attnctl.attach(flux_pipe, [reg]):
        flux_pipe("a red circle", prompt_2="a blue square", **KW)
    reg = attnctl.AttentionRegulation(targets=["circle red"])
    with pytest.raises(LayoutError, match="AttentionRegulation: the phrase 'circle red' .* not one after another"), \
            attnctl.attach(flux_pipe, [reg]):
        flux_pipe("a red circle", **KW)


def test_controls_given_as_a_generator_none_twice_or_to_two_pipelines(flux_pipe, sd3_pipe):
    """A generator of controls is read once (it was used up by the type check, leaving no control); None is no
    control; one object listed twice would act twice; one object steering two attached pipelines would follow one."""
    plain = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    with attnctl.attach(sd3_pipe, (c for c in [attnctl.SoftPAG(heads=["L1H0"], scale=3.0)])) as ctl:
        guided = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert len(ctl.controls) == 1 and not (guided == plain).all()
    with attnctl.attach(sd3_pipe, None) as ctl:
        assert ctl.controls == []
    reg = attnctl.AttentionRegulation(targets=["circle"])
    with pytest.raises(ConfigError, match="the same AttentionRegulation object is in the controls twice"):
        attnctl.Controller(sd3_pipe, [reg, reg])
    with attnctl.attach(sd3_pipe, [reg]), pytest.raises(ConfigError, match="in use by another attnctl controller"):
        attnctl.attach(flux_pipe, [reg])
    with attnctl.attach(flux_pipe, [reg]):  # the first one left: the control is free again
        flux_pipe("a red circle", **KW)
    with attnctl.attach(sd3_pipe, [reg]):  # and back
        sd3_pipe("a red circle", **KW)
    assert "regulation of 'circle'" in reg.summary()


def test_processors_replaced_while_attached_are_an_error_not_a_silent_no_op(sd3_pipe):
    """fuse_qkv_projections inside attach puts diffusers' fused processor where attnctl's was: the controls would stop
    acting without a word. The next forward says so; fusing before attaching works."""
    from attnctl.errors import UnsupportedModelError

    reg = attnctl.AttentionRegulation(targets=["circle"])
    try:
        with attnctl.attach(sd3_pipe, [reg]):
            sd3_pipe.transformer.fuse_qkv_projections()
            with pytest.raises(UnsupportedModelError, match="was replaced by FusedJointAttnProcessor2_0"):
                sd3_pipe("a red circle", **KW)
    finally:
        sd3_pipe.transformer.unfuse_qkv_projections()
    sd3_pipe.transformer.fuse_qkv_projections()
    try:
        with attnctl.attach(sd3_pipe, [reg]):
            sd3_pipe("a red circle", **KW)
        assert reg.summary() is not None
    finally:
        sd3_pipe.transformer.unfuse_qkv_projections()
        sd3_pipe.transformer.set_attn_processor(JointAttnProcessor2_0())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_steps_are_the_schedulers_from_the_first_call(flux_pipe, sd3_pipe, family):
    """An img2img run with strength 0.5 starts half way through the schedule (diffusers sets the scheduler's
    begin_index): its first call is step 4 of 8 with sigma[4], not step 0 with sigma[0]."""
    import inspect

    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    base = flux_pipe if family == "flux" else sd3_pipe
    cls = FluxImg2ImgPipeline if family == "flux" else StableDiffusion3Img2ImgPipeline
    takes = inspect.signature(cls.__init__).parameters
    i2i = cls(**{k: v for k, v in base.components.items() if k in takes})
    i2i.set_progress_bar_config(disable=True)
    rec, sigmas = Recorder(), []
    with attnctl.attach(i2i, [rec]) as ctl:
        record = ctl.set_step
        ctl.set_step = lambda step, t=None, sigma=None: sigmas.append(float(sigma)) or record(step, t, sigma)
        i2i("a red circle", image=torch.rand(1, 3, 32, 48), strength=0.5, num_inference_steps=8, height=32, width=48,
            max_sequence_length=24, generator=torch.Generator().manual_seed(0), output_type="np")
    assert sorted({c[1] for c in rec.calls}) == [4, 5, 6, 7]
    assert sigmas[0] == pytest.approx(float(i2i.scheduler.sigmas[4]))


def test_adaptive_schedules_follow_what_their_control_reports(sd3_pipe):
    """Regulation reports its loss after each step: an Adaptive threshold on it switches regulation off after the
    first step, where a fixed schedule regulates all three. A control that reports nothing, or a metric it does not
    report, is refused rather than left to never change."""
    from attnctl.errors import ScheduleError
    from attnctl.schedules import Adaptive

    fixed = attnctl.AttentionRegulation(targets=["circle"], steps=1.0)
    gate = Adaptive(1.0, "threshold", metric="loss", threshold=0.0)
    adaptive = attnctl.AttentionRegulation(targets=["circle"], steps=gate)
    for reg in (fixed, adaptive):
        with attnctl.attach(sd3_pipe, [reg]):
            sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
    assert sorted({r.step for r in fixed.records}) == [0, 1, 2]
    assert sorted({r.step for r in adaptive.records}) == [0]
    history = adaptive.config.steps.history  # (the control's copy of the schedule given)
    assert len(history["loss"]) == 1 and history["plain_loss"][0] > history["loss"][0]
    with attnctl.attach(sd3_pipe, [adaptive]):  # a new run starts with a fresh history
        sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
    assert sorted({r.step for r in adaptive.records}) == [0]
    with pytest.raises(ScheduleError, match="SoftPAG reports no metric, so the Adaptive schedule"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["L1H0"], u=Adaptive(1.0, "threshold", threshold=1))])
    with pytest.raises(ScheduleError, match="AttentionRegulation reports no metric 'coverage'.*'loss'"):
        attnctl.Controller(sd3_pipe, [attnctl.AttentionRegulation(
            targets=["circle"], steps=Adaptive(1.0, "threshold", metric="coverage", threshold=1))])


def test_adaptive_schedules_survive_the_start_of_run_check_and_count_denoising_steps(sd3_pipe):
    """The start-of-run check that a gate is ever on evaluated the live schedules, which used an Adaptive one up: a
    window base crashed the run, and an isolation threshold held its base for a step. Under the midpoint scheduler
    layout guidance's losses were matched to model calls, so only the first step's was reported; an attnctl
    pipeline closes the run's last step, and isolation's coverage has one value per step either way."""
    from attnctl.midpoint import use_solver
    from attnctl.pipelines import AttnCtlSD3Pipeline
    from attnctl.schedules import Adaptive, Window

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    reg = attnctl.AttentionRegulation(targets=["circle"], iterations=2,
                                      steps=Adaptive(Window(1.0, 0.5, 1.0), "threshold", metric="loss", threshold=9))
    pipe("a red circle", controls=[reg], **KW)  # raised "was at step 1 of 3 and is now asked for step 0"
    assert reg.config.steps.trace == [(0, 0.0), (1, 1.0), (2, 1.0)]
    iso = attnctl.IsolationAttention(subjects=["red", "circle"],
                                     isolation=Adaptive(1.0, "threshold", metric="coverage", threshold=0.0))
    pipe("a red circle", controls=[iso], **KW)
    assert iso.config.isolation.trace == [(1, 0.0), (2, 0.0)]  # off from step 1: step 0's coverage was reported
    assert len(iso.coverage) == 3 and len(iso.config.isolation.history["coverage"]) == 3
    with attnctl.attach(sd3_pipe, [iso]):  # a stock pipeline: the last step's coverage from its maps, when asked
        sd3_pipe("a red circle", **KW)
    assert len(iso.coverage) == 3
    lay = attnctl.LayoutGuidance(boxes={"circle": [0, 0, 0.5, 0.5]},
                                 scale=Adaptive(0.1, "ratio", metric="loss", target=0.5))
    mid_iso = attnctl.IsolationAttention(subjects=["red", "circle"])
    with use_solver(pipe, "midpoint"):
        pipe("a red circle", controls=[lay], **KW)
        pipe("a red circle", controls=[mid_iso], **KW)
    assert len(mid_iso.coverage) == 3  # a value per denoising step, not per model call (6)
    assert [s for s, _ in lay.history] == [0, 1, 2]
    assert lay.config.scale.history["loss"] == pytest.approx([loss for _, loss in lay.history])


def test_a_gate_closed_before_an_img2img_run_starts_is_warned(sd3_pipe):
    """Strength 0.5 starts the run half way through the schedule: regulation's default window (the first half)
    never opens, which went unsaid."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    i2i = StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    i2i.set_progress_bar_config(disable=True)
    reg = attnctl.AttentionRegulation(targets=["circle"])
    with pytest.warns(UserWarning, match=r"AttentionRegulation does nothing in this run: its steps window.* is 0 at "
                                         r"every step it can act at \(from step 5 of 8\) \(a window that ends before "
                                         "an img2img run starts"), attnctl.attach(i2i, [reg]):
        i2i("a red circle", image=torch.rand(1, 3, 32, 48), strength=0.5, num_inference_steps=8, height=32, width=48,
            max_sequence_length=24, output_type="np")
    assert not reg.records


def test_schedules_count_denoising_steps_under_the_midpoint_scheduler(sd3_pipe):
    """The midpoint scheduler makes two model calls per step: a schedule's value holds for both (a window over the
    first half of 3 steps is on for step 0 — calls 0 and 1 — and not for step 1's first call alone)."""
    from attnctl.midpoint import use_solver

    probe = attnctl.AttentionProbe(words=["circle"], weight="window(1, 0, 0.5)")
    with use_solver(sd3_pipe, "midpoint"), attnctl.attach(sd3_pipe, [probe]):
        sd3_pipe("a red circle", **KW)
    assert probe._steps == {0, 1}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_vanishing_perturbation_leaves_other_controls_images_as_they_are(flux_pipe, sd3_pipe, family):
    """SoftPAG's perturbed rows copy the conditional ones: regulation and isolation steer the copies as their rows,
    so the guidance sees its perturbation only. With u → 0 the image is the control's own (regulation and isolation
    acting on the conditional rows alone gave their effect (1 + scale) times)."""
    pipe = flux_pipe if family == "flux" else sd3_pipe
    kw = dict(KW, prompt="a red circle and a blue square", num_images_per_prompt=2)
    for make in (lambda: attnctl.AttentionRegulation(targets=["circle", "square"], iterations=5),
                 lambda: attnctl.IsolationAttention(subjects=["red circle", "blue square"])):
        with attnctl.attach(pipe, [make()]):
            alone = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        with attnctl.attach(pipe, [make(), attnctl.SoftPAG(heads=["L1H0"], u=1e-6, scale=3.0)]):
            guided = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert abs(guided - alone).max() < 1e-3


def test_processors_without_a_followed_run_and_other_small_mistakes_say_so(flux_pipe, sd3_pipe):
    """Processors left by a closed controller, or made by a controller of another pipeline, name that (not a deep
    AttributeError, not a wrong "pass height/width"); a control's JSON text loads; a negative probe weight is
    refused; a probe weighted 0 at every step says so; SoftPAG scales written differently but equal are one."""
    from attnctl.errors import ScheduleError

    for control in (attnctl.AttentionProbe(words=["circle"]), attnctl.AttentionRegulation(targets=["circle"])):
        ctl = attnctl.Controller(sd3_pipe, [control]).install()
        ctl.close()
        try:
            with pytest.raises(LayoutError, match="no run of this transformer is being followed"):
                sd3_pipe("a red circle", **KW)
        finally:
            sd3_pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    assert attnctl.control_from_json('{"kind": "probe", "words": ["circle"]}').config.words == ["circle"]
    with pytest.raises(ConfigError, match="not valid JSON"):
        attnctl.control_from_json('{"kind": "probe"')
    for weight in (-1, "linear(1, -1)"):
        with pytest.raises(ScheduleError, match="outside the allowed range"):
            attnctl.AttentionProbe(weight=weight)
    probe = attnctl.AttentionProbe(words=["circle"], weight=0)
    with attnctl.attach(sd3_pipe, [probe]):
        sd3_pipe("a red circle", **KW)
    with pytest.raises(LayoutError, match="its weight was 0 at every step"):
        probe.word_maps()
    attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["L0H0"], scale=2),
                                  attnctl.SoftPAG(heads=["L1H0"], scale="window(2, 0, 1)")])
    with pytest.raises(ConfigError, match="different guidance scales"):
        attnctl.Controller(sd3_pipe, [attnctl.SoftPAG(heads=["L0H0"], scale=2),
                                      attnctl.SoftPAG(heads=["L1H0"], scale="window(2, 0, 0.5)")])


def test_controls_round_trip_json():
    probe = attnctl.AttentionProbe(words=["circle"], sites=["transformer_blocks.0"], weight="linear(1, 0)")
    again = attnctl.control_from_json(probe.to_json())
    assert again.to_json() == probe.to_json()
    with pytest.raises(ConfigError, match="unknown control kind"):
        attnctl.control_from_json({"kind": "nope"})
    with pytest.raises(ConfigError, match="probe"):
        attnctl.control_from_json({"kind": "probe", "bogus": 1})
    with pytest.raises(ConfigError, match=r"wieght: no such setting \(did you mean 'weight'\?\)"):
        attnctl.control_from_json({"kind": "probe", "wieght": 1})
    with pytest.raises(ConfigError, match=r"unknown control kind 'prob'. Fix: did you mean 'probe'\?"):
        attnctl.control_from_json({"kind": "prob"})
    for kind in (["probe"], {"a": 1}, None):  # not a name: refused as one, never a TypeError
        with pytest.raises(ConfigError, match=r"unknown control kind .*give one of the known kinds: epipolar"):
            attnctl.control_from_json({"kind": kind})


# the fewest settings each control kind takes, as a user writes them
MINIMAL = {"epipolar": {"rig": {"kind": "stereo"}}, "isolation": {"subjects": ["circle", "square"]},
           "layout": {"boxes": {"circle": [0, 0, 0.5, 0.5]}}, "probe": {}, "regulation": {"targets": ["circle"]},
           "softpag": {"heads": ["L1H0"]}, "unify_edit": {}, "value_sharing": {}}


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_every_control_loads_back_what_it_saves(kind):
    """to_json writes every field; control_from_json must take that back as it is (a PNG's metadata, a batch file's
    controls and --from all go through it), also for fields whose checks look at what was set."""
    from attnctl.controls.base import CONTROL_TYPES

    assert set(MINIMAL) == set(CONTROL_TYPES)  # a new kind gets its line here
    control = attnctl.control_from_json({"kind": kind, **MINIMAL[kind]})
    again = attnctl.control_from_json(control.to_json())
    assert type(again) is type(control) and again.to_json() == control.to_json()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_ip_adapter_keeps_working_under_attnctl(sd3_pipe, flux_pipe, family):
    """attnctl's processor takes over the replaced IP-adapter processor's term: the attention module's output
    (through diffusers' own keyword filtering) equals the stock IP-adapter processor's, and restore puts it back."""
    pipe = sd3_pipe if family == "sd3" else flux_pipe
    tr = pipe.transformer
    attn = tr.transformer_blocks[0].attn
    ip = ip_adapter_processor(family, tr)
    g = torch.Generator().manual_seed(1)
    hs, ehs = torch.randn(2, 16, tr.inner_dim, generator=g), torch.randn(2, 5, tr.inner_dim, generator=g)
    if family == "sd3":
        extra = {"ip_hidden_states": torch.randn(2, 4, 16, generator=g), "temb": torch.randn(2, 8, generator=g)}
    else:
        ids = torch.cat([torch.zeros(5, 3), torch.stack([torch.zeros(16), torch.arange(16.0) // 4,
                                                         torch.arange(16.0) % 4], dim=-1)])
        extra = {"image_rotary_emb": tr.pos_embed(ids),
                 "ip_hidden_states": [torch.randn(2, 4, 16, generator=g) for _ in range(2)]}
    saved = dict(tr.attn_processors)
    key = "transformer_blocks.0.attn.processor"
    tr.set_attn_processor({**saved, key: ip})
    try:
        with torch.no_grad():
            stock = attn(hidden_states=hs, encoder_hidden_states=ehs, **extra)
            if family == "sd3":  # the adapter's term counts: without it the output moves
                ip.scale = 0.0
                assert (attn(hidden_states=hs, encoder_hidden_states=ehs, **extra)[0] - stock[0]).abs().max() > 1e-3
                ip.scale = 0.7
            else:  # FLUX returns the term as a third output
                assert len(stock) == 3 and stock[2].abs().max() > 1e-3
            ctl = attnctl.Controller(tr, [attnctl.AttentionProbe(tokens=[0])]).install()
            try:
                assert tr.attn_processors[key].ip_adapter is ip
                ctl.begin_run(1, layout=attnctl.TokenLayout(ctl.family, 5, (4, 4)))
                ours = attn(hidden_states=hs, encoder_hidden_states=ehs, **extra)
            finally:
                ctl.restore()
            assert tr.attn_processors[key] is ip  # restored
    finally:
        tr.set_attn_processor(saved)
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_ip_adapter_processor_attnctl_cannot_carry_is_refused_not_dropped(sd3_pipe, flux_pipe, family):
    class CustomIPAdapterAttnProcessor:  # e.g. a third-party adapter: its term would be silently lost
        def __call__(self, attn, hidden_states, *args, **kwargs):
            raise AssertionError("never called")

    pipe = sd3_pipe if family == "sd3" else flux_pipe
    tr = pipe.transformer
    saved = dict(tr.attn_processors)
    key = next(iter(saved))
    tr.set_attn_processor({**saved, key: CustomIPAdapterAttnProcessor()})
    try:
        with pytest.raises(UnsupportedModelError, match="CustomIPAdapterAttnProcessor.*unload_ip_adapter"):
            attnctl.attach(pipe, [attnctl.AttentionProbe(words=["circle"])]).__enter__()
        assert type(tr.attn_processors[key]).__name__ == "CustomIPAdapterAttnProcessor"  # nothing replaced
        assert "encode_prompt" not in vars(pipe) and not tr._forward_pre_hooks and not tr._forward_hooks
    finally:
        tr.set_attn_processor(saved)


def _ip_attention_inputs(family: str, tr, dtype=torch.float32) -> dict:
    """Inputs of ``transformer_blocks.0.attn`` with IP-adapter features (the adapter of ``ip_adapter_processor``)."""
    g = torch.Generator().manual_seed(1)
    kw = {"hidden_states": torch.randn(2, 16, tr.inner_dim, generator=g),
          "encoder_hidden_states": torch.randn(2, 5, tr.inner_dim, generator=g)}
    if family == "sd3":
        kw |= {"ip_hidden_states": torch.randn(2, 4, 16, generator=g), "temb": torch.randn(2, 8, generator=g)}
    else:
        ids = torch.cat([torch.zeros(5, 3), torch.stack([torch.zeros(16), torch.arange(16.0) // 4,
                                                         torch.arange(16.0) % 4], dim=-1)])
        kw |= {"image_rotary_emb": tr.pos_embed(ids),
               "ip_hidden_states": [torch.randn(2, 4, 16, generator=g) for _ in range(2)]}
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else [x.to(dtype) for x in v] if isinstance(v, list) else v
            for k, v in kw.items()}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_carried_ip_adapter_keeps_its_place_among_the_weights(sd3_pipe, flux_pipe, family):
    """While attached, the transformer's weights are the stock ones, by name and object, the IP-adapter's included
    (save_pretrained saves them); a cast inside the block casts the adapter too, and after the block the stock
    adapter is back with the cast weights."""
    import copy

    tr = copy.deepcopy((sd3_pipe if family == "sd3" else flux_pipe).transformer)
    key = "transformer_blocks.0.attn.processor"
    ip = ip_adapter_processor(family, tr)
    tr.set_attn_processor({**tr.attn_processors, key: ip})
    stock = tr.state_dict(keep_vars=True)
    ctl = attnctl.Controller(tr, [attnctl.AttentionProbe(tokens=[0])]).install()
    try:
        assert tr.attn_processors[key] is not ip
        inside = tr.state_dict(keep_vars=True)
        assert list(inside) == list(stock) and all(inside[k] is stock[k] for k in stock)
        tr.to(torch.float64)
        ctl.begin_run(1, layout=attnctl.TokenLayout(ctl.family, 5, (4, 4)))
        with torch.no_grad():
            ours = tr.transformer_blocks[0].attn(**_ip_attention_inputs(family, tr, torch.float64))
    finally:
        ctl.restore()
    assert tr.attn_processors[key] is ip and {p.dtype for p in ip.parameters()} == {torch.float64}
    with torch.no_grad():
        theirs = tr.transformer_blocks[0].attn(**_ip_attention_inputs(family, tr, torch.float64))
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_set_ip_adapter_scale_inside_the_block_acts_and_stays(sd3_pipe, flux_pipe, family):
    """pipe.set_ip_adapter_scale inside attach sets the carried adapter's scale, as without attnctl: the layer's
    output inside the block is the stock adapter's at the new scale, which it keeps after the block."""
    import copy

    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    base = sd3_pipe if family == "sd3" else flux_pipe
    pipe = type(base)(**{**base.components, "transformer": copy.deepcopy(base.transformer)})
    tr = pipe.transformer
    key = "transformer_blocks.0.attn.processor"
    ip = ip_adapter_processor(family, tr)
    tr.set_attn_processor({**tr.attn_processors, key: ip})
    if family == "flux":  # what load_ip_adapter adds: FLUX's set_ip_adapter_scale counts the adapters there
        tr.encoder_hid_proj = MultiIPAdapterImageProjection(
            [ImageProjection(image_embed_dim=12, cross_attention_dim=16, num_image_text_embeds=4) for _ in range(2)])
    attn = tr.transformer_blocks[0].attn
    kw = _ip_attention_inputs(family, tr)
    with torch.no_grad():
        full = attn(**kw)
        with attnctl.attach(pipe, [attnctl.AttentionProbe(tokens=[0])]) as ctl:
            mine = tr.attn_processors[key]
            pipe.set_ip_adapter_scale(0.25)
            assert tr.attn_processors[key] is mine  # attnctl's processor is back in place
            ctl.begin_run(1, layout=attnctl.TokenLayout(ctl.family, 5, (4, 4)))
            ours = attn(**kw)
        assert tr.attn_processors[key] is ip and ip.scale == (0.25 if family == "sd3" else [0.25, 0.25])
        theirs = attn(**kw)
    assert "set_ip_adapter_scale" not in vars(pipe)
    changed = ours[0] if family == "sd3" else ours[2]
    assert (changed - (full[0] if family == "sd3" else full[2])).abs().max() > 1e-3
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_set_ip_adapter_scale_after_close_still_acts(sd3_pipe):
    """ctl.close() removes the hooks and leaves attnctl's processors in place, holding the carried IP-adapter: the
    scale set afterwards reaches the adapter (it is not lost on a processor diffusers does not look for); once the
    stock processors are back, the stock method runs alone."""
    import copy

    pipe = type(sd3_pipe)(**{**sd3_pipe.components, "transformer": copy.deepcopy(sd3_pipe.transformer)})
    tr = pipe.transformer
    key = "transformer_blocks.0.attn.processor"
    ip = ip_adapter_processor("sd3", tr)
    tr.set_attn_processor({**tr.attn_processors, key: ip})
    from attnctl.processors.base import AttnCtlIPProcessor

    ctl = attnctl.attach(pipe, [attnctl.AttentionProbe(tokens=[0])]).install()
    ctl.close()
    assert isinstance(tr.attn_processors[key], AttnCtlIPProcessor)
    pipe.set_ip_adapter_scale(0.25)
    assert ip.scale == 0.25 and tr.attn_processors[key].ip_adapter is ip
    ctl.restore()
    assert tr.attn_processors[key] is ip and "set_ip_adapter_scale" not in vars(pipe)
    pipe.set_ip_adapter_scale(0.5)
    assert ip.scale == 0.5


@pytest.mark.parametrize("how", ["attach", "set_attn_processor"])
def test_processors_asked_again_are_the_installed_ones(sd3_pipe, how):
    """ctl.processors() asked again (to look at them) gives the processors already made: the controls keep acting,
    and the block's end (or restore) puts the stock processors back."""
    pipe, tr = sd3_pipe, sd3_pipe.transformer
    before = dict(tr.attn_processors)
    reference = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    probe = attnctl.AttentionProbe(words=["circle"])
    ctl = attnctl.Controller(pipe, [probe])
    if how == "attach":
        ctl.__enter__()
    else:
        tr.set_attn_processor(ctl.processors())
    try:
        again = ctl.processors()
        assert all(again[k] is p for k, p in tr.attn_processors.items())
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
        assert probe.word_maps()["circle"].sum() > 0  # the probe acted
    finally:
        ctl.restore()
    assert tr.attn_processors == before and not tr._forward_pre_hooks
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert abs(out - reference).max() == 0


def test_run_state_index_tensors_are_made_once():
    """Controls ask for the same index tensors at every attention call; the run state builds each once (on a GPU
    every build from a list would be a host-to-device copy that waits for the device)."""
    from attnctl.controls.base import RunState

    state = RunState(roles=["uncond", "cond", "cond"])
    a = state.index([1, 2], "cpu")
    assert a.dtype == torch.long and a.tolist() == [1, 2]
    assert state.index((1, 2), "cpu") is a
    assert state.rows_with(("cond",), 3, "cpu") is a  # rows come from the same cache
    assert state.index([2, 1], "cpu") is not a and state.index([2, 1], "cpu").tolist() == [2, 1]
    assert state.index([], None).shape == (0,)



def test_sd3_skip_layer_pass_is_conditional_rows_only(sd3_pipe):
    """SD3's skip-layer guidance calls the transformer on the conditional latents alone; with two images that batch
    has an even size like a CFG batch, and must still count as conditional rows, not as [uncond, cond]."""
    seen = []
    with attnctl.attach(sd3_pipe, [attnctl.AttentionProbe(words=["circle"])]) as ctl:
        hook = sd3_pipe.transformer.register_forward_pre_hook(  # runs after the controller's own pre-hook
            lambda m, a, kw: seen.append((kw.get("skip_layers") is not None, list(ctl.state.roles))), with_kwargs=True)
        try:
            sd3_pipe("a red circle", num_images_per_prompt=2, guidance_scale=3.0, skip_guidance_layers=[1],
                     skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, num_inference_steps=3, height=32,
                     width=32, max_sequence_length=24, output_type="latent")
        finally:
            hook.remove()
    assert [roles for skip, roles in seen if skip] == [["cond", "cond"]] * 2  # steps 1 and 2
    assert all(roles == ["uncond"] * 2 + ["cond"] * 2 for skip, roles in seen if not skip)


@pytest.mark.parametrize("kind", ["regulation", "regulation, warm start", "probe"])
def test_the_skip_layer_pass_leaves_what_the_next_step_reads_alone(sd3_pipe, kind):
    """SD3's skip-layer pass came after the step's main call and overwrote regulation's smoothed and warm-start W,
    so the next step's main call started from the pass's; the probe summed the pass into its maps. At skip-layer
    scale 0 the images and maps must be those of the run without skip-layer guidance."""
    def make():
        if kind == "probe":
            return attnctl.AttentionProbe(words=["circle"])
        extra = {"init": "previous"} if "warm" in kind else {}
        return attnctl.AttentionRegulation(targets=["red circle", "blue square"], steps=1.0, **extra)

    def run(**slg):
        control = make()
        with attnctl.attach(sd3_pipe, [control]):
            image = sd3_pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0),
                             guidance_scale=3.0, **{**KW, "num_inference_steps": 4}, **slg).images
        return image, control

    plain, ctl_plain = run()
    slg, ctl_slg = run(skip_guidance_layers=[1], skip_layer_guidance_scale=0.0, skip_layer_guidance_start=0.0,
                       skip_layer_guidance_stop=1.0)
    assert abs(slg - plain).max() <= 1e-6
    if kind == "probe":
        assert torch.allclose(ctl_slg.word_maps()["circle"], ctl_plain.word_maps()["circle"], atol=1e-7)
    else:
        assert len(ctl_slg.records) == len(ctl_plain.records) and ctl_slg.summary() == ctl_plain.summary()


def test_a_pipeline_sharing_the_attached_transformer_is_refused(sd3_pipe):
    """A second pipeline object over the same components (from_pipe, type(pipe)(**pipe.components)) ran with the
    attached pipeline's prompt and CFG rows; it is now refused, and the attached pipeline still runs."""
    other = type(sd3_pipe)(**sd3_pipe.components)
    other.set_progress_bar_config(disable=True)
    reg = attnctl.AttentionRegulation(targets=["circle"])
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe("a red circle", **KW)
        with pytest.raises(ConfigError, match="attached .* to another StableDiffusion3Pipeline object") as err:
            other("a blue square", **KW)
        assert "attnctl.attach(that_pipe" in str(err.value)
        sd3_pipe("a red circle", **KW)  # the attached one is not disturbed
    other("a blue square", **KW)  # after the block, nothing is attached


def test_copying_or_pickling_while_attached_is_refused_and_works_after(sd3_pipe):
    """deepcopy inside attach made a copy whose controls did nothing and which failed after the block."""
    import copy
    import pickle

    with attnctl.attach(sd3_pipe, [attnctl.AttentionRegulation(targets=["circle"])]):
        with pytest.raises(ConfigError, match="cannot be copied while an attnctl controller is attached"):
            copy.deepcopy(sd3_pipe.transformer)
        with pytest.raises(ConfigError, match="cannot be pickled"):
            pickle.dumps(sd3_pipe.transformer)
    twin = copy.deepcopy(sd3_pipe.transformer)  # after the block: a plain copy
    assert not twin._forward_pre_hooks and type(next(iter(twin.attn_processors.values()))) is JointAttnProcessor2_0


def test_what_the_user_changes_inside_attach_stays_after_it(flux_pipe, sd3_pipe):
    """Leaving attach put back the processors as they were at entry, undoing an attention backend set inside the
    block, and SD3's fuse/unfuse: diffusers' record for unfuse held attnctl's closed processors."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    def backends(pipe):
        return {getattr(p, "_attention_backend", None) for p in pipe.transformer.attn_processors.values()}

    flux_pipe.transformer.set_attention_backend("_native_flash")
    try:
        with attnctl.attach(flux_pipe, [attnctl.AttentionProbe(words=["circle"])]):
            flux_pipe.transformer.set_attention_backend("_native_math")
            flux_pipe("a red circle", **KW)
        assert backends(flux_pipe) == {AttentionBackendName._NATIVE_MATH}
        with attnctl.attach(flux_pipe, [attnctl.AttentionProbe(words=["circle"])]):
            flux_pipe.transformer.reset_attention_backend()
        assert backends(flux_pipe) == {None}
    finally:
        flux_pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # diffusers sets it globally too

    def kinds():
        return {type(p).__name__ for p in sd3_pipe.transformer.attn_processors.values()}

    plain = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    reg = attnctl.AttentionRegulation(targets=["circle"])
    try:
        with attnctl.attach(sd3_pipe, [reg]):  # fused inside, no call: the fused processors stay
            sd3_pipe.transformer.fuse_qkv_projections()
        assert kinds() == {"FusedJointAttnProcessor2_0"}
        sd3_pipe.transformer.unfuse_qkv_projections()  # puts back the stock processors, not attnctl's
        assert kinds() == {"JointAttnProcessor2_0"}
        sd3_pipe.transformer.fuse_qkv_projections()
        with attnctl.attach(sd3_pipe, [reg]):  # fused before, unfused inside: unfused after
            sd3_pipe.transformer.unfuse_qkv_projections()
        assert kinds() == {"JointAttnProcessor2_0"}
        again = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
        assert abs(again - plain).max() <= 1e-6
    finally:
        sd3_pipe.transformer.set_attn_processor(JointAttnProcessor2_0())


def test_a_gating_schedule_off_at_every_step_of_the_run_is_warned(sd3_pipe):
    """A window between two steps (progress 0, 0.5, 1 over 3 steps) left the control doing nothing without a word;
    a constant 0 is the user's plain choice and is not warned."""
    import warnings

    for control, field in ((attnctl.SoftPAG(heads=["L0H0"], scale="window(3, 0.2, 0.4)"), "scale"),
                           (attnctl.AttentionRegulation(targets=["circle"], steps="window(1, 0.6, 0.9)"), "steps"),
                           (attnctl.IsolationAttention(subjects=["red", "circle"], isolation="window(1, 0, 0.4)"),
                            "isolation")):  # on at step 0 only, where the masks are made: it never steers
        with pytest.warns(UserWarning, match=f"{type(control).__name__} does nothing in this run: its {field} "
                                             "window.* is 0 at every"), \
                attnctl.attach(sd3_pipe, [control]):
            sd3_pipe("a red circle", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attnctl.attach(sd3_pipe, [attnctl.SoftPAG(heads=["L0H0"], scale=0.0)]):
            sd3_pipe("a red circle", **KW)


def test_a_run_too_short_for_a_control_that_needs_a_step_first_is_warned(sd3_pipe):
    """Isolation makes its masks at the run's first step and steers from the second: a one-step run (FLUX-schnell
    style, or img2img that runs its last step) left it doing nothing without a word, whatever its schedule."""
    iso = attnctl.IsolationAttention(subjects=["red", "circle"])
    with pytest.warns(UserWarning, match="IsolationAttention does nothing in this run: it acts from the run's step 2 "
                                         "on .* the run has 1 step; run more steps"), attnctl.attach(sd3_pipe, [iso]):
        sd3_pipe("a red circle", **{**KW, "num_inference_steps": 1})


# ------------------------------------------------------------------------------------------ session 6 fixes


def _attnctl_pipe(stock):
    """An attnctl pipeline over a stock test pipeline's components (the same modules)."""
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    cls = AttnCtlSD3Pipeline if type(stock).__name__.startswith("StableDiffusion3") else AttnCtlFluxPipeline
    pipe = cls(**stock.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fixture,name", [("flux_pipe", "prompt_2"), ("sd3_pipe", "prompt_3"),
                                          ("sd3_pipe", "prompt_2")])
def test_an_empty_second_prompt_is_the_prompt_as_in_diffusers(request, fixture, name):
    """diffusers reads ``prompt_2 or prompt``: an empty prompt_2 (FLUX's T5) / prompt_3 (SD3's T5) is the prompt. The
    layout read it as an empty T5 text: FLUX's word controls raised LayoutError and SD3's probe lost the T5 tokens."""
    pipe = request.getfixturevalue(fixture)
    prompt = "a red circle and a blue square"
    maps = []
    for extra in ({}, {name: ""}, {name: []}):
        probe = attnctl.AttentionProbe(words=["circle"])
        with attnctl.attach(pipe, [probe]):
            pipe(prompt, generator=torch.Generator().manual_seed(0), **extra, **KW)
        maps.append(probe.word_maps()["circle"])
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[0], maps[2])


def test_an_empty_second_prompt_inside_a_list_is_read_empty(flux_pipe):
    """In a list of prompt_2, an empty text is not replaced (diffusers' ``or`` acts on the list as a whole): that
    prompt's T5 tokens hold no words, so its rows' layout finds none, and a word control says so."""
    ctl = attnctl.Controller(flux_pipe, [])
    ctl._prompt = (["a red circle", "a red circle"], None, ["", "a blue square"])
    assert ctl._prompt_texts() == [("a red circle", "a red circle", ""), ("a red circle", "a red circle",
                                                                         "a blue square")]
    ctl._prompt = (["a red circle", "a blue square"], None, "")
    assert [t for _, _, t in ctl._prompt_texts()] == ["a red circle", "a blue square"]
    with attnctl.attach(flux_pipe, [attnctl.AttentionProbe(words=["circle"])]), \
            pytest.raises(LayoutError, match="'circle' is not in the prompt"):
        flux_pipe(["a red circle", "a red circle"], prompt_2=["", ""], **KW)


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_encode_prompt_in_a_step_end_callback_keeps_the_run(request, fixture):
    """A step-end callback that encodes the prompt (prompt switching; here the same prompt, so the model's inputs do
    not change) restarted the run: the controls began again, the probe lost the steps before, and FLUX's negative
    call then counted as conditional (SoftPAG ran a perturbed row in it)."""
    pipe = request.getfixturevalue(fixture)
    prompt = "a red circle and a blue square"
    if fixture == "sd3_pipe":
        cfg = {"guidance_scale": 3.0}

        def callback(p, i, t, kw):
            if i != 1:
                return {}
            pe, npe, _, _ = p.encode_prompt(prompt, None, None, max_sequence_length=24)
            return {"prompt_embeds": torch.cat([npe, pe])}
    else:
        cfg = {"true_cfg_scale": 2.0, "negative_prompt": "a green triangle"}

        def callback(p, i, t, kw):
            return {"prompt_embeds": p.encode_prompt(prompt, None, max_sequence_length=24)[0]} if i == 1 else {}

    steps = {**KW, "num_inference_steps": 4}
    results = []
    for extra in ({}, {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}):
        probe, pag = attnctl.AttentionProbe(tokens=[1, 2]), attnctl.SoftPAG(heads=["L0H0"], scale=2.0)
        rows: list[int] = []
        hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, k, rows=rows: rows.append(k["hidden_states"].shape[0]), with_kwargs=True)
        try:
            with attnctl.attach(pipe, [probe, pag]):
                images = pipe(prompt, generator=torch.Generator().manual_seed(0), **cfg, **steps, **extra).images
        finally:
            hook.remove()
        results.append((images, sorted(probe._steps), rows, probe.word_maps()["1"]))
    (plain, plain_steps, plain_rows, plain_map), (switched, steps_seen, rows_seen, switched_map) = results
    assert steps_seen == plain_steps == [0, 1, 2, 3]
    assert rows_seen == plain_rows  # FLUX: [cond + perturbed, uncond] at every step
    assert (switched == plain).all() and torch.equal(switched_map, plain_map)


def test_a_pipeline_without_check_inputs_starts_a_call_at_each_encode_prompt(sd3_pipe):
    """Without check_inputs to mark a call's start, an encode_prompt after forwards still starts a new call: the
    second call's run begins at its own step 0 with its own prompt."""
    from diffusers import StableDiffusion3Pipeline

    class NoCheck(StableDiffusion3Pipeline):
        hidden = True  # check_inputs out of the controller's sight while it attaches; the call still runs it

        def __getattribute__(self, name):
            if name == "check_inputs" and type(self).hidden:
                raise AttributeError(name)
            return super().__getattribute__(name)

    pipe = NoCheck(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe, "check_inputs")
    rec = Recorder()
    with attnctl.attach(pipe, [rec]) as ctl:
        assert "check_inputs" not in ctl._wrappers and "encode_prompt" in ctl._wrappers
        NoCheck.hidden = False
        pipe("a red circle", **KW)
        rec.calls.clear()
        pipe("a blue square", **KW)
        assert ctl.state.layout.prompt == "a blue square" and ctl.state.layout.word_tokens("square")
    assert sorted({c[1] for c in rec.calls}) == [0, 1, 2]


def test_a_pipeline_copies_after_a_controlled_call(sd3_pipe, flux_pipe):
    """An attnctl pipeline keeps its finished controller as pipe.attnctl; copying the pipeline was refused as if the
    controller were attached. Now it copies (the copy's pipe.attnctl and controls are its own), and a finished
    controller pickles; attached, both are still refused."""
    import copy
    import pickle

    pipe = _attnctl_pipe(sd3_pipe)
    pipe("a red circle", controls=[attnctl.AttentionProbe(words=["circle"])], **KW)
    twin = copy.deepcopy(pipe)
    assert twin.attnctl is not pipe.attnctl and twin.attnctl.pipe is twin and twin.attnctl.transformer is \
        twin.transformer
    probe, twin_probe = pipe.attnctl.controls[0], twin.attnctl.controls[0]
    assert twin_probe.controller is twin.attnctl and torch.equal(twin_probe.word_maps()["circle"],
                                                                 probe.word_maps()["circle"])
    with attnctl.attach(flux_pipe, []) as ctl:  # a FLUX run keeps a weak reference to its image positions
        flux_pipe("a red circle", **KW)
        with pytest.raises(ConfigError, match="cannot be pickled"):
            pickle.dumps(ctl)
    assert pickle.loads(pickle.dumps(ctl)).family == "flux"


@pytest.mark.parametrize("how", ["attach", "controls="])
def test_a_users_own_pipeline_methods_are_used_and_kept(sd3_pipe, how):
    """A method set on the pipeline object (prompt weighting in encode_prompt, a check of one's own) was bypassed
    under attnctl, which wrapped the class's, and deleted when it closed."""
    import types

    pipe = _attnctl_pipe(sd3_pipe) if how == "controls=" else sd3_pipe
    calls = []

    def encode_prompt(self, *args, **kwargs):
        calls.append("encode_prompt")
        out = type(self).encode_prompt(self, *args, **kwargs)
        return (out[0] * 0.5, *out[1:])

    def check_inputs(self, *args, **kwargs):
        calls.append("check_inputs")
        return type(self).check_inputs(self, *args, **kwargs)

    mine = {"encode_prompt": types.MethodType(encode_prompt, pipe),
            "check_inputs": types.MethodType(check_inputs, pipe)}
    vars(pipe).update(mine)
    try:
        plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
        calls.clear()
        probe = attnctl.AttentionProbe(tokens=[0])
        if how == "attach":
            with attnctl.attach(pipe, [probe]):
                images = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
        else:
            images = pipe("a red circle", generator=torch.Generator().manual_seed(0), controls=[probe], **KW).images
        assert calls == ["check_inputs", "encode_prompt"] and (images == plain).all()
        assert all(vars(pipe)[name] is method for name, method in mine.items())  # put back, not deleted
    finally:
        for name in mine:
            vars(pipe).pop(name, None)


def test_a_method_set_over_the_wrapper_inside_the_block_stays(sd3_pipe):
    """close() removes only attnctl's own wrappers: a method the user sets inside the block is kept."""
    import types

    with attnctl.attach(sd3_pipe, [attnctl.AttentionProbe(tokens=[0])]):
        mine = types.MethodType(lambda self, *a, **k: None, sd3_pipe)
        sd3_pipe.check_inputs = mine
    try:
        assert vars(sd3_pipe).get("check_inputs") is mine and "encode_prompt" not in vars(sd3_pipe)
    finally:
        vars(sd3_pipe).pop("check_inputs", None)


def test_a_perturbed_branch_control_with_roles_on_a_pipeline_is_refused(sd3_pipe):
    """With roles= the controller leaves the rows to the caller, and a pipeline's call has no perturbed rows: SoftPAG
    with roles= on a pipeline silently did nothing. (A bare transformer keeps roles=: its caller lays out the rows.)"""
    with pytest.raises(ConfigError, match=r"SoftPAG needs perturbed batch rows.*Fix: leave roles= out on a pipeline"):
        attnctl.attach(sd3_pipe, [attnctl.SoftPAG(heads=["L0H0"], scale=3.0)], roles=["uncond", "cond"])
    assert not sd3_pipe.transformer._forward_pre_hooks and "encode_prompt" not in vars(sd3_pipe)
    ctl = attnctl.Controller(sd3_pipe.transformer, [attnctl.SoftPAG(heads=["L0H0"], scale=3.0)],
                             roles=["cond", "perturbed"])
    assert ctl.state.roles == ["cond", "perturbed"]


@pytest.mark.parametrize("change", ["a subset of the sites", "a site left stock at attach"])
def test_sites_assigned_inside_attach_count_from_the_next_call(sd3_pipe, change):
    """Settings assigned after construction count from the next run, but inside one attach block a new ``sites`` was
    ignored: the controls were bound once, when the controller was made. Now each run binds them again; a site the
    new selection adds, whose processor was made without the controller, gets it, and the block's end still puts
    back exactly the processors it found."""
    tr = sd3_pipe.transformer
    before = dict(tr.attn_processors)
    first, then = (("all", "transformer_blocks.0") if change == "a subset of the sites"
                   else ("transformer_blocks.0", "transformer_blocks.1"))
    reg = attnctl.AttentionRegulation(targets=["circle"], steps=1.0, sites=first)
    fresh = attnctl.AttentionRegulation(targets=["circle"], steps=1.0, sites=then)
    with attnctl.attach(sd3_pipe, [fresh]):
        expected = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
        assert {r.site for r in reg.records} == {s.name for s in select_sites(attnctl.list_sites(tr), first)}
        reg.config.sites = then
        out = sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert {r.site for r in reg.records} == {f"{then}.attn"}
    assert abs(out - expected).max() == 0
    assert tr.attn_processors == before


def test_softpag_heads_assigned_inside_attach_count_from_the_next_call(flux_pipe):
    """SoftPAG's heads were resolved once, at bind: inside an attach block a new head set was silently ignored (the
    images stayed those of the old heads). Now the next call perturbs the new heads, as a fresh control does."""
    def pag(heads):
        return attnctl.SoftPAG(heads=heads, scale=3.0)

    def call():
        return flux_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images

    with attnctl.attach(flux_pipe, [pag(["L1H0"])]):
        expected = call()
    with attnctl.attach(flux_pipe, [pag(["L1H0:"])]):
        old = call()
    control = pag(["L1H0:"])
    with attnctl.attach(flux_pipe, [control]):
        assert abs(call() - old).max() == 0
        control.config.heads = ["L1H0"]
        out = call()
    assert abs(out - expected).max() == 0 and abs(out - old).max() > 1e-4


def test_an_adaptive_schedule_assigned_inside_attach_adapts_from_the_next_call(sd3_pipe):
    """An Adaptive schedule assigned inside an attach block never adapted: whether a control reports its metrics
    was decided at bind. Now the next call binds again: the schedule is checked, reported to, and switches
    regulation off after the first step as it does when given before attaching."""
    from attnctl.schedules import Adaptive

    reg = attnctl.AttentionRegulation(targets=["circle"], steps=1.0)
    with attnctl.attach(sd3_pipe, [reg]):
        sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
        assert not reg.adaptive and sorted({r.step for r in reg.records}) == [0, 1, 2]
        reg.config.steps = Adaptive(1.0, "threshold", metric="loss", threshold=0.0)
        sd3_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
    assert reg.adaptive and sorted({r.step for r in reg.records}) == [0]
    assert len(reg.config.steps.history["loss"]) == 1


def test_settings_assigned_inside_attach_are_checked_at_the_next_call(sd3_pipe):
    """What construction refuses is refused at the next call too: two SoftPAGs sharing the perturbed rows with
    different scales (one w per row), and an Adaptive schedule on a metric the control does not report."""
    from attnctl.schedules import Adaptive

    a, b = attnctl.SoftPAG(heads=["L0H0"], scale=3.0), attnctl.SoftPAG(heads=["L1H0"], scale=3.0)
    with attnctl.attach(sd3_pipe, [a, b]):
        sd3_pipe("a red circle", **KW)
        b.config.scale = 5.0
        with pytest.raises(ConfigError, match="scale"):
            sd3_pipe("a red circle", **KW)
    reg = attnctl.AttentionRegulation(targets=["circle"])
    with attnctl.attach(sd3_pipe, [reg]):
        reg.config.steps = Adaptive(1.0, "threshold", metric="coverage", threshold=1)
        with pytest.raises(ScheduleError, match="reports no metric 'coverage'"):
            sd3_pipe("a red circle", **KW)


def test_entering_the_same_attach_twice_is_refused_and_the_outer_block_keeps_acting(sd3_pipe):
    """A nested ``with ctl:`` of the same controller restored the stock processors at its end: the rest of the outer
    block silently ran without the controls. Now entering it again is refused, and the outer block goes on."""
    tr = sd3_pipe.transformer
    before = dict(tr.attn_processors)
    probe = attnctl.AttentionProbe(words=["circle"])
    ctl = attnctl.attach(sd3_pipe, [probe])
    with ctl:
        with pytest.raises(ConfigError, match="with-block is already open"), ctl:
            pass
        assert ctl.following and tr.attn_processors != before
        sd3_pipe("a red circle", **KW)
        assert probe.word_maps()["circle"].sum() > 0
    assert tr.attn_processors == before and not ctl.attached
    with ctl:  # entered again after the block: a new block
        assert ctl.following
    assert tr.attn_processors == before


def test_an_attnctl_pipeline_pickles_after_a_call_with_controls(flux_pipe):
    """After a call with controls= the pipeline keeps its finished controller (pipe.attnctl), which pickles, but its
    controls held a weak reference to it and pickling failed ("cannot pickle 'weakref'"). A pickled control is
    unbound: the next controller binds it again."""
    import pickle

    pipe = _attnctl_pipe(flux_pipe)
    pag = attnctl.SoftPAG(heads=["L1H0"], scale=3.0)
    out = pipe("a red circle", controls=[pag], generator=torch.Generator().manual_seed(0), **KW).images
    twin = pickle.loads(pickle.dumps(pipe))
    copied = twin.attnctl.controls[0]
    assert copied.controller is None and pag.controller is pipe.attnctl
    again = twin("a red circle", controls=[copied], generator=torch.Generator().manual_seed(0), **KW).images
    assert copied.controller is twin.attnctl and abs(again - out).max() < 1e-6
