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
    export_checkpoint,
    train,
)

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
    assert isinstance(pipe, AttnCtlFluxPipeline if name == "toy-flux" else AttnCtlSD3Pipeline)
    call = models.default_call_kwargs(pipe)
    assert call["num_inference_steps"] == 20 and call["height"] == 32
    img = _image(pipe)
    assert img.shape == (32, 32, 3)


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
