"""attnctl: steer SD3, SD3.5 and FLUX.1 through their attention, as diffusers attention processors."""

from .controller import Controller, attach
from .controls import AttentionProbe, Control, control_from_json
from .controls.regulation import AttentionRegulation
from .controls.softpag import SoftPAG
from .layout import TokenLayout
from .processors import AttnCtlFluxProcessor, AttnCtlJointProcessor
from .sites import HeadSet, Site, list_sites, select_sites
from .toyworld import autoencoder as _autoencoder  # noqa: F401  (model_index.json names this module)

__version__ = "0.1.0"

__all__ = [
    "AttentionProbe", "AttentionRegulation", "AttnCtlFluxProcessor", "AttnCtlJointProcessor", "Control", "Controller",
    "HeadSet",
    "Site", "SoftPAG", "TokenLayout", "attach", "control_from_json", "list_sites", "select_sites",
]
