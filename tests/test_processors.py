"""attnctl processors with nothing active are the stock processors (SD3, SD3.5, FLUX), in fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import transformer_inputs
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import attnctl
from attnctl.processors import AttnCtlFluxProcessor, AttnCtlJointProcessor
from attnctl.processors.attend import backend_name

CASES = [
    ("sd3_pipe", (4, 4), 2),
    ("sd3_pipe", (3, 5), 3),  # non-square grid, odd batch
    ("sd35_pipe", (4, 4), 2),
    ("sd35_pipe", (5, 2), 1),
    ("flux_pipe", (4, 4), 2),
    ("flux_pipe", (2, 6), 3),
]


def _run(transformer, kw):
    with torch.no_grad():
        return transformer(**kw)[0]


@pytest.mark.parametrize("fixture,grid,batch", CASES)
def test_no_control_equals_stock_fp32(request, fixture, grid, batch):
    pipe = request.getfixturevalue(fixture)
    tr = pipe.transformer
    kw = transformer_inputs(tr, batch=batch, grid=grid)
    stock = _run(tr, kw)
    with attnctl.attach(pipe, []):
        procs = set(type(p) for p in tr.attn_processors.values())
        assert procs <= {AttnCtlJointProcessor, AttnCtlFluxProcessor}
        ours = _run(tr, kw)
    assert (ours - stock).abs().max().item() <= 1e-6
    # restored: the stock processors are back
    assert not any(isinstance(p, (AttnCtlJointProcessor, AttnCtlFluxProcessor)) for p in tr.attn_processors.values())


@pytest.mark.parametrize("fixture", ["sd3_pipe", "sd35_pipe", "flux_pipe"])
def test_no_control_equals_stock_bf16(request, fixture):
    tr = copy.deepcopy(request.getfixturevalue(fixture).transformer).to(torch.bfloat16)
    kw = transformer_inputs(tr, batch=2, grid=(3, 4), dtype=torch.bfloat16)
    stock = _run(tr, kw)
    ctl = attnctl.Controller(tr)
    tr.set_attn_processor(ctl.processors())
    ours = _run(tr, kw)
    ctl.close()
    assert ours.dtype == torch.bfloat16
    # Same kernels in the same dtype: agreement far inside bf16 resolution (8 bits of mantissa).
    assert (ours.float() - stock.float()).abs().max().item() <= 2e-2 * stock.float().abs().max().item()


def test_flux_attention_mask_and_rope_match_stock(flux_pipe):
    tr = flux_pipe.transformer
    kw = transformer_inputs(tr, batch=2, grid=(3, 3), text_len=6)
    n = 6 + 9
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 4:6] = False  # padding text tokens of the first prompt
    kw["joint_attention_kwargs"] = {"attention_mask": mask}
    stock = _run(tr, kw)
    with attnctl.attach(flux_pipe, []):
        ours = _run(tr, kw)
    assert (ours - stock).abs().max().item() <= 1e-6
    kw.pop("joint_attention_kwargs")
    assert (_run(tr, kw) - stock).abs().max().item() > 1e-4  # the mask mattered


def test_design_card_usage_set_attn_processor(sd3_pipe):
    tr = sd3_pipe.transformer
    saved = dict(tr.attn_processors)
    kw = transformer_inputs(tr)
    stock = _run(tr, kw)
    ctl = attnctl.Controller(sd3_pipe)
    tr.set_attn_processor(ctl.processors())
    try:
        assert (_run(tr, kw) - stock).abs().max().item() <= 1e-6
    finally:
        ctl.close()
        tr.set_attn_processor(saved)


def test_restored_when_the_call_raises(sd3_pipe):
    tr = sd3_pipe.transformer
    before = dict(tr.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), attnctl.attach(sd3_pipe, []):
        raise RuntimeError("boom")
    assert tr.attn_processors == before
    assert not tr._forward_pre_hooks
    assert "encode_prompt" not in vars(sd3_pipe)


def test_pipeline_restores_processors_after_error(sd3_pipe):
    from attnctl.pipelines import AttnCtlSD3Pipeline

    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    before = dict(pipe.transformer.attn_processors)
    probe = attnctl.AttentionProbe(words=["circle"])
    with pytest.raises(attnctl.errors.LayoutError, match="not in the prompt"):
        pipe("a red square", num_inference_steps=1, height=32, width=32, controls=[probe], output_type="np")
    assert pipe.transformer.attn_processors == before


def test_backend_routing_through_the_dispatcher(flux_pipe, monkeypatch):
    """set_attention_backend reaches attnctl processors, and their attention goes through the dispatcher."""
    tr = copy.deepcopy(flux_pipe.transformer)
    ctl = attnctl.Controller(tr)
    tr.set_attn_processor(ctl.processors())
    name = AttentionBackendName._NATIVE_MATH
    calls = []
    original = _AttentionBackendRegistry._backends[name]

    def spy(**kwargs):
        calls.append(kwargs["query"].shape)
        return original(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    try:
        tr.set_attention_backend("_native_math")
        assert all(p._attention_backend == name for p in tr.attn_processors.values())
        _run(tr, transformer_inputs(tr))
        assert len(calls) == len(ctl.sites)
    finally:
        tr.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        ctl.close()


def test_a_chosen_native_kernel_also_runs_where_a_control_needs_the_lse(flux_pipe, monkeypatch):
    """A probe needs every row's LSE, which the CPU flash kernel gives with the output. A user who chose another
    kernel by name (here the math one) gets it there too — through the dispatcher, the LSE computed beside it — and
    the probe leaves the output exactly as the stock run under that kernel."""
    from attnctl.layout import TokenLayout

    tr = copy.deepcopy(flux_pipe.transformer)
    inputs = transformer_inputs(tr)
    name = AttentionBackendName._NATIVE_MATH
    calls = []
    original = _AttentionBackendRegistry._backends[name]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name,
                        lambda **kw: calls.append(1) or original(**kw))
    try:
        tr.set_attention_backend("_native_math")
        plain = _run(tr, inputs)
        calls.clear()
        ctl = attnctl.Controller(tr, [attnctl.AttentionProbe()], roles=["cond"] * 2,
                                 layout=TokenLayout("flux", 7, (4, 4)))
        tr.set_attn_processor(ctl.processors())
        ctl.begin_run(1)
        probed = _run(tr, inputs)
        assert len(calls) == len(ctl.sites) and torch.equal(plain, probed)
    finally:
        tr.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_new_processors_keep_the_backend_they_replace(sd3_pipe):
    tr = copy.deepcopy(sd3_pipe.transformer)
    try:
        tr.set_attention_backend("_native_math")
        procs = attnctl.Controller(tr).processors()
        # SD3's stock processor has no backend slot: the dispatcher's active backend is what applies.
        effective = {backend_name(p._attention_backend) for p in procs.values()}
        assert effective == {AttentionBackendName._NATIVE_MATH}
    finally:
        tr.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_unavailable_backend_is_an_error(sd3_pipe):
    tr = copy.deepcopy(sd3_pipe.transformer)
    with pytest.raises((RuntimeError, ImportError, ValueError)):
        tr.set_attention_backend("xformers")  # not installed on CPU machines
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_pipeline_end_to_end_equals_stock(sd35_pipe, flux_pipe):
    for pipe in (sd35_pipe, flux_pipe):
        kw = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=24, output_type="np")
        a = pipe("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
        with attnctl.attach(pipe, []):
            b = pipe("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
        assert abs(a - b).max() <= 1e-6


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_after_fuse_qkv_projections(family):
    """After ``transformer.fuse_qkv_projections()`` (FLUX's processor then reads ``to_qkv`` / ``to_added_qkv``),
    attnctl processors give the unfused stock result, and a control acts. Stock SD3.5 itself fails once fused
    (diffusers 0.42 puts the fused joint processor on the image-only attn2 as well), so it is compared unfused."""
    from attnctl.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_flux_pipeline() if family == "flux" else tiny_sd3_pipeline(family)  # own modules: fusing edits them

    def gen():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=32,
                    width=32, max_sequence_length=24, output_type="latent").images

    plain = gen()
    pipe.transformer.fuse_qkv_projections()
    assert all(getattr(m, "fused_projections", False) for m in pipe.transformer.modules() if hasattr(m, "to_qkv"))
    if family != "sd35":
        assert (gen() - plain).abs().max() <= 1e-5  # the stock fused processors
    with attnctl.attach(pipe, []):
        fused = gen()
    with attnctl.attach(pipe, [attnctl.SoftPAG(heads=["L0H1"], scale=2.0)]):
        guided = gen()
    assert (fused - plain).abs().max() <= 1e-5
    assert (guided - plain).abs().max() > 1e-4


class _Everything(attnctl.Control):
    """A test control that uses every contribution type (on whatever device the call is on)."""

    kind = "test-everything"

    def contribute(self, call, q, k, v, state):
        from attnctl.processors.contributions import DenseBias, KeyBias, OutputMix, Selection

        cols = torch.arange(2, device=call.device) + call.text_slice().start
        heads = torch.tensor([0], device=call.device)
        return [
            KeyBias(cols, torch.ones(1, 1, 1, 2, device=call.device), Selection(rows=call.image_slice())),
            DenseBias(lambda r0, r1: torch.zeros(1, r1 - r0, 1, call.seq_len, device=call.device),
                      Selection(heads=heads)),
            OutputMix(lambda o, q_, k_, v_: 0.5 * o + 0.5 * v_[:, : o.shape[1]], Selection(heads=heads)),
        ]


@pytest.mark.parametrize("fixture", ["sd35_pipe", "flux_pipe"])
def test_device_agnostic_on_the_meta_device(request, fixture):
    """Shape-only run on the meta device with controls active: any tensor made on a fixed device would fail."""
    pipe = request.getfixturevalue(fixture)
    tr = copy.deepcopy(pipe.transformer).to("meta")
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in transformer_inputs(tr).items()}
    probe = attnctl.AttentionProbe(tokens=[0, 2])
    with attnctl.attach(tr, [probe, _Everything()]):
        out = tr(**kw)[0]
    assert out.device.type == "meta" and probe._sum.device.type == "meta"


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_lora_on_the_projections_takes_part(request, fixture):
    """A LoRA adapter on the attention projections acts through attnctl's processors exactly as through stock."""
    import peft  # a dev dependency: diffusers' LoRA support is built on it
    tr = copy.deepcopy(request.getfixturevalue(fixture).transformer)
    kw = transformer_inputs(tr, batch=2, grid=(4, 4))
    plain = _run(tr, kw)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
    tr.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    stock = _run(tr, kw)
    assert (stock - plain).abs().max().item() > 1e-3  # the adapter changes the output
    ctl = attnctl.Controller(tr, [attnctl.AttentionProbe(tokens=[0])])
    tr.set_attn_processor(ctl.processors())
    ctl.begin_run(1, layout=attnctl.TokenLayout(ctl.family, kw["encoder_hidden_states"].shape[1], (4, 4)))
    ours = _run(tr, kw)
    ctl.close()
    assert (ours - stock).abs().max().item() <= 1e-5
