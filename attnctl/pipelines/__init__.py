"""attnctl pipelines: subclasses of the diffusers SD3 and FLUX pipelines that take ``controls=``."""

from .flux import AttnCtlFluxPipeline
from .sd3 import AttnCtlSD3Pipeline

__all__ = ["AttnCtlFluxPipeline", "AttnCtlSD3Pipeline"]
