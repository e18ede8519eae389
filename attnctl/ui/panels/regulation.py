"""Attention regulation panel: the words that must get their share of attention, where (sites) and when
(a schedule over the steps), and how hard the inner optimisation works."""

from __future__ import annotations

import json
from typing import Any

from . import Panel, PanelContext, config_default

STOPWORDS = {"a", "an", "and", "the", "of", "on", "at", "in", "to", "two", "three", "next", "with", "is", "are",
             "left", "right", "top", "bottom", "above", "below", "middle", "small", "large", "by", "for", "from"}
SITE_MODES = {"mid": "middle third (default)", "all": "all joint sites", "pick": "choose sites",
              "other": "as written"}
JOINT_KINDS = ("sd3_joint", "flux_double", "flux_single")


def default_targets(words: list[str]) -> list[str]:
    """Shapes of the toy world when the prompt names them, else the first two content words."""
    from ...toyworld import vocab

    nouns = set(vocab.SHAPES) | set(getattr(vocab, "PLURALS", {}).values())
    picked = [w for w in words if w in nouns]
    if picked:
        return picked[:3]
    return [w for w in words if w not in STOPWORDS][:2]


def default(ctx: PanelContext) -> dict[str, Any]:
    return {"kind": "regulation", "targets": default_targets(ctx.words) or ["circle"], "sites": "mid",
            "steps": {"kind": "window", "value": 1.0, "start": 0.0, "stop": 0.5}, "iterations": 20, "lr": 100.0}


def _site_mode(sites: Any, labels: list[str]) -> str:
    """The panel's mode for a ``sites`` value: a list of this model's joint-site labels is picked in the panel;
    any other selector (``"L1:3"``, ``"*"``, module names, a PNG's sites of another model) is kept as written."""
    if sites in ("mid", "all"):
        return str(sites)
    if isinstance(sites, list) and all(s in labels for s in sites):
        return "pick"
    return "other"


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ..schedules_ui import schedule_editor
    from ..widgets import keyed

    cfg = dict(config)

    def get(name: str, fallback: Any = None) -> Any:
        return cfg[name] if name in cfg else config_default("regulation", name, fallback)

    given_targets = cfg.get("targets") or []
    targets = [given_targets] if isinstance(given_targets, str) else [str(t) for t in given_targets]
    options = list(dict.fromkeys([w for w in ctx.words if w not in {",", "."}] + targets))
    chosen = keyed(st.multiselect, f"{key}.targets", targets or default_targets(ctx.words), "Words to balance",
                   options=options, placeholder="words of the prompt",
                   help="Each word gets its share of the image's attention (a learned spatial bias on its "
                        "logits). Words must appear in the prompt.")
    cfg["targets"] = list(chosen)
    missing = ctx.absent(chosen)
    if missing:
        st.warning(f"Not in the prompt: {', '.join(missing)}", icon="⚠️")

    joint = [s for s in ctx.sites if s.kind in JOINT_KINDS]
    labels = [s.label for s in joint]
    if not ctx.sites:  # no model loaded: the sites stay as they are until one is
        sites = get("sites", "mid")
        st.caption(f"Sites: {sites if isinstance(sites, str) else ', '.join(map(str, sites))} "
                   "(chosen once a model loads)")
        cfg["sites"] = sites
    else:
        _sites_editor(key, cfg, get("sites", "mid"), joint, labels)

    steps, err = schedule_editor(f"{key}.steps", "When · active where > 0", get("steps", 1.0), ctx.steps,
                                 lo=0.0, help="The control acts at the steps where this schedule is above 0 "
                                              "(default: the first half of the run).")
    if steps is not None:
        cfg["steps"] = steps
    a, b = st.columns(2)
    cfg["iterations"] = int(keyed(a.number_input, f"{key}.iterations", int(get("iterations", 20)),
                                  "Iterations", min_value=0, max_value=200, step=1,
                                  help="Inner gradient steps per site and step (0: off)."))
    cfg["lr"] = float(keyed(b.number_input, f"{key}.lr", float(get("lr", 100.0)), "Step size", min_value=0.001,
                            max_value=1e5, step=10.0, format="%g"))
    with st.expander("More settings"):
        c, d = st.columns(2)
        cfg["q"] = float(keyed(c.number_input, f"{key}.q", float(get("q", 0.9)), "Quantile target q",
                               min_value=0.0, max_value=1.0, step=0.05, format="%g"))
        cfg["w_mean"] = float(keyed(d.number_input, f"{key}.w_mean", float(get("w_mean", 80.0)), "Mean weight",
                                    min_value=0.0, max_value=1e4, step=10.0, format="%g"))
        cfg["grid"] = int(keyed(c.number_input, f"{key}.grid", int(get("grid", 7)), "Bumps per side",
                                min_value=1, max_value=32, step=1))
        cfg["normalize"] = keyed(d.selectbox, f"{key}.normalize", get("normalize", "text"), "Maps as share of",
                                 options=["text", "joint"], help="text: of the row's text attention; joint: of all")
        cfg["bias_scope"] = keyed(c.selectbox, f"{key}.bias_scope", get("bias_scope", "joint"), "Bias acts in",
                                  options=["joint", "text"],
                                  help="joint: a word's gain is taken from the image keys too; text: each image "
                                       "token keeps its total text attention (needs maps as share of text)")
    if err:
        cfg["_error"] = err
    return cfg


def _sites_editor(key: str, cfg: dict[str, Any], given: Any, joint: list[Any], labels: list[str]) -> None:
    """The sites of the loaded model's joint layers: the middle third, all, picked, or a selector as written."""
    import streamlit as st

    from ..widgets import keyed

    mode = keyed(st.segmented_control, f"{key}.sitemode", _site_mode(given, labels), "Sites",
                 options=list(SITE_MODES), format_func=lambda m: SITE_MODES[m], required=True)
    mode = mode or "mid"
    if mode == "other":
        text = keyed(st.text_input, f"{key}.sitetext", given if isinstance(given, str) else json.dumps(given),
                     "Site selector", help="A selector as the Python API takes it: \"L1:3\", \"*\", a module name, "
                                           "or a JSON list of them. It is checked against the model when the run "
                                           "starts.").strip()
        try:
            parsed = json.loads(text) if text.startswith("[") else text
        except json.JSONDecodeError:
            parsed = None
        if not parsed or not (isinstance(parsed, str) or all(isinstance(x, str) for x in parsed)):
            st.warning(f"Not a site selector: {text!r}; the middle third is used", icon="⚠️")
            parsed = "mid"
        cfg["sites"] = parsed
    elif mode == "pick":
        names = {s.label: f"{s.label} · {s.name}" for s in joint}
        current = given if isinstance(given, list) else []
        picked = keyed(st.multiselect, f"{key}.sites", [str(c) for c in current], "Sites",
                       options=labels, format_func=lambda x: names.get(x, x), label_visibility="collapsed",
                       placeholder="choose joint attention sites")
        cfg["sites"] = list(picked) or "mid"
    else:
        cfg["sites"] = mode


def summary(config: dict[str, Any]) -> str:
    from ..schedules_ui import describe

    targets = ", ".join(config.get("targets") or []) or "no words"
    steps = config.get("steps", config_default("regulation", "steps", 1.0))
    return f"{targets} · sites {config.get('sites', 'mid')} · steps {describe(steps)} · " \
           f"{config.get('iterations', config_default('regulation', 'iterations', 20))} iterations"


PANEL = Panel(
    kind="regulation",
    module="attnctl.controls.regulation",
    title="Attention regulation",
    description="Every named word gets its share of attention: fixes missing or merged objects.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/balance:",
    order=20,
)
