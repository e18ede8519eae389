"""RF-Inversion's controllers: the controlled inversion and edit against plain loops written here, their exact end
points (γ = 1 ends on the noise sample, η = 1 on the source image) on both toys and both solvers, and bad input."""

from __future__ import annotations

import pytest
import torch

from attnctl import RFInversion, UnifyEdit, edit, invert
from attnctl.errors import ConfigError
from attnctl.inversion import encode_image, flow_velocity, run_sigmas
from attnctl.midpoint import FlowMatchMidpointScheduler
from attnctl.rf_inversion import noise_sample, toward_image, toward_noise

SOURCE, TARGET = "a red circle and a blue square", "a green circle and a blue square"


def _midpoint(pipe):
    return type(pipe)(**{**pipe.components, "scheduler": FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)})


# ------------------------------------------------------------------------------------------ math


def test_the_two_pulls_are_the_straight_lines_to_their_end_points():
    z, v, y = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    steered = toward_noise(lambda zz, s: v, y, 0.25)
    torch.testing.assert_close(steered(z, 0.4), 0.75 * v + 0.25 * (y - z) / 0.6)
    torch.testing.assert_close(toward_image(v, z, y, 0.4, 0.25), 0.75 * v + 0.25 * (z - y) / 0.4)
    assert toward_noise(steered, y, 0.0) is steered and toward_image(v, z, y, 0.4, 0.0) is v
    with pytest.raises(ConfigError, match="undefined at σ = 1.0"):
        steered(z, 1.0)
    with pytest.raises(ConfigError, match="undefined at σ = 0.0"):
        toward_image(v, z, y, 0.0, 0.5)
    on_meta = torch.empty(2, 5, device="meta", dtype=torch.bfloat16)  # the model's output on another device: the
    assert toward_image(on_meta, z, y, 0.4, 0.5).device.type == "meta"  # lines are taken there (CPU offload, GPU)
    assert toward_noise(lambda zz, s: on_meta, y, 0.5)(z, 0.4).dtype == torch.bfloat16
    a, b = noise_sample(z, 3), noise_sample(z.to(torch.bfloat16), 3)
    assert torch.equal(a, noise_sample(z, 3)) and b.dtype == torch.bfloat16 and not torch.equal(a, noise_sample(z, 4))


@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_controlled_inversion_is_the_plain_loop_with_the_pull_and_gamma_one_ends_on_the_noise(model, scene, request):
    pipe = request.getfixturevalue(model)
    steps, gamma = 5, 0.5
    path = invert(pipe, scene, SOURCE, steps, gamma=gamma, seed=7)
    z0 = encode_image(pipe, scene)
    y1 = noise_sample(z0, 7)
    s = [float(x) for x in run_sigmas(pipe, steps, 32, 32)]
    velocity = flow_velocity(pipe, SOURCE, 32, 32)
    z = z0
    for i in range(steps - 1, -1, -1):  # the reference: plain Euler inversion with the pull written out
        v = velocity(z, s[i + 1])
        z = z + (s[i] - s[i + 1]) * (v + gamma * ((y1 - z) / (1 - s[i + 1]) - v))
    torch.testing.assert_close(path[0], z, atol=1e-5, rtol=1e-5)
    plain = invert(pipe, scene, SOURCE, steps)
    assert torch.equal(invert(pipe, scene, SOURCE, steps, gamma=0.0, seed=7)[0], plain[0])
    assert float((path[0] - plain[0]).abs().mean()) > 1e-2
    for p in (pipe, _midpoint(pipe)):  # γ = 1: every step lands on the line to y_1, the last one on y_1
        ends = invert(p, scene, SOURCE, steps, gamma=1.0, seed=7)
        assert len(ends) == steps * p.scheduler.order + 1
        torch.testing.assert_close(ends[0], y1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_the_edit_pull_is_the_plain_loop_with_the_pull_and_the_source_still_replays(model, scene, request):
    pipe = request.getfixturevalue(model)
    steps = 6
    rf = RFInversion(gamma=0.5, eta="window(0.9, 0, 0.4)", seed=2)
    res = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), rf=rf, output_type="latent",
               guidance_scale=1.0)
    path = res.path
    torch.testing.assert_close(path[0], invert(pipe, scene, SOURCE, steps, gamma=0.5, seed=2)[0])
    torch.testing.assert_close(res.source.float()[None], path[-1].float(), atol=1e-4, rtol=0)
    s = [float(x) for x in run_sigmas(pipe, steps, 32, 32)]
    velocity = flow_velocity(pipe, TARGET, 32, 32, guidance=1.0)
    y0, z = path[-1], path[0]
    etas = [0.9 if i / (steps - 1) < 0.4 else 0.0 for i in range(steps)]  # the window [0, 0.4) of the run
    for i in range(steps):  # the reference: the target prompt's Euler loop with the pull written out
        v = velocity(z, s[i])
        z = z + (s[i + 1] - s[i]) * (v + etas[i] * ((z - y0) / s[i] - v))
    torch.testing.assert_close(res.edited.float()[None], z.float(), atol=1e-4, rtol=1e-4)
    plain = edit(pipe, scene, SOURCE, TARGET, steps, control=UnifyEdit(scale=0.0), path=path, output_type="latent",
                 guidance_scale=1.0)  # the same inversion without the edit pull
    assert float((plain.edited.float() - res.edited.float()).abs().mean()) > 1e-3


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("model", ["toy_sd3", "toy_flux"])
def test_eta_one_throughout_gives_back_the_source_image_through_every_call_of_a_step(model, solver, scene, request):
    """With η = 1 at every step each update follows the straight line to y_0, so the target ends on the image
    whatever the prompt says: also with CFG and SD3's skip-layer pass or FLUX's true-CFG call (the pull is affine
    with weights summing to one, so every combination of the calls keeps it), under UnifyEdit's moves, and under the
    midpoint step (whose midpoint lies on the same line)."""
    pipe = request.getfixturevalue(model)
    pipe = _midpoint(pipe) if solver == "midpoint" else pipe
    extra = ({"skip_guidance_layers": [1], "guidance_scale": 4.5} if model == "toy_sd3"
             else {"true_cfg_scale": 2.0, "guidance_scale": 1.0, "negative_prompt": ["a blue circle"] * 2})
    guided = UnifyEdit()
    res = edit(pipe, scene, SOURCE, TARGET, 4, control=guided, rf=RFInversion(eta=1.0), output_type="latent",
               **extra)
    assert guided.history  # the latent guidance ran too
    torch.testing.assert_close(res.edited.float()[None], res.path[-1].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.source.float()[None], res.path[-1].float(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ settings, bad input


def test_settings_round_trip_through_json_and_bad_values_are_named(toy_sd3, scene):
    rf = RFInversion(gamma=0.3, eta="linear(1, 0)", seed=5)
    again = RFInversion.from_json(rf.to_json())
    assert again == rf and again.eta(0, 5) == 1.0
    assert RFInversion().to_json()["gamma"] == 0.5 and RFInversion().eta(0, 28) == 0.9 and RFInversion().eta(7, 28) == 0
    for kwargs, match in [({"gamma": 1.5}, "gamma: Input should be less than or equal to 1"),
                          ({"eta": -0.1}, "eta: .*outside the allowed range"),
                          ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
                          ({"seed": 2**64}, "seed: Input should be less than or equal to 9223372036854775807"),
                          ({"eta_stop": 0.3}, "eta_stop: Extra inputs are not permitted"),
                          ({"gamma": True}, "settings: gamma=True is a true/false flag, not a number"),
                          ({"seed": "7"}, "settings: seed='7' is a string, not a number")]:
        with pytest.raises(ConfigError, match=match):
            RFInversion(**kwargs)
    assert RFInversion(gamma=0.0, eta=0.0, seed=4).canonical() is None  # neither controller acts
    assert RFInversion(gamma=0.0, seed=4).canonical() == RFInversion(gamma=0.0, seed=0)  # no noise sample is drawn
    assert RFInversion(seed=4).canonical() == RFInversion(seed=4)
    with pytest.raises(ConfigError, match="RF-Inversion settings are a JSON object, got list"):
        RFInversion.from_json([0.5])
    with pytest.raises(ConfigError, match="rf takes RF-Inversion's settings, got dict"):
        edit(toy_sd3, scene, SOURCE, TARGET, 2, rf={"gamma": 0.5})
    with pytest.raises(ConfigError, match="gamma: Input should be less than or equal to 1"):
        invert(toy_sd3, scene, SOURCE, 2, gamma=2.0)


def test_an_inversion_at_hand_is_used_as_given_and_saves_as_plain_tensors(toy_sd3, scene, tmp_path):
    """A path passed to edit() is the inversion (rf's gamma and seed shape only one edit() makes itself), and what
    invert() returns is a plain list of tensors, which torch.load reads back with weights_only."""
    pulled = invert(toy_sd3, scene, SOURCE, 3, gamma=0.5, seed=1)
    torch.save(pulled, tmp_path / "path.pt")
    again = torch.load(tmp_path / "path.pt", weights_only=True)
    assert type(again) is list and all(torch.equal(a, b) for a, b in zip(again, pulled, strict=True))
    given = edit(toy_sd3, scene, SOURCE, TARGET, 3, path=again, rf=RFInversion(gamma=0.5, seed=1),
                 control=UnifyEdit(scale=0), output_type="latent", guidance_scale=1.0)
    made = edit(toy_sd3, scene, SOURCE, TARGET, 3, rf=RFInversion(gamma=0.5, seed=1), control=UnifyEdit(scale=0),
                output_type="latent", guidance_scale=1.0)
    assert torch.equal(given.edited, made.edited)


@pytest.mark.parametrize("steps", [5, 9])
def test_eta_s_window_covers_the_same_denoising_steps_under_either_scheduler(toy_sd3, scene, steps, monkeypatch):
    """The schedules of an edit count denoising steps: under the midpoint scheduler (two calls a step) RF-Inversion's
    η and UnifyEdit's step size are on at the same steps as under Euler, and at both calls of each."""
    from attnctl.editing import EditBranches

    pulled: list[tuple[int, int]] = []
    real = EditBranches._pull

    def pull(self, step, num_steps, z, sigma, y0):
        out = real(self, step, num_steps, z, sigma, y0)
        if out is not None:
            pulled.append((self.controller.state.step, step))
        return out

    monkeypatch.setattr(EditBranches, "_pull", pull)
    seen = {}
    for name, pipe in (("euler", toy_sd3), ("midpoint", _midpoint(toy_sd3))):
        pulled.clear()
        guided = UnifyEdit(scale="window(0.01, 0, 0.3)")
        edit(pipe, scene, SOURCE, TARGET, steps, control=guided, rf=RFInversion(), output_type="latent",
             guidance_scale=1.0)
        seen[name] = (sorted({s for _, s in pulled}), [c for c, _ in pulled], sorted({h.step for h in guided.history}))
    euler_steps = [i for i in range(steps) if i / (steps - 1) < 0.25]
    assert seen["euler"][0] == seen["midpoint"][0] == euler_steps
    assert seen["midpoint"][1] == [c for i in euler_steps for c in (2 * i, 2 * i + 1)]  # both calls of a step
    assert seen["midpoint"][2] == seen["euler"][2]  # UnifyEdit's guided steps: the same ones (denoising steps)


@pytest.mark.parametrize("name", ["toy-sd3", "toy-flux"])
def test_in_bf16_eta_one_still_gives_back_the_source_image_to_bf16_resolution(name, scene):
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline(name, dtype=torch.bfloat16)
    res = edit(pipe, scene, SOURCE, TARGET, 4, rf=RFInversion(eta=1.0), output_type="latent")
    assert res.edited.dtype == res.path[0].dtype == torch.bfloat16
    y0 = res.path[-1].float()
    resolution = 2.0 ** -7 * float(y0.abs().max())  # bf16 keeps 8 significant bits
    assert float((res.edited.float()[None] - y0).abs().max()) <= 2 * resolution
