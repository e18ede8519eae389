"""Transformer configs of the full-size models, for shape checks without weights.

Each entry holds the published architecture values of the model's ``transformer/config.json`` (the
arguments of diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``). :func:`build_empty`
builds the transformer on the meta device, buffers included (SD3's positional-embedding table is not
computed): for each built-in config the build adds under 10 MB to the process and takes 0.2-0.3 s on a
2-core CPU machine (importing torch and diffusers first costs more: about 0.4 GB and several seconds),
with every attention module in place, so site lists, head counts, processor installation and shape-only
forwards on the meta device can be checked without a GPU. ``attnctl inspect --config NAME`` and
``attnctl batch``'s model check (:func:`attnctl.skeleton.pipeline_skeleton`) use it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .errors import AttnCtlError

TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 joint blocks × 24 heads of 64, no QK-norm.
    "sd3-medium": {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "dual_attention_layers": [],
        "qk_norm": None,
    },
    # stabilityai/stable-diffusion-3.5-medium: SD3-medium widths, QK-norm, attn2 in blocks 0-12.
    "sd3.5-medium": {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)),
        "qk_norm": "rms_norm",
    },
    # stabilityai/stable-diffusion-3.5-large: 38 joint blocks × 38 heads of 64, QK-norm, no attn2.
    "sd3.5-large": {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 38,
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "dual_attention_layers": [],
        "qk_norm": "rms_norm",
    },
    # black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks × 24 heads of 128, guidance embedding.
    "flux.1-dev": {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
    # black-forest-labs/FLUX.1-schnell: FLUX.1-dev without the guidance embedding.
    "flux.1-schnell": {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56],
    },
}
"""Built-in transformer configs by name (``_class_name`` names the diffusers class)."""

SUPPORTED_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def transformer_config(name_or_file: str | Path) -> dict[str, Any]:
    """A built-in config by name, or a transformer ``config.json`` file (a copy; safe to modify)."""
    key = str(name_or_file)
    if key.lower() in TRANSFORMER_CONFIGS:
        return copy.deepcopy(TRANSFORMER_CONFIGS[key.lower()])
    path = Path(key).expanduser()
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer" / "config.json"
    elif path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise AttnCtlError(
            f"unknown transformer config {key!r}",
            f"use one of {', '.join(TRANSFORMER_CONFIGS)}, or the path of a transformer config.json",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AttnCtlError(f"cannot read the transformer config {path}: {e}",
                           "pass a diffusers transformer config.json") from None
    if not isinstance(config, dict):
        raise AttnCtlError(f"{path} is not a JSON object", "pass a diffusers transformer config.json")
    return config


def build_empty(config: dict[str, Any]):
    """The transformer of ``config`` on the meta device, parameters and buffers (no data allocated or computed)."""
    import diffusers
    import torch

    cls_name = config.get("_class_name")
    if cls_name not in SUPPORTED_CLASSES:
        raise AttnCtlError(
            f"transformer class {cls_name!r} is not supported",
            f"attnctl works with {' and '.join(SUPPORTED_CLASSES)} (SD3, SD3.5 and FLUX.1)",
        )
    cls = getattr(diffusers, cls_name)
    # (not accelerate's init_empty_weights: it leaves buffers on the CPU, and SD3.5-medium's positional-embedding
    # table alone took 4 GB and 20 s to compute there)
    with torch.device("meta"):
        try:
            return cls.from_config(config)
        except (TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: a size of 0 divides by zero
            raise AttnCtlError(f"cannot build {cls_name} from this config: {type(e).__name__}: {e}",
                               "check the config's values against the diffusers class (sizes are positive "
                               "whole numbers)") from None
