"""Tiny SD3, SD3.5 and FLUX pipelines built offline from small configs, for tests and examples.

The weights are random (deterministic in ``seed``), so the images mean nothing; what matters is that
these are the stock diffusers pipeline classes with the real model classes, the same attention modules
and processors as the full-size models, the shapes-world tokenizer in every tokenizer slot, and the
lossless :class:`~attnctl.toyworld.autoencoder.PixelShuffleAutoencoder` as ``vae``. Nothing is
downloaded; building one takes a fraction of a second and a 2-step 32×32 generation well under one.

Sizes (defaults, ``factor=2`` autoencoder, 12 latent channels):

==========  ==========================================================================================
image       32×32 pixels: pass ``height=32, width=32`` (any multiple of 4 up to 128 works)
latent      16×16×12
SD3/SD3.5   patch 2 → 8×8 = 64 image tokens; text = 24 CLIP + ``max_sequence_length`` T5 tokens
            (48 with ``max_sequence_length=24``); joint sequence ``[image, text]``;
            2 joint blocks × 4 heads of 8 (SD3.5: ``qk_norm="rms_norm"``, ``attn2`` in both blocks)
FLUX        2×2 packing → 8×8 = 64 image tokens; text = ``max_sequence_length`` T5 tokens (24);
            joint sequence ``[text, image]``; 1 double + 2 single blocks × 2 heads of 16, RoPE (4, 6, 6)
==========  ==========================================================================================

Pass ``max_sequence_length=24`` (the tokenizer's length; the pipelines default to 256 / 512, which
works but pads T5 to that length). Typical call::

    pipe = tiny_sd3_pipeline("sd35")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                 max_sequence_length=24, output_type="np").images[0]

:func:`save_pipeline` writes an ordinary diffusers folder; ``StableDiffusion3Pipeline.from_pretrained``
and ``FluxPipeline.from_pretrained`` load it offline as long as ``attnctl.toyworld.autoencoder`` has
been imported (diffusers 0.42 resolves the custom ``vae`` class from ``sys.modules`` only; importing this
module does it; earlier releases import the module themselves).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from attnctl.toyworld.autoencoder import PixelShuffleAutoencoder
from attnctl.toyworld.tokenizer import DEFAULT_MAX_LENGTH, make_tokenizer

__all__ = [
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "save_pipeline",
    "tiny_clip_config",
    "tiny_t5_config",
    "TEXT_LENGTH",
    "VAE_FACTOR",
]

TEXT_LENGTH = DEFAULT_MAX_LENGTH
"""Token length of the tiny tokenizers (``<bos>`` + up to 22 words + ``<eos>``).

Pass it as ``max_sequence_length``."""

VAE_FACTOR = 2
"""Pixel-unshuffle factor of the tiny pipelines' autoencoder (their ``vae_scale_factor``)."""

_COMPONENT_SEEDS = {
    "transformer": 0,
    "text_encoder": 1,
    "text_encoder_2": 2,
    "text_encoder_3": 3,
}


@contextmanager
def _seeded(seed: int, component: str):
    """Seed the global RNG for building one component, leaving the caller's RNG state untouched.

    Each component gets its own seed, so e.g. ``t5=False`` does not change the transformer's weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + _COMPONENT_SEEDS[component])
        yield


def tiny_clip_config(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2
) -> CLIPTextConfig:
    """A small CLIP text config whose vocabulary, positions and special ids match ``tokenizer``.

    CLIP takes its pooled output at the first ``eos_token_id`` in the sequence, except when
    ``eos_token_id == 2``: transformers (still in 5.x) then falls back to the pre-2023 rule
    "position of the largest token id", which is not ``<eos>`` for a word-level vocabulary.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_config(
    tokenizer: PreTrainedTokenizerFast, d_model: int = 32, num_layers: int = 2, num_heads: int = 4
) -> T5Config:
    """A small T5 (v1.1-style, gated GELU) encoder config over ``tokenizer``'s vocabulary."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """Every component in eval mode (from-config models start in training mode), cast to ``dtype``."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
            if dtype != torch.float32:
                # nn.Module.to directly: diffusers' ModelMixin.to logs a spurious "should be kept in
                # float32: []" warning for every explicit dtype cast in 0.42.
                torch.nn.Module.to(component, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(
    variant: Literal["sd3", "sd35"] = "sd3",
    *,
    seed: int = 0,
    t5: bool = True,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` with random weights, built offline; same seed → same model.

    Args:
        variant: ``"sd3"`` (SD3-medium style: no QK-norm, no ``attn2``) or ``"sd35"`` (SD3.5 style:
            ``qk_norm="rms_norm"`` and ``dual_attention_layers=(0, 1)``, so every block has ``attn2``).
        seed: weights seed.
        t5: include the T5 encoder (``text_encoder_3``/``tokenizer_3``); without it the pipeline feeds
            zeros for the T5 part of the text sequence, as SD3 does.
        sample_size: the transformer's ``sample_size`` (latent side); the pipeline's default image is
            ``sample_size * 2`` pixels square (32×32 by default). Other sizes work up to 128×128.
        dtype: parameter dtype of every component.

    Transformer: 2 joint blocks, 4 heads × 8 (inner 32), patch 2, 12 in/out channels,
    ``pos_embed_max_size=32``; ``joint_attention_dim=32`` (T5 width), pooled 2×16.
    Text encoders: two CLIPTextModelWithProjection (hidden 16, 2 layers) and a T5 encoder
    (d_model 32, 2 layers, 4 heads). Scheduler: FlowMatchEulerDiscrete, shift 3.0.
    """
    if variant not in ("sd3", "sd35"):
        raise ValueError(f"variant must be 'sd3' or 'sd35', got {variant!r}")
    tok = make_tokenizer(TEXT_LENGTH)
    vae = PixelShuffleAutoencoder(factor=VAE_FACTOR, in_channels=3)
    latent_channels = vae.config.latent_channels
    clip_dim, t5_dim = 16, 32

    with _seeded(seed, "transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,
            pooled_projection_dim=2 * clip_dim,
            pos_embed_max_size=32,
            dual_attention_layers=(0, 1) if variant == "sd35" else (),
            qk_norm="rms_norm" if variant == "sd35" else None,
        )
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tok, clip_dim))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tok, clip_dim))
    text_encoder_3 = None
    if t5:
        with _seeded(seed, "text_encoder_3"):
            text_encoder_3 = T5EncoderModel(tiny_t5_config(tok, t5_dim))

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(TEXT_LENGTH),
        text_encoder_3=text_encoder_3,
        tokenizer_3=make_tokenizer(TEXT_LENGTH) if t5 else None,
    )
    return _finish(pipe, dtype)


def tiny_flux_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 16,
    guidance_embeds: bool = False,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """A tiny ``FluxPipeline`` with random weights, built offline; same seed → same model.

    Args:
        seed: weights seed.
        sample_size: latent side of the pipeline's default image (``pipe.default_sample_size``), so the
            default image is ``sample_size * 2`` pixels (32×32). FluxPipeline does not save this value:
            a reloaded pipeline defaults to 256×256, so always pass ``height``/``width``.
        guidance_embeds: FLUX.1-dev style guidance embedding (``guidance_scale`` becomes an input of the
            transformer); ``False`` is FLUX.1-schnell style.
        dtype: parameter dtype of every component.

    Transformer: 1 double + 2 single blocks, 2 heads × 16 (inner 32), ``axes_dims_rope=(4, 6, 6)``,
    48 in channels (12 latent channels × 2×2 packing), ``joint_attention_dim=32``, pooled 16.
    Text encoders: CLIPTextModel (hidden 16, 2 layers; pooled output only) and a T5 encoder
    (d_model 32, 2 layers, 4 heads). Scheduler: FlowMatchEulerDiscrete with dynamic shifting
    (``mu`` from 0.5 at 64 image tokens to 1.15 at 1024).
    """
    tok = make_tokenizer(TEXT_LENGTH)
    vae = PixelShuffleAutoencoder(factor=VAE_FACTOR, in_channels=3)
    clip_dim, t5_dim = 16, 32

    with _seeded(seed, "transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(tiny_clip_config(tok, clip_dim))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = T5EncoderModel(tiny_t5_config(tok, t5_dim))

    scheduler = flux_scheduler()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(TEXT_LENGTH),
    )
    pipe.default_sample_size = sample_size
    return _finish(pipe, dtype)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's flow-matching scheduler with dynamic shifting, anchored at the small models' 64 image tokens."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=64,
        max_image_seq_len=1024,
    )


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path) -> Path:
    """Save ``pipe`` as an ordinary diffusers folder (``model_index.json`` + safetensors) and return its path.

    The folder loads offline with ``type(pipe).from_pretrained(folder)``; ``model_index.json`` names the
    autoencoder ``["attnctl.toyworld.autoencoder", "PixelShuffleAutoencoder"]`` and the tokenizers
    ``["transformers", "TokenizersBackend"]`` (transformers 5.x's name for ``PreTrainedTokenizerFast``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
