"""``AttnCtlFluxPipeline``: diffusers' ``FluxPipeline`` with ``controls=``."""

from __future__ import annotations

from typing import Any

from diffusers import FluxPipeline

from .base import ControlledPipelineMixin


class AttnCtlFluxPipeline(ControlledPipelineMixin, FluxPipeline):
    """Every argument of ``FluxPipeline.__call__``, plus ``controls``; ``from_pretrained``, LoRA loading,
    ``mu`` dynamic shifting and offloading work as in diffusers."""

    _t5_tokenizer_attr = "tokenizer_2"

    def __call__(self, *args: Any, controls=None, **kwargs: Any):
        return self.controlled_call(FluxPipeline.__call__, args, kwargs, controls)
