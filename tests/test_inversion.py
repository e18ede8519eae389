"""Rectified-flow inversion: the Euler path, the pipeline's noise grid, reconstruction of real images, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnctl.editing import edit
from attnctl.errors import ConfigError
from attnctl.inversion import encode_image, euler_invert, image_array, invert, run_sigmas


def test_euler_invert_matches_a_plain_backward_loop_and_is_exact_for_a_constant_flow():
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0])
    z0 = torch.randn(2, 3)
    drift = torch.randn(2, 3)

    def velocity(z, s):
        return drift + 0.5 * s * z

    path = euler_invert(velocity, z0, sigmas)
    assert len(path) == 5 and torch.equal(path[-1], z0)
    z = z0.clone()  # the reference, written out: step up from σ_4 = 0 to σ_0 = 1
    expected = [z0]
    for i in (3, 2, 1, 0):
        z = z + (sigmas[i] - sigmas[i + 1]) * (drift + 0.5 * sigmas[i + 1] * z)
        expected.append(z)
    for got, want in zip(path, expected[::-1], strict=True):
        torch.testing.assert_close(got, want)

    constant = euler_invert(lambda z, s: drift, z0, sigmas)
    z = constant[0]  # a forward Euler sampler over the same grid returns exactly to z0
    for i in range(4):
        z = z + (sigmas[i + 1] - sigmas[i]) * drift
    torch.testing.assert_close(z, z0)


def test_euler_invert_refuses_a_grid_that_does_not_decrease():
    with pytest.raises(ConfigError, match="decreasing noise grid"):
        euler_invert(lambda z, s: z, torch.zeros(1), torch.tensor([0.0, 0.5, 1.0]))


def _used_sigmas(pipe, call):
    seen = {}

    def grab(p, i, t, kw):
        seen.setdefault("sigmas", p.scheduler.sigmas.clone())
        return kw

    pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=grab, **call)
    return seen["sigmas"]


@pytest.mark.parametrize("model", ["toy-sd3", "toy-flux"])
def test_run_sigmas_are_the_grid_the_pipeline_steps_over(model):
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline

    pipe = load_pipeline(model)
    call = default_call_kwargs(pipe)
    pipe.scheduler.set_timesteps(3, mu=0.7)  # some other run's state: asking for a grid must leave it alone
    before = (pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone(), pipe.scheduler.num_inference_steps)
    got = run_sigmas(pipe, call["num_inference_steps"], call["height"], call["width"])
    assert len(got) == call["num_inference_steps"] + 1
    torch.testing.assert_close(pipe.scheduler.sigmas, before[0])
    torch.testing.assert_close(pipe.scheduler.timesteps, before[1])
    assert pipe.scheduler.num_inference_steps == before[2] == 3
    torch.testing.assert_close(got, _used_sigmas(pipe, call).float().cpu())


@pytest.mark.parametrize("model", ["toy-sd3", "toy-flux"])
def test_inverted_noise_reconstructs_the_image(model):
    """A rendered scene (a 'real' image to the model) comes back from its inverted noise to within a few grey levels,
    while the same prompt from fresh noise draws a different picture."""
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set, render, scene_from_item

    pipe = load_pipeline(model)
    call = default_call_kwargs(pipe)
    call["guidance_scale"] = 1.0
    item = prompt_set("pair")[0]
    image = render(scene_from_item(item), call["height"])
    path = invert(pipe, image, item["prompt"], call["num_inference_steps"])
    assert len(path) == call["num_inference_steps"] + 1
    torch.testing.assert_close(path[-1], encode_image(pipe, image))
    back = np.asarray(pipe(item["prompt"], latents=path[0], **call).images[0]).astype(float)
    fresh = np.asarray(pipe(item["prompt"], generator=torch.Generator().manual_seed(0), **call).images[0]).astype(float)
    error, other = np.abs(back - image).mean(), np.abs(fresh - image).mean()
    assert error < 3.0, error
    assert error < 0.1 * other, (error, other)


def test_inversion_bad_input_is_named(sd3_pipe):
    ok = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="uint8"):
        encode_image(sd3_pipe, ok.astype(np.float32))
    with pytest.raises(ConfigError, match="multiples of"):
        encode_image(sd3_pipe, np.zeros((30, 32, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="smaller than the smallest side attnctl takes, 8 px"):
        encode_image(sd3_pipe, np.zeros((4, 32, 3), dtype=np.uint8))  # a multiple of 4, as the model needs
    with pytest.raises(ConfigError, match="one prompt"):
        invert(sd3_pipe, ok, ["a", "b"], 4)
    with pytest.raises(ConfigError, match="steps, at least one"):
        invert(sd3_pipe, ok, "a red circle", 0)
    with pytest.raises(ConfigError, match="whole number of steps"):  # a bare TypeError deep in the scheduler
        invert(sd3_pipe, ok, "a red circle", 2.5)
    for bad in (float("nan"), float("inf"), -1.0):  # NaN made NaN paths and black images
        with pytest.raises(ConfigError, match="is not a guidance scale"):
            invert(sd3_pipe, ok, "a red circle", 2, guidance=bad)
        with pytest.raises(ConfigError, match="guidance_scale=.* is not a guidance scale"):
            edit(sd3_pipe, ok, "a red circle", "a blue circle", 2, guidance_scale=bad)


def test_the_inversion_encodes_the_prompt_at_the_length_the_pipeline_call_uses():
    """FLUX's call encodes 512 T5 tokens by default and SD3's 256; the inversion used 256 for both, so the documented
    round trip ``pipe(prompt, latents=path[0])`` on FLUX.1 saw another prompt than the inversion. A tokenizer with a
    shorter limit (the toy models) keeps its limit."""
    from attnctl.inversion import text_length
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
    from attnctl.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    flux, sd3 = tiny_flux_pipeline(), tiny_sd3_pipeline()
    assert text_length(flux) == flux.tokenizer_2.model_max_length < 256  # the tiny models' own limit
    flux.tokenizer_2.model_max_length = sd3.tokenizer_3.model_max_length = 512  # as FLUX.1's and SD3's T5
    assert text_length(flux) == text_length(AttnCtlFluxPipeline(**flux.components)) == 512
    assert text_length(sd3) == text_length(AttnCtlSD3Pipeline(**sd3.components)) == 256
    assert text_length(flux, 128) == 128


def test_inversion_refuses_a_scheduler_without_the_euler_step():
    from diffusers import FlowMatchHeunDiscreteScheduler

    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline("toy-sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ConfigError, match="FlowMatchEulerDiscreteScheduler"):
        invert(pipe, np.zeros((32, 32, 3), dtype=np.uint8), "a red circle", 4)


def test_image_files_are_read_upright_in_eight_bits_and_bombs_are_refused(tmp_path, monkeypatch):
    """A 16-bit greyscale PNG came out white (PIL's conversion clips it), a phone JPEG sideways (EXIF orientation
    ignored), and a decompression bomb as a PIL traceback."""
    from PIL import Image

    from attnctl.errors import AttnCtlError
    from attnctl.imageio import read_image

    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 … 64512
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    got = read_image(tmp_path / "grey16.png")
    assert got.shape == (8, 8, 3) and np.array_equal(got[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert np.array_equal(image_array(Image.open(tmp_path / "grey16.png")), got)

    upright = np.zeros((8, 16, 3), np.uint8)
    upright[:, :8] = 255  # white on the left
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to show
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    assert np.array_equal(read_image(tmp_path / "phone.png"), upright)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the 64-pixel ramp is now more than twice the limit
    with pytest.raises(AttnCtlError, match="decompression bomb.*downscale"):
        read_image(tmp_path / "grey16.png")


def test_inversion_refuses_attached_controls_before_any_model_call(toy_sd3, scene):
    """The inversion calls the transformer itself, so it ran through any attached control: SoftPAG or regulation
    changed the inverted noise without a word, and after a pipeline call the control failed inside the model (step n
    of an n-step run). It is refused before the first model call, also for processors left installed by
    ``ctl.close()``; a controller with no controls, and the pipeline after the with-block, give the plain inversion."""
    from attnctl import AttentionRegulation, Controller, SoftPAG, attach
    from attnctl.inversion import flow_velocity
    from attnctl.toyworld.models import default_call_kwargs

    prompt = "a red circle and a blue square"
    plain = invert(toy_sd3, scene, prompt, 4)
    call = {**default_call_kwargs(toy_sd3), "num_inference_steps": 2, "output_type": "latent"}
    calls = []
    hook = toy_sd3.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for control in (SoftPAG(heads="L1H0"), AttentionRegulation(targets=["circle"])):
            name = type(control).__name__
            with attach(toy_sd3, [control]):
                for _ in range(2):  # on a fresh run, then with the scheduler left at the end of a pipeline call
                    calls.clear()
                    with pytest.raises(ConfigError, match=rf"controller with {name} is attached.*Fix: invert before "
                                                          "attaching"):
                        invert(toy_sd3, scene, prompt, 4)
                    with pytest.raises(ConfigError, match="invert before attaching"):
                        flow_velocity(toy_sd3, prompt, 32, 32)
                    assert not calls
                    toy_sd3(prompt, **call)
        ctl = Controller(toy_sd3, [AttentionRegulation(targets=["circle"])])
        toy_sd3.transformer.set_attn_processor(ctl.processors())
        ctl.close()  # the hooks go; the processors stay, and still act
        try:
            with pytest.raises(ConfigError, match="AttentionRegulation is attached"):
                invert(toy_sd3, scene, prompt, 4)
        finally:
            ctl.restore()
    finally:
        hook.remove()
    with attach(toy_sd3, []):
        torch.testing.assert_close(invert(toy_sd3, scene, prompt, 4)[0], plain[0])
    assert torch.equal(invert(toy_sd3, scene, prompt, 4)[0], plain[0])


def test_inversion_refuses_invert_sigmas_naming_the_setting(toy_sd3, scene):
    """A scheduler with invert_sigmas=True runs its grid from the image up: the error said "pass the scheduler's
    sigmas after set_timesteps", which no caller of invert() can do."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    source, target = "a red circle and a blue square", "a green circle and a blue square"
    path = invert(toy_sd3, scene, source, 4)
    own = toy_sd3.scheduler
    toy_sd3.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own.config, invert_sigmas=True)
    try:
        with pytest.raises(ConfigError, match=r"invert_sigmas=True.*Fix: set invert_sigmas=False"):
            invert(toy_sd3, scene, source, 4)
        for given in (None, path):  # the edit's own inversion, or its control's check of the scheduler
            with pytest.raises(ConfigError, match=r"invert_sigmas=True.*Fix: set invert_sigmas=False"):
                edit(toy_sd3, scene, source, target, 4, path=given)
    finally:
        toy_sd3.scheduler = own
