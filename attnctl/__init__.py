"""attnctl: steer SD3, SD3.5 and FLUX.1 through their attention, as diffusers attention processors.

The public names below load on first use (PEP 562), so ``import attnctl`` and ``attnctl --help`` do not pay
for importing diffusers and torch; ``from attnctl import SoftPAG`` works as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Controller": ".controller", "attach": ".controller",
    "AttentionProbe": ".controls", "Control": ".controls", "control_from_json": ".controls",
    "AttentionRegulation": ".controls.regulation", "SoftPAG": ".controls.softpag",
    "LayoutGuidance": ".controls.layout_guidance", "EpipolarAttention": ".controls.epipolar",
    "IsolationAttention": ".controls.isolation", "UnifyEdit": ".controls.unify_edit",
    "ValueSharing": ".controls.value_sharing",
    "Camera": ".epipolar", "StereoRig": ".epipolar", "OrbitRig": ".epipolar",
    "invert": ".inversion", "edit": ".editing", "EditResult": ".editing",
    "FlowMatchMidpointScheduler": ".midpoint", "RFInversion": ".rf_inversion",
    "TokenLayout": ".layout",
    "AttnCtlFluxProcessor": ".processors", "AttnCtlJointProcessor": ".processors",
    "HeadSet": ".sites", "Site": ".sites", "list_sites": ".sites", "select_sites": ".sites",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static analysis and IDEs see
    from .controller import Controller as Controller
    from .controller import attach as attach
    from .controls import AttentionProbe as AttentionProbe
    from .controls import Control as Control
    from .controls import control_from_json as control_from_json
    from .controls.epipolar import EpipolarAttention as EpipolarAttention
    from .controls.isolation import IsolationAttention as IsolationAttention
    from .controls.layout_guidance import LayoutGuidance as LayoutGuidance
    from .controls.regulation import AttentionRegulation as AttentionRegulation
    from .controls.softpag import SoftPAG as SoftPAG
    from .controls.unify_edit import UnifyEdit as UnifyEdit
    from .controls.value_sharing import ValueSharing as ValueSharing
    from .editing import EditResult as EditResult
    from .editing import edit as edit
    from .epipolar import Camera as Camera
    from .epipolar import OrbitRig as OrbitRig
    from .epipolar import StereoRig as StereoRig
    from .inversion import invert as invert
    from .layout import TokenLayout as TokenLayout
    from .midpoint import FlowMatchMidpointScheduler as FlowMatchMidpointScheduler
    from .processors import AttnCtlFluxProcessor as AttnCtlFluxProcessor
    from .processors import AttnCtlJointProcessor as AttnCtlJointProcessor
    from .rf_inversion import RFInversion as RFInversion
    from .sites import HeadSet as HeadSet
    from .sites import Site as Site
    from .sites import list_sites as list_sites
    from .sites import select_sites as select_sites


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attnctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _ComponentModuleStub(types.ModuleType):
    """Stands in ``sys.modules`` for a module that a saved pipeline names for a component, until a name is read
    from it.

    The toy pipelines' ``model_index.json`` names ``attnctl.toyworld.autoencoder`` for their ``vae``, and a pipeline
    saved with the midpoint scheduler names ``attnctl.midpoint``. diffusers (0.42) looks such a library up in
    ``sys.modules`` only, so after ``import attnctl`` a stock ``StableDiffusion3Pipeline`` /
    ``FluxPipeline.from_pretrained(folder)`` must find it there. The real modules import diffusers, so one is
    imported when diffusers first reads one of its names. Dunder probes (``inspect`` and friends walk
    ``sys.modules``) never trigger the import.
    """

    def _load(self) -> types.ModuleType:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in vars(real).items() if k not in ("__name__", "__spec__")})
        return real

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def _register_component_modules() -> None:
    for name in ("attnctl.toyworld.autoencoder", "attnctl.midpoint"):
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        stub = _ComponentModuleStub(name)
        stub.__file__ = spec.origin if spec is not None else None
        sys.modules[name] = stub


_register_component_modules()
