"""Offline building blocks: word-level tokenizer, lossless pixel autoencoder, tiny SD3/SD3.5/FLUX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from attnctl.testing import TEXT_LENGTH, save_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline
from attnctl.toyworld import vocab
from attnctl.toyworld.autoencoder import PixelShuffleAutoencoder
from attnctl.toyworld.tokenizer import make_tokenizer, split_words, unknown_words

REPO = Path(__file__).resolve().parents[1]
CALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=TEXT_LENGTH)
ROUND_OFF = 1e-5
"""Largest image difference allowed between a pipeline and its saved-and-loaded copy (float32 round-off)."""


def _run(pipe, prompt="a red circle", seed=0, **kw):
    args = {**CALL, "output_type": "np", **kw}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def _world_image(seed: int = 3) -> np.ndarray:
    """One 32×32 shapes-world image if the world module is there, else a drawn stand-in."""
    try:
        from attnctl.toyworld.world import make_batch
    except ImportError:
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = vocab.BACKGROUND
        img[8:20, 4:16] = vocab.COLOURS["red"]
        return img
    return make_batch(seed, 1, resolution=32)[1][0]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_one_token_per_word():
    tok = make_tokenizer()
    ids = vocab.vocabulary()
    assert tok.model_max_length == 24
    for word in vocab.words():
        assert tok(word, add_special_tokens=False).input_ids == [ids[word]], word
    enc = tok("A Red circle, to the LEFT of a blue square")
    words = ["a", "red", "circle", ",", "to", "the", "left", "of", "a", "blue", "square"]
    assert enc.input_ids == [ids[vocab.BOS], *(ids[w] for w in words), ids[vocab.EOS]]
    assert split_words("a red circle,to the left") == ["a", "red", "circle", ",", "to", "the", "left"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == tuple(
        ids[t] for t in (vocab.BOS, vocab.EOS, vocab.PAD, vocab.UNK)
    )


def test_tokenizer_pipeline_calls():
    """The calls the SD3/FLUX pipelines make: max_length padding, truncation, 'longest', batch_decode."""
    tok = make_tokenizer()
    prompts = ["a red circle", "two green triangles " * 10]
    enc = tok(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (2, 24)
    assert enc.input_ids[0, 5:].eq(tok.pad_token_id).all() and enc.input_ids[0, 4] == tok.eos_token_id
    assert enc.input_ids[1, -1] == tok.eos_token_id  # truncation keeps the end token
    longest = tok(prompts, padding="longest", return_tensors="pt").input_ids
    assert longest.shape == (2, 32)
    removed = tok.batch_decode(longest[:, 23:-1])
    assert removed[1] == " ".join(prompts[1].split()[22:30])  # positions 23..30 hold words 22..29
    assert tok.batch_decode(enc.input_ids[:1], skip_special_tokens=True) == ["a red circle"]


def test_unknown_words():
    assert unknown_words("a red circle on the left") == []
    assert unknown_words("A crimson Hexagon, and a crimson dog!") == ["crimson", "hexagon", "dog", "!"]
    assert unknown_words(["a red dog", "a cat"]) == ["dog", "cat"]
    tok = make_tokenizer()
    assert tok("a dog").input_ids[2] == tok.unk_token_id


def test_tokenizer_save_load(tmp_path):
    tok = make_tokenizer(max_length=16)
    tok.save_pretrained(tmp_path)
    prompt = ["a large purple square above a small orange circle", ""]
    want = tok(prompt, padding="max_length", max_length=16, truncation=True).input_ids
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.model_max_length == 16
        assert loaded(prompt, padding="max_length", max_length=16, truncation=True).input_ids == want
    with pytest.raises(ValueError, match="at least 3"):
        make_tokenizer(2)


# -------------------------------------------------------------------------------------------- autoencoder


def test_vae_exact_round_trip_and_config():
    vae = PixelShuffleAutoencoder()
    assert vae.config.latent_channels == 12
    assert 2 ** (len(vae.config.block_out_channels) - 1) == vae.config.factor == 2
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.rand(2, 3, 32, 48) * 2 - 1).to(dtype)
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, 12, 16, 24) and torch.equal(z, dist.mode())
        assert torch.equal(vae.decode(z).sample, x)
        assert torch.equal(vae.decode(z, return_dict=False)[0], x)
    four = PixelShuffleAutoencoder(factor=4)
    assert four.config.latent_channels == 48 and len(four.config.block_out_channels) == 3
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(four.decode(four.encode(x).latent_dist.mode()).sample, x)
    with pytest.raises(ValueError, match="power of two"):
        PixelShuffleAutoencoder(factor=3)
    with pytest.raises(ValueError, match="vae_scale_factor"):
        PixelShuffleAutoencoder(factor=2, block_out_channels=(8, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 31, 32))


def test_vae_world_image_exact_through_pipeline_path():
    """uint8 image → image processor → encode → shift/scale → unscale → decode → uint8: unchanged."""
    pipe = tiny_sd3_pipeline()
    img = _world_image()
    vae, cfg = pipe.vae, pipe.vae.config
    x = pipe.image_processor.preprocess(Image.fromarray(img), height=32, width=32)
    z = (vae.encode(x).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor
    y = vae.decode(z / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    assert np.array_equal(np.asarray(pipe.image_processor.postprocess(y, output_type="pil")[0]), img)


def test_vae_save_load(tmp_path):
    vae = PixelShuffleAutoencoder(scaling_factor=1.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path)
    loaded = PixelShuffleAutoencoder.from_pretrained(tmp_path)
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (1.5, 0.25)
    assert not loaded.training
    bf16 = PixelShuffleAutoencoder.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- pipelines

BUILDERS = {
    "sd3": lambda **kw: tiny_sd3_pipeline("sd3", **kw),
    "sd35": lambda **kw: tiny_sd3_pipeline("sd35", **kw),
    "sd3-no-t5": lambda **kw: tiny_sd3_pipeline("sd3", t5=False, **kw),
    "flux": lambda **kw: tiny_flux_pipeline(**kw),
}


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_end_to_end_and_deterministic(pipes, name):
    pipe = pipes[name]
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    a = _run(pipe)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, _run(pipe)), "same seed, same pipeline → same image"
    assert np.array_equal(a, _run(BUILDERS[name]())), "same build seed → same weights → same image"
    assert not np.array_equal(a, _run(BUILDERS[name](seed=1))), "weights depend on the seed"
    assert not np.array_equal(a, _run(pipe, "two blue squares on the top")), "the prompt matters"
    pil = pipe("a red circle", **CALL, output_type="pil").images[0]
    assert pil.size == (32, 32)
    default = pipe("a red circle", num_inference_steps=1, max_sequence_length=TEXT_LENGTH, output_type="np")
    assert default.images.shape == (1, 32, 32, 3)  # default size = sample_size * vae factor


def test_token_counts_and_architecture(pipes):
    """64 image tokens at 32×32; text = 24 CLIP + 24 T5 (SD3) or 24 T5 (FLUX); SD3.5 has attn2 and QK-norm."""
    for name in ("sd3", "sd35", "sd3-no-t5"):
        pipe = pipes[name]
        emb, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=TEXT_LENGTH)
        assert emb.shape == (1, 48, 32) and pooled.shape == (1, 32)
        t = pipe.transformer
        assert (32 // 2 // t.config.patch_size) ** 2 == 64
        blocks = t.transformer_blocks
        assert len(blocks) == 2 and blocks[0].attn.heads == 4
        assert all((b.attn2 is not None) == (name == "sd35") for b in blocks)
        assert (blocks[0].attn.norm_q is not None) == (name == "sd35")
    flux = pipes["flux"]
    emb, pooled, text_ids = flux.encode_prompt("a red circle", None, max_sequence_length=TEXT_LENGTH)
    assert emb.shape == (1, 24, 32) and pooled.shape == (1, 16) and text_ids.shape == (24, 3)
    t = flux.transformer
    assert len(t.transformer_blocks) == 1 and len(t.single_transformer_blocks) == 2
    assert t.config.in_channels == 4 * flux.vae.config.latent_channels
    assert not t.config.guidance_embeds
    assert tiny_flux_pipeline(guidance_embeds=True).transformer.config.guidance_embeds


def test_clip_pools_at_eos(pipes):
    tok = pipes["sd3"].tokenizer
    ids = tok(["a red circle", "two green triangles"], padding="max_length", max_length=24,
              return_tensors="pt").input_ids
    assert tok.eos_token_id != 2  # transformers' CLIP would pool at argmax(input_ids) instead of <eos>
    eos_pos = (ids == tok.eos_token_id).int().argmax(-1)
    for enc in (pipes["sd3"].text_encoder, pipes["flux"].text_encoder):
        out = enc.text_model(ids) if hasattr(enc, "text_projection") else enc(ids)
        want = out.last_hidden_state[torch.arange(2), eos_pos]
        assert torch.equal(out.pooler_output, want)


def test_dtype_and_image_to_image(pipes):
    bf16 = tiny_sd3_pipeline("sd35", dtype=torch.bfloat16)
    assert {m.dtype for m in bf16.components.values() if isinstance(m, torch.nn.Module)} == {torch.bfloat16}
    assert np.isfinite(_run(bf16)).all()
    image = Image.fromarray(_world_image())
    for cls, base in ((StableDiffusion3Img2ImgPipeline, pipes["sd35"]), (FluxImg2ImgPipeline, pipes["flux"])):
        pipe = cls(**base.components)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", image=image, strength=0.5, **{**CALL, "num_inference_steps": 4},
                   output_type="np").images
        assert out.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny(pipes, name):
    """Unit tests run dozens of these generations: every pipeline stays under 200k weights, and a 32×32 image is
    64 image tokens (speed itself is a benchmark, bench/toy_speed.py, not a timed test)."""
    pipe = pipes[name]
    weights = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert 50_000 < weights < 200_000, weights
    latents = _run(pipe, output_type="latent")
    if latents.ndim == 3:  # FLUX: packed, one row per image token
        tokens = latents.shape[1]
    else:
        p = pipe.transformer.config.patch_size
        tokens = (latents.shape[-2] // p) * (latents.shape[-1] // p)
    assert tokens == 64, latents.shape


# ------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["sd35", "sd3-no-t5", "flux"])
def test_save_load_round_trip(pipes, name, tmp_path):
    pipe = pipes[name]
    folder = save_pipeline(pipe, tmp_path / name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["attnctl.toyworld.autoencoder", "PixelShuffleAutoencoder"]
    assert index["tokenizer"] == ["transformers", "TokenizersBackend"]
    cls = FluxPipeline if name == "flux" else StableDiffusion3Pipeline
    extra = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3-no-t5" else {}
    loaded = cls.from_pretrained(folder, **extra)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, PixelShuffleAutoencoder)
    assert all(not m.training for m in loaded.components.values() if isinstance(m, torch.nn.Module))
    for part, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            saved, back = module.state_dict(), loaded.components[part].state_dict()
            assert saved.keys() == back.keys(), part
            assert all(torch.equal(saved[k], back[k]) for k in saved), f"{part}: weights changed in the round trip"
    # Same weights, same image up to float32 round-off: loaded tensors are views into the file's buffer at
    # other memory alignments, and the CPU's matmul kernels round differently on them (seen: 5e-7).
    np.testing.assert_allclose(_run(loaded), _run(pipe), rtol=0, atol=ROUND_OFF)


def test_load_offline_in_fresh_process(pipes, tmp_path):
    """A new process with HF_HUB_OFFLINE=1 loads both folders once the autoencoder module is imported."""
    for name in ("sd3", "flux"):
        save_pipeline(pipes[name], tmp_path / name)
        np.save(tmp_path / f"{name}.npy", _run(pipes[name]))
    script = f"""
import diffusers, numpy as np, torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from packaging.version import Version
root = {str(tmp_path)!r}
if Version(diffusers.__version__) >= Version("0.42"):  # earlier releases import a pipeline's custom module themselves
    try:
        StableDiffusion3Pipeline.from_pretrained(root + "/sd3")
        raise SystemExit("loaded without the autoencoder module imported")
    except ValueError as e:
        assert "attnctl.toyworld.autoencoder" in str(e), e
import attnctl.toyworld.autoencoder  # noqa: F401  (registers the vae class for diffusers)
for name, cls in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
    pipe = cls.from_pretrained(root + "/" + name)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=24,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(img - np.load(root + "/" + name + ".npy")).max() <= {ROUND_OFF}, name
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_saved_attnctl_pipeline_is_a_plain_diffusers_folder(tmp_path, family):
    """attnctl's pipeline classes add no saved state: the folder names the diffusers class, so
    DiffusionPipeline.from_pretrained loads it (it failed on "AttnCtlSD3Pipeline"), and the attnctl class too."""
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    ours, stock = ((AttnCtlSD3Pipeline, StableDiffusion3Pipeline) if family == "sd3"
                   else (AttnCtlFluxPipeline, FluxPipeline))
    tiny = tiny_sd3_pipeline(family) if family == "sd3" else tiny_flux_pipeline()
    save_pipeline(ours(**tiny.components), tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == stock.__name__
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is stock
    assert type(ours.from_pretrained(tmp_path)) is ours
