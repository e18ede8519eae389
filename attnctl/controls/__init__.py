"""Controls: one small class per method over :class:`Control`."""

from .base import CONTROL_TYPES, Control, ControlConfig, RunState, control_from_json, register
from .epipolar import EpipolarAttention
from .isolation import IsolationAttention
from .layout_guidance import LayoutGuidance
from .probe import AttentionProbe
from .regulation import AttentionRegulation
from .softpag import SoftPAG
from .unify_edit import UnifyEdit
from .value_sharing import ValueSharing

__all__ = ["CONTROL_TYPES", "AttentionProbe", "AttentionRegulation", "Control", "ControlConfig", "EpipolarAttention",
           "IsolationAttention", "RunState", "LayoutGuidance", "control_from_json", "register", "SoftPAG",
           "UnifyEdit", "ValueSharing"]
