"""attnctl attention processors: drop-in replacements of the stock SD3 / FLUX processors."""

from .attend import attend, fused_attention, fused_attention_with_lse
from .base import AttnCtlProcessor, SiteCall
from .contributions import (
    DenseBias,
    ExtraKV,
    KeyBias,
    MixContext,
    OutputMix,
    PartialAttention,
    Probe,
    Selection,
    SharedValues,
)
from .flux import AttnCtlFluxProcessor
from .sd3 import AttnCtlJointProcessor

__all__ = [
    "AttnCtlFluxProcessor", "AttnCtlJointProcessor", "AttnCtlProcessor", "DenseBias", "ExtraKV", "KeyBias",
    "MixContext", "OutputMix", "PartialAttention", "Probe", "Selection", "SharedValues", "SiteCall", "attend",
    "fused_attention", "fused_attention_with_lse", "processor_for",
]


def processor_for(site, controller=None) -> AttnCtlProcessor:
    """The attnctl processor class that fits a site."""
    cls = AttnCtlFluxProcessor if site.family == "flux" else AttnCtlJointProcessor
    return cls(site, controller)
