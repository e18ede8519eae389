"""SoftPAG panel: which heads to perturb (whole layers, single heads, or a HeadHunter head set), the target
map (method presets PAG / SoftPAG / SoftUG / SoftSEG), and the schedules of ``u`` and of the guidance
weight ``w``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import Panel, PanelContext, config_default

METHODS = {
    "softpag": ("SoftPAG — identity, joint map", "identity", "joint"),
    "pag": ("PAG — identity, image block (diffusers)", "identity", "image"),
    "softug": ("SoftUG — uniform", "uniform", "joint"),
    "softseg": ("SoftSEG — mean query", "mean_query", "joint"),
}
TARGETS = ("identity", "uniform", "mean_query")
SCOPES = ("joint", "image")
MODES = ("layers", "heads", "preset")
MODE_LABELS = {"layers": "Whole layers", "heads": "Single heads", "preset": "Head set"}
MAX_HEAD_OPTIONS = 768
"""Above this many heads in the model, single heads are typed as selectors instead of listed."""

_LAYER = re.compile(r"^L\d+$")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def _joint_sites(ctx: PanelContext) -> list[Any]:
    joint = [s for s in ctx.sites if s.kind in ("sd3_joint", "flux_double", "flux_single")]
    return joint or list(ctx.sites)


def default(ctx: PanelContext) -> dict[str, Any]:
    joint = _joint_sites(ctx)
    mid = joint[len(joint) // 2].label if joint else "L0"
    return {"kind": "softpag", "heads": [mid], "u": {"kind": "constant", "value": 1.0}, "target": "identity",
            "scope": "joint", "scale": {"kind": "constant", "value": 3.0}}


def head_presets(ctx: PanelContext) -> dict[str, dict[str, Any]]:
    """Head sets shipped in ``attnctl/presets/`` that fit the loaded model, by file stem (never a user path)."""
    out: dict[str, dict[str, Any]] = {}
    if not PRESETS_DIR.is_dir():
        return out
    from ...sites import model_fingerprint

    names = {s.name for s in ctx.sites}
    ours = model_fingerprint(ctx.sites)
    for f in sorted(PRESETS_DIR.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        heads = data.get("heads") if isinstance(data, dict) else None
        model = data.get("model") if isinstance(data, dict) else None
        fits = not isinstance(model, dict) or all(model.get(k) in (None, ours[k]) for k in ("family", "sites", "heads"))
        if isinstance(heads, dict) and heads and set(heads) <= names and fits:
            out[f.stem] = {"heads": heads, "model": data.get("model")}
    return out


def preset_label(name: str) -> str:
    """A shipped head set's name with the model its search ran on (a toy-flux set also fits toy-flux-dev)."""
    try:
        searched = json.loads((PRESETS_DIR / f"{name}.json").read_text()).get("search", {}).get("model")
    except (OSError, ValueError, AttributeError):
        searched = None
    return f"{name} · searched on {searched}" if searched else name


def mode_of(heads: Any) -> str:
    if isinstance(heads, dict):
        return "preset"
    if isinstance(heads, str):
        heads = [heads]
    if isinstance(heads, list) and heads and all(isinstance(h, str) and _LAYER.match(h.strip()) for h in heads):
        return "layers"
    return "heads"


def selected_pairs(ctx: PanelContext, heads: Any) -> list[tuple[int, int]]:
    """(site index, head) pairs a heads value selects on the loaded model ([] when it does not resolve)."""
    from ...errors import AttnCtlError
    from ...sites import HeadSet

    if not ctx.sites or not heads:
        return []
    try:
        hs = HeadSet.from_json(heads) if isinstance(heads, dict) else HeadSet.parse(ctx.sites, heads)
        return sorted((site.index, h) for site, hh in hs.resolve(ctx.sites).items() for h in hh)
    except (AttnCtlError, ValueError, TypeError):
        return []


def head_options(ctx: PanelContext) -> list[str]:
    return [f"L{s.index}H{h}" for s in ctx.sites for h in range(s.heads)]


def heads_chart(ctx: PanelContext, pairs: list[tuple[int, int]]):
    import altair as alt
    import pandas as pd

    chosen = set(pairs)
    rows = [{"layer": f"L{s.index}", "order": s.index, "head": h, "kind": s.kind,
             "selected": "perturbed" if (s.index, h) in chosen else "stock"}
            for s in ctx.sites for h in range(s.heads)]
    df = pd.DataFrame(rows)
    n_heads = max((s.heads for s in ctx.sites), default=1)
    cell = max(8, min(22, 360 // max(n_heads, 1)))
    return alt.Chart(df).mark_rect(stroke="#0f1117", strokeWidth=1, cornerRadius=2).encode(
        x=alt.X("head:O", axis=alt.Axis(title=None, labelAngle=0, labelFontSize=9, orient="top")),
        y=alt.Y("layer:O", sort=alt.SortField("order"), axis=alt.Axis(title=None, labelFontSize=9)),
        color=alt.Color("selected:N", scale=alt.Scale(domain=["stock", "perturbed"], range=["#2a2f3d", "#ff7a45"]),
                        legend=None),
        tooltip=["layer", "head", "kind", "selected"],
    ).properties(width=alt.Step(cell), height=alt.Step(cell))


def _apply_method(key: str) -> None:
    import streamlit as st

    method = st.session_state.get(f"{key}.method")
    if method in METHODS:
        _, target, scope = METHODS[method]
        st.session_state[f"{key}.target"] = target
        st.session_state[f"{key}.scope"] = scope


def _method_of(target: str, scope: str) -> str:
    for name, (_, t, s) in METHODS.items():
        if (t, s) == (target, scope):
            return name
    return "custom"


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ..widgets import keyed

    cfg = dict(config)
    heads = cfg.get("heads") or default(ctx)["heads"]
    if isinstance(heads, str):  # one selector, as the library reads a string
        heads = [heads.strip()]

    # -- method (follows target and scope when those are edited by hand)
    methods = list(METHODS) + ["custom"]
    target = st.session_state.get(f"{key}.target", cfg.get("target", "identity"))
    scope = st.session_state.get(f"{key}.scope", cfg.get("scope", "joint"))
    if st.session_state.get(f"{key}.method") != "custom":  # "custom" stays until a preset is picked
        st.session_state[f"{key}.method"] = _method_of(target, scope)
    keyed(st.selectbox, f"{key}.method", _method_of(target, scope),
          "Method", options=methods, format_func=lambda m: METHODS[m][0] if m in METHODS else "custom target / scope",
          on_change=_apply_method, args=(key,),
          help="Presets of the target map and scope; PAG is diffusers' layer-level perturbed-attention guidance.")
    a, b = st.columns(2)
    cfg["target"] = keyed(a.selectbox, f"{key}.target", cfg.get("target", "identity"), "Target map",
                          options=list(TARGETS), help="identity: each token sees only itself (PAG); uniform: "
                                                      "every key alike (SoftUG); mean_query: the mean query's map")
    cfg["scope"] = keyed(b.selectbox, f"{key}.scope", cfg.get("scope", "joint"), "Scope", options=list(SCOPES),
                         help="joint: the whole joint map; image: the image→image block only")

    # -- heads
    if not ctx.sites:  # no model loaded: the heads stay as they are until one is
        st.caption(f"Heads: {summary({'heads': heads}).split(' · ')[0]} (chosen once a model loads)")
        cfg["heads"] = heads
        return _strengths(ctx, key, cfg)
    presets = head_presets(ctx)
    modes = [m for m in MODES if m != "preset" or presets or mode_of(heads) == "preset"]
    mode = keyed(st.segmented_control, f"{key}.mode", mode_of(heads), "Heads", options=modes,
                 format_func=lambda m: MODE_LABELS[m], required=True,
                 help="Perturb every head of some layers, single heads, or a head set found by HeadHunter.")
    mode = mode or "layers"
    if mode == "layers":
        options = [s.label for s in ctx.sites] or ["L0"]
        names = {s.label: f"{s.label} · {s.name} · {s.heads} heads" for s in ctx.sites}
        current = [h.strip() for h in (heads if isinstance(heads, list) else []) if _LAYER.match(str(h).strip())]
        chosen = keyed(st.multiselect, f"{key}.layers", current or default(ctx)["heads"], "Layers",
                       options=options, format_func=lambda x: names.get(x, x),
                       placeholder="choose layers", label_visibility="collapsed")
        cfg["heads"] = list(chosen)
    elif mode == "heads":
        # whole layers chosen before stay chosen, as their heads (L3 → L3H0 … L3H23)
        current = heads if isinstance(heads, list) else []
        options = head_options(ctx)
        if len(options) <= MAX_HEAD_OPTIONS:
            picked = [f"L{i}H{h}" for i, h in selected_pairs(ctx, current)]
            chosen = keyed(st.multiselect, f"{key}.heads", picked, "Heads", options=options,
                           placeholder="choose heads, e.g. L3H1", label_visibility="collapsed")
            cfg["heads"] = list(chosen)
        else:
            text = keyed(st.text_input, f"{key}.heads_text", ", ".join(current), "Head selectors", max_chars=2000,
                         help="e.g. L13H7, L13H0:4, transformer_blocks.3.attn/H1,5", label_visibility="collapsed")
            cfg["heads"] = [t.strip() for t in text.split(",") if t.strip()]
    else:
        names = list(presets) or ["(restored head set)"]
        current_name = next((n for n, p in presets.items() if isinstance(heads, dict)
                             and p["heads"] == heads.get("heads")), names[0])
        name = keyed(st.selectbox, f"{key}.preset", current_name, "Head set", options=names,
                     format_func=preset_label, label_visibility="collapsed")
        cfg["heads"] = presets.get(name, heads)
    pairs = selected_pairs(ctx, cfg["heads"])
    st.caption(f"{len(pairs)} of {sum(s.heads for s in ctx.sites)} heads perturbed")
    st.altair_chart(heads_chart(ctx, pairs), width="content")
    return _strengths(ctx, key, cfg)


def _strengths(ctx: PanelContext, key: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from ..schedules_ui import schedule_editor

    u0 = cfg.get("u", config_default("softpag", "u", 1.0))
    w0 = cfg.get("scale", config_default("softpag", "scale", 3.0))
    u, err_u = schedule_editor(f"{key}.u", "u · toward the target", u0, ctx.steps, lo=0.0, hi=1.0,
                               help="How far each perturbed map moves toward the target: 0 leaves it as it is, "
                                    "1 replaces it.")
    w, err_w = schedule_editor(f"{key}.scale", "w · guidance weight", w0, ctx.steps,
                               help="ε = ε_cfg + w·(ε_cond − ε_perturbed).")
    if u is not None:
        cfg["u"] = u
    if w is not None:
        cfg["scale"] = w
    if err_u or err_w:
        cfg["_error"] = err_u or err_w
    return cfg


def summary(config: dict[str, Any]) -> str:
    from ..schedules_ui import describe

    heads = config.get("heads")
    if isinstance(heads, dict):
        n = sum(len(v) for v in (heads.get("heads") or {}).values())
        what = f"head set ({n} heads)"
    elif isinstance(heads, list):
        what = ", ".join(heads[:4]) + (" …" if len(heads) > 4 else "")
    else:
        what = str(heads)
    return f"{what} · {config.get('target', 'identity')}/{config.get('scope', 'joint')} · " \
           f"u {describe(config.get('u', 1.0))} · w {describe(config.get('scale', 3.0))}"


PANEL = Panel(
    kind="softpag",
    module="attnctl.controls.softpag",
    title="SoftPAG",
    description="Perturbed-attention guidance on chosen heads: steer away from a degraded prediction.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/blur_on:",
    order=10,
)
