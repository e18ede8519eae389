"""``AttnCtlFluxPipeline``: diffusers' ``FluxPipeline`` with ``controls=``."""

from __future__ import annotations

from typing import Any

from diffusers import FluxPipeline

from .base import ControlledPipelineMixin


class AttnCtlFluxPipeline(ControlledPipelineMixin, FluxPipeline):
    """Every argument of ``FluxPipeline.__call__``, plus ``controls``; ``from_pretrained``, LoRA loading,
    ``mu`` dynamic shifting and offloading work as in diffusers.

    One default differs: ``max_sequence_length`` is the T5 tokenizer's length when that is under 256 (the toy
    models' 24 tokens, which they were trained on), where ``FluxPipeline`` pads to 512; FLUX.1's own tokenizer
    (512) keeps diffusers' default. Pass ``max_sequence_length=`` to choose.

    With a guidance control such as ``SoftPAG(heads=..., scale=w)`` the conditional transformer call runs
    ``[cond, perturbed]`` rows in one forward: ``ε = ε_cond + w·(ε_cond − ε_ptb)``; with true CFG
    (``true_cfg_scale > 1`` and a negative prompt) ``ε = ε_neg + s·(ε_cond − ε_neg) + w·(ε_cond − ε_ptb)``.
    """

    _t5_tokenizer_attr = "tokenizer_2"

    def __call__(self, *args: Any, controls=None, **kwargs: Any):
        return self.controlled_call(FluxPipeline.__call__, args, kwargs, controls)
