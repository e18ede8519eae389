"""Control panels: one small module per control kind, found by this registry.

A panel module defines ``PANEL = Panel(...)``: the control ``kind`` it edits, the module that defines that
control, a title and a one-line description, and three functions:

- ``default(ctx) -> dict``: the config of a new control for the loaded model (``ctx``);
- ``render(ctx, key, config) -> dict``: Streamlit widgets editing ``config`` (widget keys start with
  ``key``), returning the new config — validation is the app's job (``control_from_json``);
- ``summary(config) -> str``: one line for the control's card header.

Adding a control to the UI is adding one module here: :func:`available_panels` imports every module of
this package, and offers a panel only when its control module imports and registers its kind (a control
still being written simply does not appear). Kinds without a panel open in the generic JSON panel
(``json_panel.py``), so controls restored from a PNG are never lost.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GENERIC = "json"
"""Kind of the generic panel (any control as JSON)."""


@dataclass
class PanelContext:
    """What a panel may look at: the loaded model's sites and family, the run length, the prompt's words."""

    sites: list[Any] = field(default_factory=list)
    family: str | None = None
    steps: int = 20
    words: list[str] = field(default_factory=list)
    is_toy: bool = False
    prompt: str = ""  # the prompt itself, for the phrase checks (words where they stand together)

    def absent(self, words: list[str]) -> list[str]:
        """The words or phrases a run would not find in the prompt (:func:`attnctl.layout.absent_words`)."""
        from ...layout import absent_words

        return absent_words(words, self.prompt or " ".join(self.words))


@dataclass(frozen=True)
class Panel:
    kind: str
    module: str
    title: str
    description: str
    default: Callable[[PanelContext], dict[str, Any]]
    render: Callable[[PanelContext, str, dict[str, Any]], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    icon: str = ":material/tune:"
    order: int = 50


def config_default(kind: str, name: str, fallback: Any = None) -> Any:
    """The default of field ``name`` of the control ``kind``'s config (JSON form), so a panel shows what the
    control would do for a field the config leaves out."""
    try:
        from ...controls.base import CONTROL_TYPES

        f = CONTROL_TYPES[kind].Config.model_fields.get(name)
    except Exception:  # noqa: BLE001 - unknown kind or a control module mid-edit
        return fallback
    if f is None or f.is_required():
        return fallback
    value = f.get_default(call_default_factory=True)
    to_json = getattr(value, "to_json", None)
    return to_json() if callable(to_json) else value


def _discover() -> list[Panel]:
    panels = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - a broken panel must not take the app down
            log.warning("attnctl ui: panel module %s does not import: %s", info.name, e)
            continue
        panel = getattr(mod, "PANEL", None)
        if isinstance(panel, Panel):
            panels.append(panel)
    return sorted(panels, key=lambda p: (p.order, p.title))


def _control_available(panel: Panel) -> bool:
    if panel.kind == GENERIC:
        return True
    try:
        importlib.import_module(panel.module)
        from ...controls.base import CONTROL_TYPES
    except Exception as e:  # noqa: BLE001 - a control being written may not import yet
        log.info("attnctl ui: control module %s is not available: %s", panel.module, e)
        return False
    return panel.kind in CONTROL_TYPES


def available_panels() -> dict[str, Panel]:
    """Panels whose control is importable, by kind, in display order (the generic JSON panel last)."""
    return {p.kind: p for p in _discover() if _control_available(p)}


def panel_for(kind: str, panels: dict[str, Panel] | None = None) -> Panel:
    """The panel that edits controls of ``kind`` (the generic JSON panel when none is dedicated)."""
    panels = available_panels() if panels is None else panels
    return panels.get(kind) or panels[GENERIC]


__all__ = ["GENERIC", "Panel", "PanelContext", "available_panels", "config_default", "panel_for"]
