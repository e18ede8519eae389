"""RF-Solver's midpoint step: the scheduler's grid and update against the rule written out, its order, the
midpoint inversion, the stock pipelines running it, reconstruction on the toys, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from attnctl.errors import ConfigError
from attnctl.inversion import euler_invert, flow_velocity, invert, midpoint_invert, run_sigmas
from attnctl.midpoint import FlowMatchMidpointScheduler, step_anchor
from attnctl.testing import flux_scheduler


def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth flow that bends in both ``z`` and ``σ``, so no first-order rule is exact on it."""
    return -z * np.cos(3.0 * sigma) + sigma ** 2


def schedulers(n: int) -> tuple[FlowMatchEulerDiscreteScheduler, FlowMatchMidpointScheduler]:
    """SD3's Euler scheduler and the midpoint one from its config, both set to ``n`` steps."""
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    mid = FlowMatchMidpointScheduler.from_config(euler.config)
    euler.set_timesteps(n)
    mid.set_timesteps(n)
    return euler, mid


def loop(sched, z: torch.Tensor, velocity=field) -> torch.Tensor:
    """The diffusers loop: one prediction per timestep, the scheduler's step after each."""
    for t in sched.timesteps:
        z = sched.step(velocity(z, float(t) / sched.config.num_train_timesteps), t, z).prev_sample
    return z


def reference(z: torch.Tensor, sigmas: list[float], velocity=field, substeps: int = 200) -> torch.Tensor:
    """The flow integrated finely (RK4, ``substeps`` per grid step) from ``sigmas[0]`` to ``sigmas[-1]``."""
    z = z.double()
    for a, b in zip(sigmas, sigmas[1:], strict=False):
        h = (b - a) / substeps
        for j in range(substeps):
            s = a + j * h
            k1 = velocity(z, s)
            k2 = velocity(z + h / 2 * k1, s + h / 2)
            k3 = velocity(z + h / 2 * k2, s + h / 2)
            k4 = velocity(z + h * k3, s + h)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_grid_is_the_euler_grid_with_every_steps_midpoint_after_it(kind):
    euler = flux_scheduler() if kind == "flux" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    mid = FlowMatchMidpointScheduler.from_config(euler.config)
    n = 7
    args = {"sigmas": np.linspace(1.0, 1 / n, n).tolist(), "mu": 0.8} if kind == "flux" else {}
    euler.set_timesteps(n, **args)
    mid.set_timesteps(n, **args)
    assert len(mid.sigmas) == 2 * n + 1 and len(mid.timesteps) == 2 * n
    torch.testing.assert_close(mid.sigmas[::2], euler.sigmas)
    torch.testing.assert_close(mid.sigmas[1::2], (euler.sigmas[:-1] + euler.sigmas[1:]) / 2)
    torch.testing.assert_close(mid.timesteps, mid.sigmas[:-1] * 1000)
    assert mid.order == 2 and [step_anchor(mid, k) for k in range(4)] == [0, 0, 2, 2]
    assert [step_anchor(euler, k) for k in range(3)] == [0, 1, 2]


def test_the_loop_is_the_midpoint_rule_written_out_and_second_order():
    z0 = torch.randn(3, 5)
    errors = {}
    for n in (6, 12):
        euler, mid = schedulers(n)
        grid = [float(s) for s in euler.sigmas]
        z = z0.clone()  # the rule, written out on the Euler grid
        for i in range(n):
            a, b = grid[i], grid[i + 1]
            z = z + (b - a) * field(z + (b - a) / 2 * field(z, a), (a + b) / 2)
        got = loop(mid, z0.clone())
        torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
        exact = reference(z0, grid).float()
        errors[n] = (float((loop(euler, z0.clone()) - exact).abs().max()), float((got - exact).abs().max()))
    euler_ratio, mid_ratio = errors[6][0] / errors[12][0], errors[6][1] / errors[12][1]
    assert 1.6 < euler_ratio < 2.6, errors  # first order: half the step, half the error
    assert mid_ratio > 3.2, errors  # second order: a quarter
    assert errors[12][1] < 0.2 * errors[12][0], errors


def test_midpoint_inversion_is_the_rule_written_out_and_its_round_trip_is_second_order():
    z0 = torch.randn(2, 4)
    gaps = {}
    for n in (5, 10):
        euler, mid = schedulers(n)
        path = midpoint_invert(field, z0, mid.sigmas)
        assert len(path) == 2 * n + 1 and torch.equal(path[-1], z0)
        s = [float(x) for x in mid.sigmas]
        z = z0.clone()  # up from σ_n, written out: half an Euler step to the midpoint, then the step with v there
        for i in range(n - 1, -1, -1):
            lo, m, hi = s[2 * i + 2], s[2 * i + 1], s[2 * i]
            z_m = z + (m - lo) * field(z, lo)
            z = z + (hi - lo) * field(z_m, m)
            torch.testing.assert_close(path[2 * i + 1], z_m)
            torch.testing.assert_close(path[2 * i], z)
        mid.set_timesteps(n)
        back_mid = loop(mid, path[0].clone())
        back_euler = loop(euler, euler_invert(field, z0, euler.sigmas)[0].clone())
        gaps[n] = (float((back_euler - z0).abs().max()), float((back_mid - z0).abs().max()))
    assert gaps[5][1] / gaps[10][1] > 3.2, gaps
    assert gaps[10][1] < 0.2 * gaps[10][0], gaps
    drift = torch.randn(2, 4)  # a flow that depends on σ only: the midpoint round trip is exact
    mid.set_timesteps(4)
    path = midpoint_invert(lambda z, s: drift * s ** 2, z0, mid.sigmas)
    torch.testing.assert_close(loop(mid, path[0].clone(), lambda z, s: drift * s ** 2), z0, atol=1e-6, rtol=0)


def _with_scheduler(pipe, scheduler_cls):
    return type(pipe)(**{**pipe.components, "scheduler": scheduler_cls.from_config(pipe.scheduler.config)})


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_stock_pipelines_run_it_as_the_rule_on_their_own_velocity(family, sd3_pipe, flux_pipe):
    pipe = _with_scheduler(sd3_pipe if family == "sd3" else flux_pipe, FlowMatchMidpointScheduler)
    n, side = 3, 32
    z = pipe.prepare_latents(1, pipe.transformer.config.in_channels // (4 if family == "flux" else 1), side, side,
                             torch.float32, "cpu", torch.Generator().manual_seed(0))
    z = z[0] if isinstance(z, tuple) else z  # FLUX also returns the image positions
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        out = pipe("a red circle", latents=z.clone(), num_inference_steps=n, height=side, width=side,
                   guidance_scale=1.0, output_type="latent", max_sequence_length=16)
    finally:
        hook.remove()
    assert len(calls) == 2 * n
    velocity = flow_velocity(pipe, "a red circle", side, side, max_sequence_length=16)
    s = [float(x) for x in run_sigmas(pipe, n, side, side)]
    for i in range(0, 2 * n, 2):  # the rule on the grid the pipeline steps over, written out
        z = z + (s[i + 2] - s[i]) * velocity(z + (s[i + 1] - s[i]) * velocity(z, s[i]), s[i + 1])
    latents = out.images
    if family == "flux":
        z = pipe._unpack_latents(z, side, side, pipe.vae_scale_factor)
        latents = pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor)
    torch.testing.assert_close(latents, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["toy-sd3", "toy-flux"])
def test_midpoint_inversion_gives_the_image_back_closer_than_euler_at_the_same_steps(model):
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set, render, scene_from_item

    pipe = load_pipeline(model)
    call = {**default_call_kwargs(pipe), "guidance_scale": 1.0, "num_inference_steps": 8}
    item = prompt_set("pair")[0]
    image = render(scene_from_item(item), call["height"])
    errors = {}
    for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchMidpointScheduler):
        p = _with_scheduler(pipe, cls)
        path = invert(p, image, item["prompt"], 8)
        assert len(path) == 8 * p.scheduler.order + 1
        back = np.asarray(p(item["prompt"], latents=path[0], **call).images[0]).astype(float)
        errors[cls.__name__] = np.abs(back - image).mean()
    assert errors["FlowMatchMidpointScheduler"] < 0.6 * errors["FlowMatchEulerDiscreteScheduler"], errors


def test_bad_use_is_named():
    with pytest.raises(ConfigError, match="stochastically"):
        FlowMatchMidpointScheduler(stochastic_sampling=True).set_timesteps(4)
    sched = FlowMatchMidpointScheduler(shift=3.0)
    with pytest.raises(ConfigError, match="takes its timesteps from the sigmas"):
        sched.set_timesteps(timesteps=[900.0, 500.0])
    sched.set_timesteps(4)
    z = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="not an integer index"):
        sched.step(z, 3, z)
    with pytest.raises(ConfigError, match="one noise level"):
        sched.step(z, sched.timesteps[0], z, per_token_timesteps=torch.ones(1, 2))
    sched.set_begin_index(1)
    with pytest.raises(ConfigError, match="is a midpoint and no step was started"):
        sched.step(z, sched.timesteps[1], z)
    with pytest.raises(ConfigError, match="odd length"):
        midpoint_invert(field, z, torch.tensor([1.0, 0.5, 0.2, 0.0]))


def test_use_solver_swaps_the_scheduler_for_the_block_and_puts_it_back(sd3_pipe):
    from attnctl.midpoint import use_solver

    own = sd3_pipe.scheduler
    with use_solver(sd3_pipe, "euler"):
        assert sd3_pipe.scheduler is own
    with pytest.raises(RuntimeError, match="inside"), use_solver(sd3_pipe, "midpoint"):
        assert isinstance(sd3_pipe.scheduler, FlowMatchMidpointScheduler)
        assert sd3_pipe.scheduler.config.shift == own.config.shift
        raise RuntimeError("inside")
    assert sd3_pipe.scheduler is own  # also when the block raised
    with pytest.raises(ConfigError, match="the solver is 'heun'"), use_solver(sd3_pipe, "heun"):
        pass
    sd3_pipe.scheduler = FlowMatchMidpointScheduler.from_config(own.config)  # a pipeline saved with it
    try:
        with use_solver(sd3_pipe, "euler"):  # "euler" ran the midpoint step here
            assert type(sd3_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
            assert sd3_pipe.scheduler.config.shift == own.config.shift
        assert isinstance(sd3_pipe.scheduler, FlowMatchMidpointScheduler)
    finally:
        sd3_pipe.scheduler = own


def test_a_control_under_the_midpoint_scheduler_reports_denoising_steps_not_loop_calls(toy_sd3):
    """Two model calls a step: the controller tells the controls (RunState.calls_per_step), and regulation's summary
    counts the steps it regulated as under Euler, not the calls."""
    from attnctl import AttentionRegulation, attach

    mid = type(toy_sd3)(**{**toy_sd3.components,
                           "scheduler": FlowMatchMidpointScheduler.from_config(toy_sd3.scheduler.config)})
    lines, orders = [], []
    for pipe in (toy_sd3, mid):
        control = AttentionRegulation(targets=["circle", "square"], iterations=2)
        with attach(pipe, [control]) as ctl:
            pipe("a red circle and a blue square", num_inference_steps=4, height=32, width=32, guidance_scale=1.0,
                 max_sequence_length=24, output_type="latent")
            orders.append(ctl.state.calls_per_step)
        lines.append(control.summary())
        assert len({r.step for r in control.records}) == 2 * orders[-1]  # the first half: 2 steps' calls
    assert orders == [1, 2]
    assert " at 2 steps;" in lines[0] and " at 2 steps;" in lines[1], lines


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_starts_its_strength_on_a_grid_point_or_is_refused(family, sd3_pipe, flux_pipe):
    """FLUX img2img passes its own sigmas and reads 2n steps back from the scheduler, so its strength started at the
    wrong noise (and crashed at strength 0.5); it is refused. SD3 img2img starts half way: 2 calls for each of its
    last 4 steps."""
    import inspect

    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    base = flux_pipe if family == "flux" else sd3_pipe
    cls = FluxImg2ImgPipeline if family == "flux" else StableDiffusion3Img2ImgPipeline
    takes = inspect.signature(cls.__init__).parameters
    i2i = cls(**{k: v for k, v in base.components.items() if k in takes and k != "scheduler"},
              scheduler=FlowMatchMidpointScheduler.from_config(base.scheduler.config))
    i2i.set_progress_bar_config(disable=True)
    calls = []
    hook = i2i.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)

    def run():
        return i2i("a red circle", image=torch.rand(1, 3, 32, 48), strength=0.5, num_inference_steps=8, height=32,
                   width=48, max_sequence_length=24, generator=torch.Generator().manual_seed(0), output_type="latent")

    try:
        if family == "flux":
            with pytest.raises(ConfigError, match="passes its own sigmas .* wrong noise level"):
                run()
        else:
            run()
            assert len(calls) == 8 and i2i.scheduler.begin_index == 8
    finally:
        hook.remove()
