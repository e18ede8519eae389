"""Epipolar panel: the views of a camera rig generated together, each seeing the others along its epipolar lines.

The rig is a stereo pair or an orbit (``attnctl.StereoRig`` / ``attnctl.OrbitRig``); a config restored with explicit
cameras (a PNG made in Python or from a JSON file) keeps them and shows their count. The run makes one image per
camera: the baseline draws the same views independently, from the same noise.
"""

from __future__ import annotations

from typing import Any

from . import Panel, PanelContext, config_default

RIGS = {"stereo": "Stereo pair", "orbit": "Orbit"}
CUSTOM = "cameras"
FALLOFFS = {"hard": "Hard band", "soft": "Soft falloff", "adaptive": "Adaptive (keep strong keys off the band)",
            "none": "None (plain extended attention)"}


def default(ctx: PanelContext) -> dict[str, Any]:
    return {"kind": "epipolar", "rig": {"kind": "stereo", "roll": 90.0}}


def _rig_editor(key: str, rig: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ...epipolar import OrbitRig, StereoRig
    from ..widgets import keyed

    kind = keyed(st.segmented_control, f"{key}.rig", rig.get("kind", "stereo"), "Cameras", options=list(RIGS),
                 format_func=RIGS.get, required=True) or "stereo"
    base = (StereoRig if kind == "stereo" else OrbitRig)().model_dump()
    value = {**base, **{k: v for k, v in rig.items() if k in base}, "kind": kind}
    # Only what changes the epipolar lines is offered: they depend on the cameras' directions, not on how far apart
    # they stand (a stereo baseline, an orbit's radius), and a stereo pair's lines are the same at any field of view.
    # Those values stay as given (a PNG's or JSON's), for the cameras the run records.
    a, b = st.columns(2)
    if kind == "stereo":
        value["roll"] = float(keyed(a.slider, f"{key}.roll", float(value["roll"]), "Roll of the second camera, °",
                                    min_value=-180.0, max_value=180.0, step=5.0,
                                    help="0: a rectified pair (the epipolar lines are the image rows)"))
        st.caption("A stereo pair's lines depend on its roll only: its baseline and field of view change no image "
                   "(set them in the JSON panel for the cameras the run records).")
        return value
    value["views"] = int(keyed(a.number_input, f"{key}.views", int(value["views"]), "Views", min_value=2,
                               max_value=8, step=1, help="One image per camera, made in one call"))
    most = min(90.0, 359.0 / (value["views"] - 1))
    value["degrees"] = float(keyed(b.slider, f"{key}.degrees", float(value["degrees"]), "Degrees apart",
                                   min_value=1.0, max_value=float(int(most)), step=1.0,
                                   help="Angle between neighbouring cameras around the scene centre"))
    st.caption("An orbit's radius changes no image (the lines depend on the cameras' directions); set it in the "
               "JSON panel for the cameras the run records.")
    value["fov"] = float(keyed(st.slider, f"{key}.fov", float(value["fov"]), "Field of view, °", min_value=10.0,
                               max_value=120.0, step=5.0))
    return value


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ..schedules_ui import schedule_editor
    from ..widgets import keyed

    cfg = dict(config)

    def get(name: str, fallback: Any = None) -> Any:
        return cfg[name] if cfg.get(name) is not None else config_default("epipolar", name, fallback)

    stash = f"{key}.given_cameras"  # cameras that came with the config, kept while a rig is tried instead
    if cfg.get("cameras"):
        st.session_state[stash] = cfg["cameras"]
    given = st.session_state.get(stash)
    keep = bool(given) and keyed(st.toggle, f"{key}.custom", True, f"Use the {len(given)} given cameras",
                                 help="These cameras came with the config (JSON or a PNG); switch off to use a "
                                      "rig instead (they stay here to switch back)")
    if keep:
        cfg["cameras"] = given
        cfg.pop("rig", None)
    else:
        cfg.pop("cameras", None)
        cfg["rig"] = _rig_editor(key, dict(cfg.get("rig") or {}))
    a, b = st.columns(2)
    falloff = keyed(a.selectbox, f"{key}.falloff", get("falloff", "hard"), "Falloff", options=list(FALLOFFS),
                    format_func=FALLOFFS.get, help="How the other views' keys off the epipolar line are treated")
    cfg["falloff"] = falloff
    cfg["band"] = float(keyed(b.number_input, f"{key}.band", float(get("band", 1.0)), "Band, tokens",
                              min_value=0.05, max_value=64.0, step=0.25, format="%g",
                              help="Half-width of the band around each epipolar line, in tokens"))
    if falloff == "soft":
        cfg["alpha"] = float(keyed(a.number_input, f"{key}.alpha", float(get("alpha", 3.0)), "Falloff slope",
                                   min_value=0.0, max_value=100.0, step=0.5, format="%g"))
    else:
        cfg.pop("alpha", None)
    if falloff == "adaptive":
        cfg["strong"] = float(keyed(a.number_input, f"{key}.strong", float(get("strong", 8.0)), "Strong above, × even",
                                    min_value=0.01, max_value=1000.0, step=1.0, format="%g",
                                    help="A key off the band stays where the row gives it at least this many times "
                                         "an even share of its attention"))
    else:
        cfg.pop("strong", None)
    scale, err = schedule_editor(f"{key}.scale", "Weight of the other views over the run", get("scale", 1.0),
                                 ctx.steps, lo=0.0, hi=None,
                                 help="0: the views are independent at that step (the stock kernel)")
    if scale is not None:
        cfg["scale"] = scale
    if err:
        cfg["_error"] = err
    return cfg


def summary(config: dict[str, Any]) -> str:
    from ...epipolar import OrbitRig, StereoRig
    from ..schedules_ui import describe

    rig = config.get("rig") or {}
    if config.get("cameras"):
        cams = f"{len(config['cameras'])} given cameras"
    elif rig.get("kind") == "orbit":
        fields = OrbitRig.model_fields
        cams = (f"orbit of {rig.get('views', fields['views'].default)} views "
                f"{rig.get('degrees', fields['degrees'].default):g}° apart")
    else:
        cams = f"stereo pair, roll {rig.get('roll', StereoRig.model_fields['roll'].default):g}°"
    falloff = config.get("falloff", config_default("epipolar", "falloff", "hard"))
    band = config.get("band", config_default("epipolar", "band", 1.0))
    scale = config.get("scale", config_default("epipolar", "scale", 1.0))
    return f"{cams} · {FALLOFFS.get(falloff, falloff).lower()}, band {band:g} · weight {describe(scale)}"


PANEL = Panel(
    kind="epipolar",
    module="attnctl.controls.epipolar",
    title="Epipolar views",
    description="Several views of one scene made together, consistent along the cameras' epipolar lines.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/3d_rotation:",
    order=45,
)
