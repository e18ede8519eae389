"""Smoke tests of the toy trainer (a few steps at tiny widths) and of the model loader's errors.

The full training that produced the shipped toy-sd3 / toy-flux is not run here (it takes an hour+).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from attnctl.errors import AttnCtlError, ConfigError
from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
from attnctl.toyworld import models
from attnctl.toyworld.train import (
    CHECKPOINT_NAME,
    LOG_NAME,
    PRESETS,
    _arch,
    _load_weights,
    _text,
    build_pipeline,
    encode_images,
    export_checkpoint,
    guidance_distillation_loss,
    predict,
    train,
)
from attnctl.toyworld.world import make_batch

TINY_SD3 = {"num_layers": 1, "num_heads": 2, "head_dim": 8, "clip_dim": 8, "t5_dim": 16, "t5_layers": 1, "t5_heads": 2}
TINY_FLUX = {
    "num_layers": 1,
    "num_single_layers": 1,
    "num_heads": 2,
    "head_dim": 8,
    "clip_dim": 8,
    "t5_dim": 16,
    "t5_layers": 1,
    "t5_heads": 2,
}
SMOKE = {"batch": 4, "lr": 1e-3, "progress": False, "warmup": 2, "log_every": 1, "checkpoint_every": 2}


def _step(run: Path) -> int:
    return int(torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=False)["step"])


def _log_steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / LOG_NAME).read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


def _image(pipe, **extra) -> np.ndarray:
    kw = {**models.default_call_kwargs(pipe), "num_inference_steps": 2, **extra}
    out = pipe("a red circle", output_type="np", generator=torch.Generator().manual_seed(0), **kw)
    return out.images[0]


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("toy-sd3-smoke")
    train("toy-sd3", run, steps=3, arch=TINY_SD3, **SMOKE)
    return run


def test_presets_have_24_heads():
    for name, arch in PRESETS.items():
        assert arch.total_heads >= 24, name
    assert PRESETS["toy-flux"].num_layers >= 1 and PRESETS["toy-flux"].num_single_layers >= 1


def test_smoke_training_writes_a_loadable_sd3_folder(sd3_run):
    folder = sd3_run / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["vae"] == ["attnctl.toyworld.autoencoder", "PixelShuffleAutoencoder"]
    assert _step(sd3_run) == 3
    meta = models.toy_metadata(folder)
    assert meta["family"] == "sd3" and meta["training"]["step"] == 3
    # Plain diffusers loads it offline, every component in eval mode, float32 by default.
    plain = StableDiffusion3Pipeline.from_pretrained(folder)
    assert all(not m.training for m in plain.components.values() if isinstance(m, torch.nn.Module))
    assert plain.transformer.dtype == torch.float32
    pipe = models.load_pipeline(folder)
    assert isinstance(pipe, AttnCtlSD3Pipeline)
    call = models.default_call_kwargs(pipe)
    assert call["height"] == call["width"] == 32 and call["max_sequence_length"] == 24
    assert call["guidance_scale"] > 1
    img = _image(pipe)
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()
    # The plain and the controlled pipeline give the same image without controls.
    plain.set_progress_bar_config(disable=True)
    assert np.allclose(_image(plain, **call | {"num_inference_steps": 2}), img)
    assert type(models.load_pipeline(folder, controlled=False)) is StableDiffusion3Pipeline


def test_resume_continues_the_step_count(sd3_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(sd3_run, run)
    train("toy-sd3", run, steps=5, resume=True, **SMOKE)
    assert _step(run) == 5
    assert _log_steps(run) == [1, 2, 3, 4, 5]
    assert models.toy_metadata(run / "pipeline")["training"]["step"] == 5


def test_a_resume_keeps_the_learning_rate_schedule_of_its_run(tmp_path, monkeypatch):
    """A resume without --lr, --warmup and --steps went on at the defaults (lr 1e-3, warm-up 200, a 6000-step
    cosine) instead of the run's own, and a resume with another --warmup was taken."""
    from attnctl.toyworld import train as training

    seen = []
    lr_at = training._lr_at
    monkeypatch.setattr(training, "_lr_at", lambda step, p, lr, warmup, *a, **k: seen.append((step, lr, warmup))
                        or lr_at(step, p, lr, warmup, *a, **k))
    run = tmp_path / "run"
    train("toy-sd3", run, steps=4, batch=2, lr=3e-4, warmup=3, progress=False)
    assert seen == [(i, 3e-4, 3) for i in range(4)]
    seen.clear()
    train("toy-sd3", run, resume=True, progress=False)  # the run's 4 steps: nothing left (6000 before)
    assert seen == [] and _step(run) == 4
    train("toy-sd3", run, resume=True, steps=6, progress=False)  # extended, at the run's lr and warm-up
    assert seen == [(4, 3e-4, 3), (5, 3e-4, 3)]
    assert "warmup" in training.RESUME_FIXED  # the CLI refuses a resume with another --warmup


def test_a_ctrl_c_mid_step_keeps_a_checkpoint_of_whole_steps_and_the_resume_ends_where_a_plain_run_ends(
        tmp_path, monkeypatch):
    """A Ctrl-C that lands after the optimizer and EMA updates (before the step count moves) used to save the
    weights of step k + 1 under step k, and the resume repeated that update. Now the step finishes, the checkpoint
    matches it, and the resumed run gives the uninterrupted run's weights, final loss and log."""
    import signal

    import attnctl.toyworld.train as training

    plain = tmp_path / "plain"
    train("toy-sd3", plain, steps=4, arch=TINY_SD3, **SMOKE)
    stopped = tmp_path / "stopped"
    update = training._EMA.update
    calls = []

    def update_then_ctrl_c(self, module, step):
        update(self, module, step)
        calls.append(step)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # where a real Ctrl-C can land

    monkeypatch.setattr(training._EMA, "update", update_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train("toy-sd3", stopped, steps=4, arch=TINY_SD3, **SMOKE)
    assert _step(stopped) == 2
    monkeypatch.setattr(training._EMA, "update", update)
    train("toy-sd3", stopped, steps=4, resume=True, **SMOKE)
    a, b = (torch.load(r / CHECKPOINT_NAME, map_location="cpu", weights_only=False) for r in (plain, stopped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["smooth_loss"] == b["smooth_loss"] and _log_steps(stopped) == [1, 2, 3, 4]
    assert models.toy_metadata(stopped / "pipeline")["training"]["final_loss"] == \
        models.toy_metadata(plain / "pipeline")["training"]["final_loss"]


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_and_no_temp_file(tmp_path, monkeypatch):
    import attnctl.toyworld.train as training

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"the last checkpoint")

    def short_write(payload, path):
        Path(path).write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")  # torch on a full disk

    monkeypatch.setattr(training.torch, "save", short_write)
    with pytest.raises(ConfigError, match="could not write the checkpoint.*free space"):
        training._save_checkpoint(tmp_path / CHECKPOINT_NAME, {})
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == b"the last checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train("toy-sd3", tmp_path, steps=2, resume=True, **SMOKE)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="toy-sd3"):
        train("toy-sdxl", "/tmp/never", steps=1)
    with pytest.raises(ConfigError, match="nonsense"):
        train("toy-sd3", "/tmp/never", steps=1, arch={"nonsense": 1})


def test_flux_smoke_training_time_budget_and_export(tmp_path):
    run = tmp_path / "flux"
    # A budget that runs out after the first step: training stops cleanly, checkpoints and exports.
    folder = train("toy-flux", run, steps=50, minutes=1e-6, arch=TINY_FLUX, **SMOKE)
    assert 1 <= _step(run) < 50
    done = json.loads((run / LOG_NAME).read_text().splitlines()[-1])
    assert done["done"] and done["stopped_by_time"]
    plain = FluxPipeline.from_pretrained(folder)
    assert all(not m.training for m in plain.components.values() if isinstance(m, torch.nn.Module))
    pipe = models.load_pipeline(folder)
    assert isinstance(pipe, AttnCtlFluxPipeline)
    call = models.default_call_kwargs(pipe)
    assert "guidance_scale" not in call and call["height"] == 32
    assert pipe.default_sample_size * pipe.vae_scale_factor == 32
    assert _image(pipe).shape == (32, 32, 3)
    # The same seed gives the same image (T5 dropout off: eval mode).
    assert np.array_equal(_image(pipe), _image(pipe))
    # export_checkpoint rebuilds the same folder from the checkpoint.
    again = export_checkpoint(run, tmp_path / "again")
    assert np.array_equal(_image(models.load_pipeline(again)), _image(pipe))
    # ...with the same training record train() wrote (loss, stop reason, size).
    assert models.toy_metadata(again)["training"] == models.toy_metadata(folder)["training"]


# ------------------------------------------------------------------------------------------ load errors


def test_unknown_name_lists_the_toy_models():
    with pytest.raises(ConfigError) as e:
        models.load_pipeline("toy-sdx")
    assert "toy-sd3" in str(e.value) and "toy-flux" in str(e.value)
    with pytest.raises(ConfigError):
        models.resolve_model("./no/such/folder")


def test_hub_ids_pass_through_resolve():
    assert models.resolve_model("stabilityai/stable-diffusion-3-medium-diffusers") == (
        "stabilityai/stable-diffusion-3-medium-diffusers"
    )


def test_folder_without_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        models.load_pipeline(tmp_path)


def _copy(sd3_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(sd3_run / "pipeline", tmp_path / "pipe"))


def test_corrupt_safetensors(sd3_run, tmp_path):
    folder = _copy(sd3_run, tmp_path)
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AttnCtlError, match="corrupt weights file") as e:
        models.load_pipeline(folder)
    assert "transformer" in str(e.value) and "Fix:" in str(e.value)


def test_garbage_safetensors(sd3_run, tmp_path):
    folder = _copy(sd3_run, tmp_path)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AttnCtlError, match="corrupt weights file"):
        models.load_pipeline(folder)


def test_missing_safetensors(sd3_run, tmp_path):
    folder = _copy(sd3_run, tmp_path)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AttnCtlError, match="no weights file"):
        models.load_pipeline(folder)


def test_corrupt_model_index(sd3_run, tmp_path):
    folder = _copy(sd3_run, tmp_path)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model_index.json"):
        models.load_pipeline(folder)


# ------------------------------------------------------------------------------------ the shipped models


@pytest.mark.parametrize("name", sorted(models.TOY_MODELS))
def test_shipped_toy_models_load(name):
    if not (models.TOY_MODELS[name] / "model_index.json").is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    assert models.resolve_model(name) == models.TOY_MODELS[name]
    pipe = models.load_pipeline(name)
    assert isinstance(pipe, AttnCtlFluxPipeline if name.startswith("toy-flux") else AttnCtlSD3Pipeline)
    call = models.default_call_kwargs(pipe)
    assert call["num_inference_steps"] == 20 and call["height"] == 32
    # toy-flux-dev's guidance is an input of its transformer: the default call passes it, toy-flux has none
    assert ("guidance_scale" in call) == (name != "toy-flux")
    assert bool(getattr(pipe.transformer.config, "guidance_embeds", False)) == (name == "toy-flux-dev")
    img = _image(pipe)
    assert img.shape == (32, 32, 3)


def test_a_toy_pipeline_saved_again_keeps_its_call_defaults(tmp_path):
    """``save_pretrained`` wrote diffusers' files only: the saved toy lost its ``attnctl.json`` and ran on diffusers'
    defaults (guidance 7, 1024 px) without a word."""
    if not (models.TOY_MODELS["toy-sd3"] / "model_index.json").is_file():
        pytest.skip("toy-sd3 is not shipped in this checkout")
    pipe = models.load_pipeline("toy-sd3")
    pipe.save_pretrained(tmp_path / "saved")
    again = models.load_pipeline(tmp_path / "saved")
    assert models.default_call_kwargs(again) == models.default_call_kwargs(pipe)
    assert models.toy_metadata(tmp_path / "saved") == models.toy_metadata(models.TOY_MODELS["toy-sd3"])


def test_toy_flux_dev_draws_single_objects_through_its_embedded_guidance():
    """The distilled model at its default (guidance 5 as a transformer input, one forward per step) draws the
    single-object set; with guidance 1 it falls back toward toy-flux without CFG (toy-flux's default was 0.632 on
    8 seeds; docs/toyworld.md). Guards the shipped weights and the guidance path through the attnctl pipeline."""
    from attnctl.toyworld.evaluate import evaluate_set
    from attnctl.toyworld.world import prompt_set

    pipe = models.load_pipeline("toy-flux-dev")
    items = prompt_set("single")

    def presence(**extra) -> float:
        kw = {**models.default_call_kwargs(pipe), **extra}
        images = []
        for seed in (0, 1):
            out = pipe(prompt=[it["prompt"] for it in items],
                       generator=[torch.Generator().manual_seed(seed) for _ in items], **kw).images
            images += [np.asarray(im.convert("RGB")) for im in out]
        return evaluate_set(images, items + items)["presence"]

    guided, unguided = presence(), presence(guidance_scale=1.0)
    assert guided >= 0.9 and guided - unguided >= 0.2, (guided, unguided)


def test_fine_tune_from_a_pipeline_into_a_tokens_only_model(sd3_run, tmp_path):
    """init_from copies the weights, pooled_text=False zeroes and freezes the pooled projection: the result
    ignores the pooled vector (a stock pipeline call, any pooled embedding gives the same image)."""
    source = sd3_run / "pipeline"
    run = tmp_path / "tokens"
    folder = train("toy-sd3", run, steps=2, arch={**TINY_SD3, "pooled_text": False}, init_from=source,
                   **{**SMOKE, "lr": 1e-9})
    meta = json.loads((folder / models.METADATA_NAME).read_text())
    assert meta["arch"]["pooled_text"] is False and meta["training"]["init_from"] == str(source)
    a, b = models.load_pipeline(source), models.load_pipeline(folder)
    assert float(b.transformer.time_text_embed.text_embedder.linear_2.weight.detach().abs().max()) == 0.0
    wa = a.transformer.transformer_blocks[0].attn.to_q.weight
    wb = b.transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.allclose(wa, wb, atol=1e-3)  # copied (lr≈0; fp16 storage)
    emb, neg, pooled, neg_pooled = b.encode_prompt("a red circle", None, None, max_sequence_length=24)
    kw = {**models.default_call_kwargs(b), "num_inference_steps": 2, "output_type": "np"}
    kw.pop("max_sequence_length")
    images = [b(prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=p,
                negative_pooled_prompt_embeds=neg_pooled, generator=torch.Generator().manual_seed(0), **kw).images[0]
              for p in (pooled, torch.randn_like(pooled) * 10)]
    assert np.abs(images[0] - images[1]).max() < 1e-6
    resumed = train("toy-sd3", run, steps=3, resume=True, **{**SMOKE, "lr": 1e-9})  # the source stays recorded
    assert models.toy_metadata(resumed)["training"]["init_from"] == str(source)
    with pytest.raises(ConfigError, match="another architecture"):
        train("toy-sd3", tmp_path / "other", steps=1, arch={**TINY_SD3, "num_layers": 2}, init_from=source, **SMOKE)


def test_omit_named_is_recorded_and_kept_on_resume(tmp_path):
    """A neglect-prone fine-tune records its omit_named; a resume trains on the same world, whatever it is passed."""
    run = tmp_path / "omit"
    folder = train("toy-sd3", run, steps=2, arch=TINY_SD3, omit_named=0.3, **SMOKE)
    assert models.toy_metadata(folder)["training"]["omit_named"] == 0.3
    resumed = train("toy-sd3", run, steps=3, resume=True, **SMOKE)  # omit_named not passed: the default 0.0
    assert models.toy_metadata(resumed)["training"]["omit_named"] == 0.3
    with pytest.raises(ConfigError, match="omit_named=1.5 is not a fraction"):
        train("toy-sd3", tmp_path / "bad", steps=1, arch=TINY_SD3, omit_named=1.5, **SMOKE)


# ---------------------------------------------------------------------------------- guidance distillation


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory) -> Path:
    return train("toy-flux", tmp_path_factory.mktemp("flux-teacher"), steps=3, arch=TINY_FLUX, **SMOKE)


def _student(teacher: Path):
    """A toy-flux-dev student built from the teacher's weights, as ``train(distill_from=...)`` starts it."""
    arch = _arch("toy-flux-dev", TINY_FLUX)
    pipe = build_pipeline(arch, 0)
    _load_weights(pipe, arch, teacher)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe, arch


def test_distilled_student_starts_as_the_teachers_conditional_branch(flux_teacher):
    """The guidance embedding the teacher lacks starts at zero output: whatever the guidance scale, the student
    predicts exactly what the teacher predicts for the prompt (its CFG's conditional branch)."""
    student, arch = _student(flux_teacher)
    teacher = models.load_pipeline(flux_teacher, controlled=False)
    captions = ["a red circle", "a blue square and a green triangle"]
    text = _text(student, captions, arch)
    x = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        want = predict(teacher, x, sigma, text, arch)
        for g in (1.0, 4.0, 8.0):
            got = predict(student, x, sigma, text, arch, guidance=torch.full((2,), g))
            assert torch.allclose(got, want, atol=1e-6)
    assert student.transformer.time_text_embed.guidance_embedder.linear_2.weight.abs().max() == 0


def test_guidance_distillation_loss_is_the_plain_cfg_target(flux_teacher):
    """The loss equals |v_student(x_t, sigma, g) − (v_u + g (v_c − v_u))|² written out with separate teacher calls."""
    student, arch = _student(flux_teacher)
    with torch.no_grad():  # a student that uses its guidance input
        student.transformer.time_text_embed.guidance_embedder.linear_2.weight.normal_(0, 0.1)
    teacher = models.load_pipeline(flux_teacher, controlled=False)
    captions, images = make_batch(11, 3, arch.resolution)
    loss = guidance_distillation_loss(student, teacher, captions, images, arch, torch.Generator().manual_seed(4),
                                      guidance_range=(2.0, 6.0))
    gen = torch.Generator().manual_seed(4)  # the same draws, in the documented order: noise, sigma, g
    x0 = encode_images(student, images)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(3, generator=gen))
    g = 2.0 + 4.0 * torch.rand(3, generator=gen)
    x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    with torch.no_grad():
        v_c = predict(teacher, x_t, sigma, _text(teacher, captions, arch), arch)
        v_u = predict(teacher, x_t, sigma, _text(teacher, [""] * 3, arch), arch)
        v_s = predict(student, x_t, sigma, _text(student, captions, arch), arch, guidance=g)
    want = ((v_s - (v_u + g[:, None, None] * (v_c - v_u))) ** 2).mean()
    assert float(g.min()) >= 2.0 and float(g.max()) <= 6.0
    assert abs(float(loss.detach()) - float(want)) <= 1e-6 * max(1.0, float(want))


def test_distillation_trains_the_transformer_exports_guidance_and_resumes(flux_teacher, tmp_path):
    run = tmp_path / "dev"
    folder = train("toy-flux-dev", run, steps=2, arch=TINY_FLUX, distill_from=flux_teacher, **SMOKE)
    meta = models.toy_metadata(folder)
    assert meta["arch"]["guidance_embeds"] is True and meta["arch"]["train_text"] is False
    assert meta["training"]["distill_from"] == str(flux_teacher) and meta["training"]["guidance_range"] == [1.0, 8.0]
    assert meta["call"]["guidance_scale"] == 5.0  # its own guidance, not the teacher's call defaults
    pipe, teacher = models.load_pipeline(folder), models.load_pipeline(flux_teacher)
    assert pipe.transformer.config.guidance_embeds and isinstance(pipe, AttnCtlFluxPipeline)
    for name in ("text_encoder", "text_encoder_2"):  # frozen: the teacher's text features
        for a, b in zip(getattr(pipe, name).parameters(), getattr(teacher, name).parameters(), strict=True):
            assert torch.equal(a, b)
    assert not np.array_equal(_image(pipe, guidance_scale=1.0), _image(pipe, guidance_scale=8.0))
    resumed = train("toy-flux-dev", run, steps=3, resume=True, **SMOKE)  # the teacher stays recorded
    assert _step(run) == 3 and models.toy_metadata(resumed)["training"]["distill_from"] == str(flux_teacher)
    # the checkpoint holds the transformer only: a resume and export_checkpoint take the text encoders from the
    # teacher again, not from a fresh random build
    for again in (models.load_pipeline(resumed), models.load_pipeline(export_checkpoint(run, tmp_path / "x"))):
        for name in ("text_encoder", "text_encoder_2"):
            for a, b in zip(getattr(again, name).parameters(), getattr(teacher, name).parameters(), strict=True):
                assert torch.equal(a, b)


def test_distillation_errors(flux_teacher, sd3_run, tmp_path):
    with pytest.raises(ConfigError, match="needs a model with a guidance embedding"):
        train("toy-flux", tmp_path / "a", steps=1, arch=TINY_FLUX, distill_from=flux_teacher, **SMOKE)
    with pytest.raises(ConfigError, match="is not a FLUX pipeline without a guidance embedding"):
        train("toy-flux-dev", tmp_path / "b", steps=1, arch=TINY_FLUX, distill_from=sd3_run / "pipeline", **SMOKE)
    with pytest.raises(ConfigError, match="guidance_range"):
        train("toy-flux-dev", tmp_path / "c", steps=1, arch=TINY_FLUX, distill_from=flux_teacher,
              guidance_range=(6.0, 1.0), **SMOKE)
    with pytest.raises(ConfigError, match="guidance_embeds is a FLUX option"):
        train("toy-sd3", tmp_path / "d", steps=1, arch={**TINY_SD3, "guidance_embeds": True}, **SMOKE)


def test_a_resume_keeps_the_runs_time_sampling_and_optimiser_settings(tmp_path):
    """A resume restored the learning-rate schedule but went on at the default time sampling, caption dropout, EMA
    decay, weight decay and gradient clipping (and recorded those): now it ends where the uninterrupted run ends."""
    from attnctl.toyworld.train import RESUME_FIXED, checkpoint_settings

    own = {"time_sampling": "uniform", "caption_dropout": 0.5, "ema_decay": 0.9, "weight_decay": 0.2, "grad_clip": 0.05}
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"
    train("toy-sd3", plain, steps=4, arch=TINY_SD3, **SMOKE, **own)
    train("toy-sd3", resumed, steps=2, arch=TINY_SD3, **SMOKE, **own)
    train("toy-sd3", resumed, steps=4, resume=True, **SMOKE)  # the defaults: logit-normal, 0.1, 0.999, ...
    recorded = checkpoint_settings(resumed / CHECKPOINT_NAME)
    assert {k: recorded[k] for k in own} == own and set(own) <= set(RESUME_FIXED)
    a, b = (torch.load(r / CHECKPOINT_NAME, map_location="cpu", weights_only=False) for r in (plain, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_fine_tune_samples_with_its_sources_scheduler(sd3_run, tmp_path):
    """A fine-tune of toy-sd3 (scheduler shift 2.0) was written with the architecture's shift 3.0."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(sd3_run / "pipeline", source)
    config = source / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift": 2.0}))
    assert PRESETS["toy-sd3"].shift == 3.0
    folder = train("toy-sd3", tmp_path / "tune", steps=1, arch=TINY_SD3, init_from=source, **SMOKE)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 2.0
    assert models.load_pipeline(folder).scheduler.config.shift == 2.0


def test_a_time_budget_of_zero_minutes_is_refused(tmp_path):
    """--minutes 0 trained no step and wrote a pipeline of random weights without a word."""
    for minutes in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="leaves no time to train"):
            train("toy-sd3", tmp_path / "run", steps=2, minutes=minutes, arch=TINY_SD3, **SMOKE)
    assert not (tmp_path / "run").exists()
