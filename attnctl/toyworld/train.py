"""Train the toy-sd3 and toy-flux pipelines on the shapes world with flow matching (rectified flow).

The objective is the one SD3 and FLUX.1 are trained with, in the convention the diffusers
``FlowMatchEulerDiscreteScheduler`` samples with:

- ``x0`` = the image folded by the pixel-unshuffle autoencoder and normalised as the pipelines do,
  ``(z - shift_factor) * scaling_factor`` (FLUX: then packed 2×2 into 64 tokens of 48 channels);
- ``sigma ~ logit-normal(0, 1)`` (SD3's sampling of training times) or uniform;
- ``x_t = (1 - sigma) * x0 + sigma * noise``;
- the transformer predicts the velocity ``noise - x0`` (``dx_t / dsigma``), so the scheduler's Euler step
  ``x += (sigma_next - sigma) * v`` walks from noise (sigma = 1) to the image (sigma = 0);
- the transformer is called exactly as the pipelines call it: SD3 with ``timestep = 1000 * sigma``,
  FLUX with ``timestep = sigma`` (FLUX multiplies by 1000 inside), prompts encoded by the pipelines' own
  ``encode_prompt`` (so training and sampling see the same text features, T5 zeros and all).

Captions are dropped to ``""`` with probability ``caption_dropout`` (10%) so classifier-free guidance
works. The tiny text encoders are trained jointly with the transformer by default (``train_text``).
An exponential moving average (EMA) of the weights is what the saved pipeline holds.

Command-style entry point::

    from attnctl.toyworld.train import train
    folder = train("toy-sd3", "/tmp/toy-sd3", steps=6000, batch=64, minutes=40)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)

``out_dir`` receives ``checkpoint.pt`` (weights, EMA, optimizer, step, RNG, elapsed time; written every
``checkpoint_every`` steps, at the end and when the time budget runs out), ``log.jsonl`` (loss, lr per
``log_every`` steps) and ``pipeline/`` (the diffusers pipeline folder, EMA weights, every component in
eval mode). ``resume=True`` continues from ``checkpoint.pt`` with the step count, optimizer, EMA and
learning-rate schedule where they were.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from attnctl.errors import ConfigError
from attnctl.stopping import StopAtBoundary
from attnctl.testing import flux_scheduler, save_pipeline, tiny_clip_config, tiny_t5_config
from attnctl.toyworld.autoencoder import PixelShuffleAutoencoder
from attnctl.toyworld.tokenizer import DEFAULT_MAX_LENGTH, make_tokenizer
from attnctl.toyworld.world import make_batch

__all__ = [
    "ToyArch",
    "PRESETS",
    "train",
    "build_pipeline",
    "flow_matching_loss",
    "guidance_distillation_loss",
    "export_checkpoint",
    "write_metadata",
    "call_defaults",
    "CHECKPOINT_NAME",
    "PIPELINE_DIR",
]

CHECKPOINT_NAME = "checkpoint.pt"
PIPELINE_DIR = "pipeline"
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class ToyArch:
    """Architecture of a toy pipeline (both families; fields that do not apply are ignored).

    SD3: ``num_layers`` joint blocks. FLUX: ``num_layers`` double + ``num_single_layers`` single blocks.
    Heads: ``num_heads`` of ``head_dim`` in every block. Text: CLIP encoders of width ``clip_dim`` and a
    T5 encoder of width ``t5_dim`` (SD3: two CLIPTextModelWithProjection + T5 when ``sd3_t5``, the
    pipeline's ``[CLIP-L ‖ CLIP-G padded to t5_dim ; T5]`` text sequence; without T5 the T5 part is zeros,
    as SD3 does, but then diffusers 0.42 needs ``text_encoder_3=None, tokenizer_3=None`` passed to
    ``from_pretrained``. FLUX: one CLIPTextModel for the pooled vector and the T5 encoder).
    """

    family: str  # "sd3" | "flux"
    num_layers: int = 6
    num_single_layers: int = 0
    num_heads: int = 4
    head_dim: int = 32
    clip_dim: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    t5_dim: int = 64
    t5_layers: int = 2
    t5_heads: int = 4
    text_length: int = DEFAULT_MAX_LENGTH
    resolution: int = 32
    vae_factor: int = 2
    shift: float = 3.0  # SD3 scheduler shift (FLUX uses dynamic shifting)
    train_text: bool = True
    sd3_t5: bool = True
    save_dtype: str = "float16"
    guidance_embeds: bool = False
    """FLUX only: a FLUX.1-dev style guidance embedding, so the guidance scale is an input of the transformer and
    sampling needs no unconditional branch. Such a model is made by guidance distillation (``distill_from``)."""
    pooled_text: bool = True
    """False: the transformer ignores the pooled text vector (its projection's weight is zero and frozen, the
    constant bias stays), so everything the model knows of the prompt reaches it through the text tokens of the
    joint attention. The pipeline still computes the pooled vector: stock diffusers runs the model unchanged."""

    @property
    def total_heads(self) -> int:
        return (self.num_layers + self.num_single_layers) * self.num_heads


_TOY_SD3 = ToyArch(family="sd3", num_layers=6, num_heads=4, head_dim=32, clip_dim=32, shift=3.0)
_TOY_FLUX = ToyArch(family="flux", num_layers=2, num_single_layers=4, num_heads=4, head_dim=32, clip_dim=32, t5_dim=64)

PRESETS: dict[str, ToyArch] = {
    "toy-sd3": _TOY_SD3,
    "toy-flux": _TOY_FLUX,
    "toy-sd3-tokens": replace(_TOY_SD3, pooled_text=False),
    "toy-flux-tokens": replace(_TOY_FLUX, pooled_text=False),
    "toy-flux-dev": replace(_TOY_FLUX, guidance_embeds=True),
}
"""The toy architectures (24 heads each): the shipped toy-sd3 and toy-flux, their ``-tokens`` variants that
read the prompt only through the text tokens (fine-tuned from the plain ones with ``init_from``), and
``toy-flux-dev``, toy-flux with a guidance embedding, distilled from toy-flux's true CFG (``distill_from``)."""


def _arch(model: str | ToyArch, overrides: dict[str, Any] | None) -> ToyArch:
    if isinstance(model, ToyArch):
        arch = model
    elif model in PRESETS:
        arch = PRESETS[model]
    elif model in ("sd3", "flux"):
        arch = replace(PRESETS[f"toy-{model}"])
    else:
        raise ConfigError(
            f"unknown toy model {model!r}",
            f"train one of {', '.join(PRESETS)} (or pass a ToyArch)",
        )
    if overrides:
        known = {f.name for f in fields(ToyArch)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown architecture fields {bad}", f"use fields of ToyArch: {sorted(known)}")
        arch = replace(arch, **overrides)
    if arch.family not in ("sd3", "flux"):
        raise ConfigError(f"family must be 'sd3' or 'flux', got {arch.family!r}")
    if arch.guidance_embeds and arch.family != "flux":
        raise ConfigError("guidance_embeds is a FLUX option; SD3 has no guidance embedding",
                          "drop guidance_embeds, or train a FLUX toy model (e.g. toy-flux-dev)")
    return arch


# ----------------------------------------------------------------------------------------------- building


def build_pipeline(arch: ToyArch, seed: int = 0) -> DiffusionPipeline:
    """A stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with random weights for ``arch``.

    Components are left in training mode with gradients on; :func:`train` trains them.
    """
    torch.manual_seed(seed)
    tok = make_tokenizer(arch.text_length)
    vae = PixelShuffleAutoencoder(factor=arch.vae_factor, in_channels=3)
    ch = vae.config.latent_channels
    latent_side = arch.resolution // arch.vae_factor
    inner = arch.num_heads * arch.head_dim
    if arch.family == "sd3":
        joint_dim = max(arch.t5_dim, 2 * arch.clip_dim) if arch.sd3_t5 else 2 * arch.clip_dim
        if arch.sd3_t5 and arch.t5_dim < 2 * arch.clip_dim:
            raise ConfigError(
                f"t5_dim ({arch.t5_dim}) must be at least 2 * clip_dim ({2 * arch.clip_dim})",
                "SD3 pads the two CLIP embeddings to the T5 width; raise t5_dim or lower clip_dim",
            )
        transformer = SD3Transformer2DModel(
            sample_size=latent_side,
            patch_size=2,
            in_channels=ch,
            out_channels=ch,
            num_layers=arch.num_layers,
            attention_head_dim=arch.head_dim,
            num_attention_heads=arch.num_heads,
            joint_attention_dim=joint_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * arch.clip_dim,
            pos_embed_max_size=max(latent_side // 2, 8),
        )
        clip_cfg = tiny_clip_config(tok, arch.clip_dim, arch.clip_layers, arch.clip_heads)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=arch.shift),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(clip_cfg),
            tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(clip_cfg),
            tokenizer_2=make_tokenizer(arch.text_length),
            text_encoder_3=T5EncoderModel(tiny_t5_config(tok, arch.t5_dim, arch.t5_layers, arch.t5_heads))
            if arch.sd3_t5
            else None,
            tokenizer_3=make_tokenizer(arch.text_length) if arch.sd3_t5 else None,
        )
    else:
        rope = _rope_axes(arch.head_dim)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * ch,
            num_layers=arch.num_layers,
            num_single_layers=arch.num_single_layers,
            attention_head_dim=arch.head_dim,
            num_attention_heads=arch.num_heads,
            joint_attention_dim=arch.t5_dim,
            pooled_projection_dim=arch.clip_dim,
            guidance_embeds=arch.guidance_embeds,
            axes_dims_rope=rope,
        )
        scheduler = flux_scheduler()
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=CLIPTextModel(tiny_clip_config(tok, arch.clip_dim, arch.clip_layers, arch.clip_heads)),
            tokenizer=tok,
            text_encoder_2=T5EncoderModel(tiny_t5_config(tok, arch.t5_dim, arch.t5_layers, arch.t5_heads)),
            tokenizer_2=make_tokenizer(arch.text_length),
        )
        pipe.default_sample_size = latent_side
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX RoPE axes (text-id axis, y, x) summing to ``head_dim``, each even: 32 → (8, 12, 12)."""
    xy = (head_dim * 3 // 8) // 2 * 2
    return (head_dim - 2 * xy, xy, xy)


def _ignore_pooled(pipe: DiffusionPipeline, arch: ToyArch) -> None:
    """``pooled_text=False``: zero and freeze the weight of the pooled-text projection (in place)."""
    if arch.pooled_text:
        return
    weight = pipe.transformer.time_text_embed.text_embedder.linear_2.weight
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)


def _source(source: str | Path) -> tuple[str | Path, dict[str, Any]]:
    """A fine-tune's source: its folder (or hub id) and its ``attnctl.json`` (empty when it has none)."""
    from attnctl.toyworld.models import resolve_model, toy_metadata

    folder = resolve_model(source)
    return folder, (toy_metadata(folder) if isinstance(folder, Path) else None) or {}


def _load_weights(pipe: DiffusionPipeline, arch: ToyArch, source: str | Path) -> None:
    """Copy the transformer and text-encoder weights and the scheduler settings of a toy pipeline folder (or shipped
    name) into ``pipe``: a fine-tune samples as its source does."""
    from attnctl.toyworld.models import load_pipeline

    folder, meta = _source(source)
    theirs = meta.get("arch")
    if theirs is not None:
        free = ("pooled_text", "save_dtype", "guidance_embeds", "train_text")  # what a fine-tune may change
        mine = {k: v for k, v in asdict(arch).items() if k not in free}
        diff = sorted(k for k, v in mine.items() if theirs.get(k, v) != v)
        if diff:
            raise ConfigError(f"init_from={str(source)!r} has another architecture ({', '.join(diff)} differ)",
                              "start from a pipeline of the same toy model, or train from scratch")
    src = load_pipeline(folder, controlled=False)
    # the source's scheduler settings (toy-sd3 samples at shift 2.0, not the architecture's 3.0)
    pipe.scheduler = type(src.scheduler).from_config(src.scheduler.config)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        mine_c, theirs_c = getattr(pipe, name, None), getattr(src, name, None)
        if (mine_c is None) != (theirs_c is None):
            raise ConfigError(f"init_from={str(source)!r} has no {name} where this model has one (or the reverse)",
                              "start from a pipeline of the same toy model")
        if mine_c is None:
            continue
        state = {k: v.float() for k, v in theirs_c.state_dict().items()}
        if name == "transformer":
            _load_transformer(mine_c, state, source)
        else:
            mine_c.load_state_dict(state)


GUIDANCE_EMBEDDER = "time_text_embed.guidance_embedder."
"""Parameter prefix of FLUX's guidance embedding (present only with ``guidance_embeds=True``)."""


def _load_transformer(transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a source transformer's weights; a guidance embedding the source lacks starts at zero output, so the
    model starts as exactly the source (the conditional branch of its CFG) and learns the guidance from there."""
    mine = transformer.state_dict()
    new = sorted(k for k in mine if k not in state)
    if any(not k.startswith(GUIDANCE_EMBEDDER) for k in new) or any(k not in mine for k in state):
        raise ConfigError(f"init_from={str(source)!r}: its transformer's parameters do not match this model's",
                          "start from a pipeline of the same toy model")
    transformer.load_state_dict(state, strict=not new)
    if new:
        out_layer = transformer.time_text_embed.guidance_embedder.linear_2
        with torch.no_grad():
            out_layer.weight.zero_()
            out_layer.bias.zero_()


def _trainable(pipe: DiffusionPipeline, arch: ToyArch) -> torch.nn.ModuleDict:
    names = ["transformer"]
    if arch.train_text:
        names += [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
    return torch.nn.ModuleDict({n: getattr(pipe, n) for n in names})


# ------------------------------------------------------------------------------------------ the objective


def encode_images(pipe: DiffusionPipeline, images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×3`` images → the clean latents ``x0`` the transformer sees (FLUX: packed)."""
    from ..inversion import pixels_to_latents

    return pixels_to_latents(pipe, torch.from_numpy(np.ascontiguousarray(images)))


def _text(pipe: DiffusionPipeline, captions: list[str], arch: ToyArch) -> dict[str, torch.Tensor]:
    if isinstance(pipe, FluxPipeline):
        emb, pooled, text_ids = pipe.encode_prompt(
            captions, device=torch.device("cpu"), max_sequence_length=arch.text_length
        )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": text_ids}
    emb, _, pooled, _ = pipe.encode_prompt(
        captions,
        None,
        None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=arch.text_length,
    )
    return {"encoder_hidden_states": emb, "pooled_projections": pooled}


def predict(pipe: DiffusionPipeline, x_t: torch.Tensor, sigma: torch.Tensor, text: dict, arch: ToyArch,
            guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's velocity prediction, called exactly as the pipeline calls it (``guidance``: the
    per-sample guidance scale of a model with a guidance embedding, as FluxPipeline passes it)."""
    if isinstance(pipe, FluxPipeline):
        side = arch.resolution // arch.vae_factor // 2
        img_ids = pipe._prepare_latent_image_ids(x_t.shape[0], side, side, x_t.device, x_t.dtype)
        return pipe.transformer(
            hidden_states=x_t,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=text["pooled_projections"],
            encoder_hidden_states=text["encoder_hidden_states"],
            txt_ids=text["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
    return pipe.transformer(
        hidden_states=x_t,
        timestep=sigma * 1000.0,
        encoder_hidden_states=text["encoder_hidden_states"],
        pooled_projections=text["pooled_projections"],
        return_dict=False,
    )[0]


def sample_sigmas(n: int, generator: torch.Generator, mode: str = "logit_normal") -> torch.Tensor:
    """Training noise levels in (0, 1): logit-normal(0, 1) as SD3 (Esser et al. 2024) or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator).clamp(1e-4, 1 - 1e-4)
    raise ConfigError(f"unknown time sampling {mode!r}", "use 'logit_normal' or 'uniform'")


def flow_matching_loss(
    pipe: DiffusionPipeline,
    captions: list[str],
    images: np.ndarray,
    arch: ToyArch,
    generator: torch.Generator,
    time_sampling: str = "logit_normal",
) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_t, sigma) - (noise - x0)|²`` for one batch."""
    x0, noise, sigma, x_t = _noised(pipe, images, generator, time_sampling)
    v = predict(pipe, x_t, sigma, _text(pipe, captions, arch), arch)
    return F.mse_loss(v.float(), noise - x0)


def _noised(pipe: DiffusionPipeline, images: np.ndarray, generator: torch.Generator, time_sampling: str):
    """``x0`` of a batch, its noise, its noise levels and ``x_t = (1 - sigma) x0 + sigma noise``."""
    x0 = encode_images(pipe, images)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = sample_sigmas(x0.shape[0], generator, time_sampling)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return x0, noise, sigma, (1.0 - s) * x0 + s * noise


def guidance_distillation_loss(
    pipe: DiffusionPipeline,
    teacher: DiffusionPipeline,
    captions: list[str],
    images: np.ndarray,
    arch: ToyArch,
    generator: torch.Generator,
    guidance_range: tuple[float, float] = (1.0, 8.0),
    time_sampling: str = "logit_normal",
) -> torch.Tensor:
    """Guidance distillation (Meng et al. 2023, as FLUX.1-dev is made): ``|v(x_t, sigma, g) − v_g|²`` with the
    teacher's classifier-free guided velocity ``v_g = v_u + g (v_c − v_u)`` and ``g ~ U(guidance_range)``.

    Each model reads the prompts through its own text encoders (the same frozen weights when the student starts
    from the teacher, as :func:`train` does by default); only the student's transformer gets gradients.
    """
    _, _, sigma, x_t = _noised(pipe, images, generator, time_sampling)
    g_lo, g_hi = guidance_range
    g = g_lo + (g_hi - g_lo) * torch.rand(x_t.shape[0], generator=generator)
    with torch.no_grad():
        text = _text(teacher, captions + [""] * len(captions), arch)
        both = predict(teacher, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), text, arch).float()
        v_c, v_u = both.chunk(2)
        target = v_u + g.view(-1, *([1] * (x_t.ndim - 1))) * (v_c - v_u)
        student_text = _text(pipe, captions, arch)
    return F.mse_loss(predict(pipe, x_t, sigma, student_text, arch, guidance=g).float(), target)


# -------------------------------------------------------------------------------------------- training


def _lr_at(step: int, progress: float, lr: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``final_frac * lr`` over progress."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class _EMA:
    """Exponential moving average of floating-point parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in module.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            p.copy_(self.shadow[k])


def _save_checkpoint(path: Path, payload: dict) -> None:
    """Write the checkpoint whole or not at all (a temp file, then a rename); a failed write (a full disk) leaves
    the last checkpoint as it was, removes its temp file and says so."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write the checkpoint {str(path)!r} ({' '.join(str(e).split())[:200]})",
                          "free space on that disk (or pick another --out); the last checkpoint is kept") from None


DEFAULT_GUIDANCE: dict[str, float] = {"sd3": 4.0, "flux-guidance": 5.0}
"""Guidance scale written into a new toy folder's call defaults: toy-sd3's classifier-free guidance, and the
embedded guidance of a FLUX model with ``guidance_embeds`` (toy-flux-dev). Plain toy-flux: no guidance."""


def call_defaults(arch: ToyArch, guidance_scale: float | None = None) -> dict[str, Any]:
    """The pipeline-call defaults of a toy model (what :func:`attnctl.toyworld.models.default_call_kwargs` returns)."""
    call: dict[str, Any] = {
        "height": arch.resolution,
        "width": arch.resolution,
        "num_inference_steps": 20,
        "max_sequence_length": arch.text_length,
    }
    key = "sd3" if arch.family == "sd3" else "flux-guidance" if arch.guidance_embeds else None
    if key is not None:
        call["guidance_scale"] = DEFAULT_GUIDANCE[key] if guidance_scale is None else float(guidance_scale)
    return call


def write_metadata(folder: str | Path, name: str, arch: ToyArch, training: dict[str, Any] | None = None,
                   call: dict[str, Any] | None = None) -> Path:
    """Write ``attnctl.json`` (name, family, call defaults, architecture, training record) into a pipeline folder."""
    from attnctl.toyworld.models import METADATA_NAME

    f = Path(folder) / METADATA_NAME
    meta = {
        "name": name,
        "family": arch.family,
        "call": call if call is not None else call_defaults(arch),
        "arch": asdict(arch),
        "training": training or {},
    }
    f.write_text(json.dumps(meta, indent=2) + "\n")
    return f


def _source_call(init_from: str | Path | None) -> dict[str, Any] | None:
    """The call defaults of the pipeline a fine-tune started from (a fine-tune keeps its guidance scale)."""
    meta = _source(init_from)[1] if init_from is not None else {}
    return dict(meta["call"]) if "call" in meta else None


def _export(pipe: DiffusionPipeline, trainable: torch.nn.ModuleDict, ema: _EMA | None, arch: ToyArch, folder: Path,
            name: str = "custom", training: dict[str, Any] | None = None) -> Path:
    """Write the pipeline folder with the EMA weights (if any), every component in eval mode."""
    backup = {k: v.detach().clone() for k, v in trainable.state_dict().items()} if ema is not None else None
    if ema is not None:
        ema.copy_to(trainable)
    dtype = getattr(torch, arch.save_dtype)
    try:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        # Only the transformer is stored in ``save_dtype``: diffusers loads it back as float32 by default,
        # while transformers 5 keeps a text encoder's stored dtype (fp16 CLIP/T5 would then feed fp16
        # embeddings to an fp32 transformer). The text encoders are tiny, so they stay float32.
        if dtype != torch.float32:
            torch.nn.Module.to(pipe.transformer, dtype)
        save_pipeline(pipe, folder)
        training = training or {}
        # a fine-tune keeps its source's call defaults; a distilled model samples with its own guidance
        source_call = None if training.get("distill_from") else _source_call(training.get("init_from"))
        write_metadata(folder, name, arch, training, source_call)
    finally:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, torch.float32)
        if backup is not None:
            trainable.load_state_dict(backup)
    return folder


def _teacher(source: str | Path, arch: ToyArch):
    """The frozen teacher of a guidance distillation, and the student's architecture (text encoders frozen)."""
    from attnctl.toyworld.models import load_pipeline

    if not arch.guidance_embeds:
        raise ConfigError("guidance distillation needs a model with a guidance embedding",
                          "train toy-flux-dev (or pass arch={'guidance_embeds': True})")
    teacher = load_pipeline(source, controlled=False)
    if not isinstance(teacher, FluxPipeline) or teacher.transformer.config.guidance_embeds:
        raise ConfigError(f"distill_from={str(source)!r} is not a FLUX pipeline without a guidance embedding",
                          "distil from toy-flux (or another FLUX folder sampled with true CFG)")
    for component in teacher.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, torch.float32)
            component.eval().requires_grad_(False)
    return teacher, replace(arch, train_text=False)


def train(
    model: str = "toy-sd3",
    out_dir: str | Path = "toy-model",
    steps: int | None = None,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    arch: dict[str, Any] | None = None,
    threads: int | None = None,
    caption_dropout: float = 0.1,
    omit_named: float = 0.0,
    time_sampling: str = "logit_normal",
    ema_decay: float | None = 0.999,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    warmup: int = 200,
    checkpoint_every: int = 250,
    log_every: int = 25,
    init_from: str | Path | None = None,
    distill_from: str | Path | None = None,
    guidance_range: tuple[float, float] = (1.0, 8.0),
) -> Path:
    """Train a toy pipeline and return its diffusers folder (``out_dir/pipeline``).

    Args:
        model: ``"toy-sd3"`` or ``"toy-flux"`` (the architecture presets in :data:`PRESETS`).
        out_dir: where the checkpoint, the log and the pipeline folder go.
        steps: total optimizer steps (the cosine learning-rate schedule spans them); default 6000, or on a resume
            the run's own (a larger number extends it).
        batch: images per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine to 5%).
        seed: weights and data seed (batches are ``make_batch(seed * 1_000_003 + step, ...)``).
        minutes: wall-clock budget for this run, counted across resumes: training stops cleanly when
            it is spent, saves the checkpoint and the pipeline. With a budget, the learning-rate
            schedule follows whichever runs out first, steps or time, so it always finishes its decay.
        resume: continue from ``out_dir/checkpoint.pt`` (architecture, step, optimizer, EMA, elapsed time).
        progress: show a tqdm progress bar.
        arch: overrides of the preset's :class:`ToyArch` fields (e.g. tiny widths for tests).
        threads: ``torch.set_num_threads`` for this process (``None`` leaves it).
        caption_dropout: fraction of captions replaced by ``""`` (for classifier-free guidance).
        omit_named: fraction of multi-object scenes drawn without one of the objects their caption names
            (a neglect-prone world; see :func:`~attnctl.toyworld.world.make_batch`).
        time_sampling: ``"logit_normal"`` or ``"uniform"`` noise levels.
        ema_decay: EMA decay of the weights the pipeline is saved with; ``None`` saves the raw weights.
        checkpoint_every, log_every: in steps.
        init_from: start from the weights of this toy pipeline (a shipped name or a folder) of the same
            architecture instead of random ones — a fine-tune, e.g. ``toy-sd3`` → ``toy-sd3-tokens``.
        distill_from: guidance distillation instead of flow matching (:func:`guidance_distillation_loss`): the
            model (one with ``guidance_embeds``, e.g. ``toy-flux-dev``) learns this FLUX teacher's classifier-free
            guided velocity at guidance scales drawn from ``guidance_range``. It starts from the teacher's weights
            (unless ``init_from`` says otherwise) and trains the transformer only: its text encoders stay frozen
            (the teacher's, by default, so both read the same text features).
    """
    from tqdm.auto import tqdm

    if not 0.0 <= omit_named <= 1.0:
        raise ConfigError(f"omit_named={omit_named!r} is not a fraction in [0, 1]",
                          "give the share of multi-object scenes to draw without one named object, e.g. 0.3")
    check_minutes(minutes)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME

    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise ConfigError(
                f"no checkpoint to resume from: {ckpt_path} does not exist", "train with resume=False first"
            )
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        a = ToyArch(**ckpt["arch"])
        hp = ckpt["hparams"]
        seed, batch, model, lr = hp["seed"], hp["batch"], hp["model"], hp["lr"]
        warmup = hp.get("warmup", warmup)  # the learning-rate schedule goes on as it was set up
        steps = hp["steps"] if steps is None else steps
        minutes = hp.get("minutes") if minutes is None else minutes
        init_from = hp.get("init_from")  # recorded, so the export keeps the source's call defaults
        omit_named = hp.get("omit_named", 0.0)  # the world it was trained on
        distill_from = hp.get("distill_from")
        # the run's own objective and optimiser settings (a resume with the defaults silently changed them)
        caption_dropout = hp.get("caption_dropout", caption_dropout)
        time_sampling = hp.get("time_sampling", time_sampling)
        ema_decay = hp.get("ema_decay", ema_decay)
        weight_decay = hp.get("weight_decay", weight_decay)
        grad_clip = hp.get("grad_clip", grad_clip)
        guidance_range = tuple(hp.get("guidance_range") or guidance_range)
    else:
        a = _arch(model, arch)
    steps = 6000 if steps is None else steps
    if distill_from is None and getattr(a, "guidance_embeds", False):
        raise ConfigError(f"{model!r} takes a guidance value, which it learns only from a teacher's classifier-free "
                          "guidance (plain flow matching gives it none)",
                          "pass distill_from (--distill-from toy-flux), or train toy-flux")
    teacher = None
    if distill_from is not None:
        g_lo, g_hi = (float(x) for x in guidance_range)
        if not 0.0 <= g_lo <= g_hi:
            raise ConfigError(f"guidance_range={tuple(guidance_range)} is not an interval of scales ≥ 0",
                              "give (low, high) with 0 ≤ low ≤ high, e.g. (1, 8)")
        teacher, a = _teacher(distill_from, a)
        init_from = distill_from if init_from is None else init_from

    pipe = build_pipeline(a, seed)
    if init_from is not None:  # on a resume too: what the checkpoint does not hold (frozen parts) comes from here
        _load_weights(pipe, a, init_from)
    trainable = _trainable(pipe, a)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            is_trained = name in trainable
            component.train(is_trained)
            component.requires_grad_(is_trained)
    _ignore_pooled(pipe, a)
    params = [p for p in trainable.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
    )
    ema = _EMA(trainable, ema_decay) if ema_decay else None
    step, elapsed = 0, 0.0
    if ckpt is not None:
        trainable.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.shadow = ckpt["ema"]
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    hparams = {
        "model": model if isinstance(model, str) else "custom",
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "minutes": minutes,
        "caption_dropout": caption_dropout,
        "omit_named": omit_named,
        "time_sampling": time_sampling,
        "ema_decay": ema_decay,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "warmup": warmup,
        "init_from": None if init_from is None else str(init_from),
        "distill_from": None if distill_from is None else str(distill_from),
        "guidance_range": None if distill_from is None else list(guidance_range),
    }
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    budget = None if minutes is None else 60.0 * minutes
    # smoothed training loss (into checkpoints and the exported record) and the log's window, carried over a resume
    smooth: float | None = ckpt.get("smooth_loss") if ckpt is not None else None
    window: list[float] = list(ckpt.get("log_window") or []) if ckpt is not None else []
    stopped_by_time = False

    def checkpoint() -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "arch": asdict(a),
                "hparams": hparams,
                "step": step,
                "elapsed": elapsed,
                "model": trainable.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.shadow if ema is not None else None,
                "rng": {"torch": torch.get_rng_state()},
                "transformer_params": n_params,
                "smooth_loss": smooth,
                "log_window": window,
                "stopped_by_time": stopped_by_time,
            },
        )

    with open(out / LOG_NAME, "a") as log:
        desc = f"train {hparams['model']}"
        bar = tqdm(total=steps, initial=step, disable=not progress, desc=desc, dynamic_ncols=True)
        t_last = time.perf_counter()
        stopper = StopAtBoundary(bar.write if progress else None, "this training step")
        try:
            with stopper:  # a first Ctrl-C ends the loop after a whole step, so the checkpoint matches its step
                while step < steps and not stopper.stop:
                    if budget is not None and elapsed >= budget:
                        stopped_by_time = True
                        break
                    progress_frac = step / steps
                    if budget is not None:
                        progress_frac = max(progress_frac, elapsed / budget)
                    cur_lr = _lr_at(step, progress_frac, lr, warmup)
                    for g in opt.param_groups:
                        g["lr"] = cur_lr
                    captions, images = make_batch(seed * 1_000_003 + step, batch, a.resolution, caption_dropout,
                                                 omit_named)
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
                    if teacher is None:
                        loss = flow_matching_loss(pipe, captions, images, a, gen, time_sampling)
                    else:
                        loss = guidance_distillation_loss(pipe, teacher, captions, images, a, gen, guidance_range,
                                                          time_sampling)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else None
                    opt.step()
                    if ema is not None:
                        ema.update(trainable, step)
                    step += 1
                    now = time.perf_counter()
                    elapsed += now - t_last
                    t_last = now
                    lv = float(loss.detach())
                    window.append(lv)
                    smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
                    bar.update(1)
                    bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{cur_lr:.2e}", refresh=False)
                    if step % log_every == 0 or step == steps:
                        rec = {
                            "step": step,
                            "loss": float(np.mean(window)),
                            "lr": cur_lr,
                            "grad_norm": None if gnorm is None else float(gnorm),
                            "elapsed": round(elapsed, 1),
                        }
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        window.clear()
                    if step % checkpoint_every == 0:
                        checkpoint()
                        t_last = time.perf_counter()  # checkpoint I/O does not count against the budget
        finally:
            bar.close()
        checkpoint()  # (a second Ctrl-C, mid-step, leaves the last checkpoint as it was: it skips this)
        if stopper.stop and step < steps:
            raise KeyboardInterrupt  # the work so far is kept: resume=True continues from here
        record = dict(hparams, step=step, elapsed_s=round(elapsed, 1), stopped_by_time=stopped_by_time,
                      final_loss=None if smooth is None else round(smooth, 5), transformer_params=n_params)
        folder = _export(pipe, trainable, ema, a, out / PIPELINE_DIR, hparams["model"], record)
        log.write(
            json.dumps({"done": True, "step": step, "elapsed": round(elapsed, 1), "stopped_by_time": stopped_by_time})
            + "\n"
        )
    return folder


RESUME_FIXED = ("model", "batch", "lr", "warmup", "seed", "init_from", "omit_named", "distill_from",
                "caption_dropout", "time_sampling", "ema_decay", "weight_decay", "grad_clip")
"""Settings a resumed run keeps from its checkpoint (``steps`` and ``minutes`` may grow: the run is extended)."""


def check_minutes(minutes: float | None) -> None:
    """Refuse a time budget that leaves no time to train: it wrote an untrained pipeline without a word."""
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"a time budget of {minutes} minutes leaves no time to train (the pipeline written would "
                          "be untrained)", "give a budget above 0 minutes, e.g. --minutes 30, or leave it out")


def checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """The settings a checkpoint was trained with (its ``hparams``) and the ``step`` it reached."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return dict(ckpt["hparams"], step=int(ckpt["step"]))


def export_checkpoint(out_dir: str | Path, folder: str | Path | None = None, *, ema: bool = True) -> Path:
    """Write the pipeline folder of ``out_dir/checkpoint.pt`` (EMA weights unless ``ema=False``) to ``folder``.

    ``folder`` defaults to ``out_dir/pipeline``. Useful to look at a run while it trains, or to ship a
    checkpoint whose run was stopped.
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    if not ckpt_path.exists():
        raise ConfigError(f"no checkpoint at {ckpt_path}", "point out_dir at a folder written by train()")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    a = ToyArch(**ckpt["arch"])
    hp = ckpt.get("hparams", {})
    pipe = build_pipeline(a, 0)
    if hp.get("init_from") is not None:  # the parts the checkpoint does not hold (frozen text encoders)
        _load_weights(pipe, a, hp["init_from"])
    trainable = _trainable(pipe, a)
    trainable.load_state_dict(ckpt["model"])
    shadow = None
    if ema and ckpt.get("ema") is not None:
        shadow = _EMA.__new__(_EMA)
        shadow.shadow = ckpt["ema"]
    smooth = ckpt.get("smooth_loss")  # None in checkpoints written before it was stored
    record = dict(hp, step=int(ckpt["step"]), elapsed_s=round(float(ckpt["elapsed"]), 1),
                  stopped_by_time=ckpt.get("stopped_by_time"), final_loss=None if smooth is None else round(smooth, 5),
                  transformer_params=ckpt.get("transformer_params"))
    return _export(pipe, trainable, shadow, a, Path(folder) if folder is not None else out / PIPELINE_DIR,
                   hp.get("model", "custom"), record)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train a toy pipeline (toy-sd3, toy-flux, their variants) on the shapes "
                                            "world.")
    p.add_argument("model", choices=sorted(PRESETS))
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=None, help="default 6000; on a resume, the run's own")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--arch", type=json.loads, default=None, help='JSON overrides, e.g. \'{"num_layers": 4}\'')
    p.add_argument("--time-sampling", default="logit_normal")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--init-from", default=None, help="fine-tune from this toy pipeline (name or folder)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--omit-named", type=float, default=0.0,
                   help="fraction of multi-object scenes drawn without one object their caption names")
    p.add_argument("--distill-from", default=None,
                   help="guidance distillation from this FLUX teacher (name or folder), e.g. toy-flux for toy-flux-dev")
    p.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 8.0), metavar=("LOW", "HIGH"))
    args = p.parse_args(argv)
    folder = train(
        args.model,
        args.out_dir,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        minutes=args.minutes,
        resume=args.resume,
        progress=not args.no_progress,
        arch=args.arch,
        threads=args.threads,
        time_sampling=args.time_sampling,
        checkpoint_every=args.checkpoint_every,
        init_from=args.init_from,
        warmup=args.warmup,
        omit_named=args.omit_named,
        distill_from=args.distill_from,
        guidance_range=tuple(args.guidance_range),
    )
    print(folder)


if __name__ == "__main__":
    _main()
