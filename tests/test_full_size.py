"""Full-size SD3-medium, SD3.5-large/medium and FLUX.1-dev transformers on the meta device (no weights):
attnctl finds every site with the right head counts and its processors install and restore."""

from __future__ import annotations

import pytest

import attnctl
from attnctl.configs import build_empty, transformer_config
from attnctl.errors import SiteError
from attnctl.processors import AttnCtlFluxProcessor, AttnCtlJointProcessor

EXPECTED = {
    # name: (sites, heads per site, head_dim, kinds)
    "sd3-medium": (24, 24, 64, {"sd3_joint": 24}),
    "sd3.5-medium": (24 + 13, 24, 64, {"sd3_joint": 24, "sd3_image": 13}),
    "sd3.5-large": (38, 38, 64, {"sd3_joint": 38}),
    "flux.1-dev": (57, 24, 128, {"flux_double": 19, "flux_single": 38}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sites_and_processors_on_full_size_configs(name):
    tr = build_empty(transformer_config(name))
    assert {t.device.type for t in [*tr.parameters(), *tr.buffers()]} == {"meta"}  # SD3's pos_embed table too
    n, heads, head_dim, kinds = EXPECTED[name]
    sites = attnctl.list_sites(tr)
    assert len(sites) == n
    assert {s.heads for s in sites} == {heads} and {s.head_dim for s in sites} == {head_dim}
    counts = {}
    for s in sites:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    assert counts == kinds
    before = dict(tr.attn_processors)
    probe = attnctl.AttentionProbe(tokens=[0])
    with attnctl.attach(tr, [probe]) as ctl:
        installed = tr.attn_processors
        assert len(installed) == n
        assert all(isinstance(p, (AttnCtlJointProcessor, AttnCtlFluxProcessor)) for p in installed.values())
        assert all(p.site.name + ".processor" == key for key, p in installed.items())
        assert len(ctl.sites) == n
    assert tr.attn_processors == before


def test_a_full_size_sd3_skeleton_runs_on_the_meta_device():
    """A shape-only forward of the skeleton, attnctl's processors installed: every tensor stays on the meta device
    (SD3's positional embedding included)."""
    import torch

    tr = build_empty(transformer_config("sd3.5-medium"))
    kw = {"hidden_states": torch.empty(1, 16, 32, 32), "encoder_hidden_states": torch.empty(1, 8, 4096),
          "pooled_projections": torch.empty(1, 2048), "timestep": torch.empty(1)}
    with attnctl.attach(tr, [attnctl.AttentionProbe(tokens=[0])]), torch.no_grad():
        out = tr(**{k: v.to("meta") for k, v in kw.items()}, return_dict=False)[0]
    assert out.device.type == "meta" and out.shape == (1, 16, 32, 32)


def test_head_notation_on_flux_dev():
    tr = build_empty(transformer_config("flux.1-dev"))
    sites = attnctl.list_sites(tr)
    hs = attnctl.HeadSet.parse(sites, ["L0H3", "L56H23", "single_transformer_blocks.0.attn/H0:2"])
    assert hs.heads == {
        "transformer_blocks.0.attn": (3,),
        "single_transformer_blocks.37.attn": (23,),
        "single_transformer_blocks.0.attn": (0, 1),
    }
    assert len(attnctl.select_sites(sites, "transformer_blocks.1")) == 1  # never blocks 10-18


def test_a_full_size_pipeline_skeleton_from_its_configs_alone(tmp_path):
    """What `attnctl batch` checks items against: FLUX.1-dev's transformer from its config, on the meta device."""
    import json

    from attnctl.cli import check_size
    from attnctl.errors import AttnCtlError
    from attnctl.skeleton import pipeline_skeleton
    from attnctl.testing import flux_scheduler

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer_config("flux.1-dev")))
    flux_scheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "vae").mkdir()  # FLUX.1-dev's autoencoder: four blocks, 8 px per latent cell
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                               "block_out_channels": [128, 256, 512, 512]}))
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    skeleton = pipeline_skeleton(str(tmp_path))
    assert all(p.device.type == "meta" for p in skeleton.transformer.parameters())
    assert skeleton.tokenizer is None  # no tokenizer folder: no vocabulary check
    assert skeleton.vae_scale_factor == 8
    check_size(skeleton, 1024, 768)  # FLUX's sides: multiples of 16 px, no largest side
    check_size(skeleton, 4096, 4096)
    with pytest.raises(AttnCtlError, match="--width 1000 is not a multiple of 16 px.*give --width 992 or 1008"):
        check_size(skeleton, 1024, 1000)
    ctl = attnctl.Controller(skeleton, [attnctl.SoftPAG(heads=["L56H23"]), attnctl.LayoutGuidance(
        boxes={"cat": [0, 0, 0.5, 0.5]})])
    assert len(ctl.sites) == EXPECTED["flux.1-dev"][0]
    with pytest.raises(SiteError, match="L57"):
        attnctl.Controller(skeleton, [attnctl.SoftPAG(heads=["L57H0"])])
