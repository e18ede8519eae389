"""The generic panel: any control as its JSON config. Kinds without a dedicated panel open here (so a
control restored from a PNG is never dropped), and it lets a new method be tried before its panel exists."""

from __future__ import annotations

import json
from typing import Any

from . import GENERIC, Panel, PanelContext


def default(ctx: PanelContext) -> dict[str, Any]:
    words = [w for w in ctx.words if w.isalpha()][-1:] or ["circle"]
    return {"kind": "probe", "words": words}


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ...controls.base import CONTROL_TYPES
    from ..widgets import keyed

    text = keyed(st.text_area, f"{key}.json", json.dumps(config, indent=2), "Control JSON", height=180,
                 max_chars=20000, help=f"Known kinds: {', '.join(sorted(CONTROL_TYPES))}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        st.error(f"Not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", icon="⚠️")
        return {**config, "_error": f"not valid JSON ({e.msg})"}
    if not isinstance(data, dict):
        st.error("Write one JSON object with a \"kind\".", icon="⚠️")
        return {**config, "_error": "not a JSON object"}
    return data


def summary(config: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in config.items() if k != "kind"}, separators=(",", ":"))
    return text if len(text) <= 70 else text[:67] + "…"


PANEL = Panel(
    kind=GENERIC,
    module="attnctl.controls.base",
    title="Any control (JSON)",
    description="Any attnctl control, written as its JSON config.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/data_object:",
    order=99,
)
