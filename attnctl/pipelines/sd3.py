"""``AttnCtlSD3Pipeline``: diffusers' ``StableDiffusion3Pipeline`` with ``controls=``."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusion3Pipeline

from .base import ControlledPipelineMixin


class AttnCtlSD3Pipeline(ControlledPipelineMixin, StableDiffusion3Pipeline):
    """Every argument of ``StableDiffusion3Pipeline.__call__``, plus ``controls``; ``from_pretrained``,
    LoRA loading and offloading work as in diffusers."""

    _t5_tokenizer_attr = "tokenizer_3"

    def __call__(self, *args: Any, controls=None, **kwargs: Any):
        return self.controlled_call(StableDiffusion3Pipeline.__call__, args, kwargs, controls)
