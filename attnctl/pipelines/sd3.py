"""``AttnCtlSD3Pipeline``: diffusers' ``StableDiffusion3Pipeline`` with ``controls=``."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusion3Pipeline

from .base import ControlledPipelineMixin


class AttnCtlSD3Pipeline(ControlledPipelineMixin, StableDiffusion3Pipeline):
    """Every argument of ``StableDiffusion3Pipeline.__call__``, plus ``controls``; ``from_pretrained``,
    LoRA loading and offloading work as in diffusers.

    One default differs: ``max_sequence_length`` is the T5 tokenizer's length when that is under 256 (the toy
    models' 24 tokens, which they were trained on), where ``StableDiffusion3Pipeline`` pads to 256; SD3's own
    tokenizer keeps diffusers' default. Pass ``max_sequence_length=`` to choose.

    With a guidance control such as ``SoftPAG(heads=..., scale=w)`` the transformer runs
    ``[uncond, cond, perturbed]`` rows in one forward (``[cond, perturbed]`` when ``guidance_scale <= 1``)
    and the step uses ``ε = ε_uncond + s·(ε_cond − ε_uncond) + w·(ε_cond − ε_ptb)``.
    """

    _t5_tokenizer_attr = "tokenizer_3"

    def __call__(self, *args: Any, controls=None, **kwargs: Any):
        return self.controlled_call(StableDiffusion3Pipeline.__call__, args, kwargs, controls)
