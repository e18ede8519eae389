"""Layout guidance panel: which words go where (one box per word, fractions of the image), when the latents are
steered (a schedule of the step size), and with which loss."""

from __future__ import annotations

from typing import Any

from . import Panel, PanelContext, config_default
from .regulation import default_targets

EDGES = ("x0", "y0", "x1", "y1")


def default_boxes(words: list[str]) -> dict[str, list[float]]:
    """Side-by-side boxes for the words: the image split into equal columns, a margin around each."""
    n = max(1, len(words))
    return {w: [round(i / n + 0.05 / n, 3), 0.2, round((i + 1) / n - 0.05 / n, 3), 0.8] for i, w in enumerate(words)}


def toy_words(words: list[str]) -> list[str]:
    """The toy models carry location in their colour words: key their boxes by colour when the prompt has some."""
    from ...toyworld import vocab

    colours = [w for w in words if w in vocab.COLOURS]
    return list(dict.fromkeys(colours))[:3]


def default(ctx: PanelContext) -> dict[str, Any]:
    words = (toy_words(ctx.words) if ctx.is_toy else []) or default_targets(ctx.words) or ["circle"]
    return {"kind": "layout", "boxes": default_boxes(words)}


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ..schedules_ui import schedule_editor
    from ..widgets import keyed

    cfg = dict(config)

    def get(name: str, fallback: Any = None) -> Any:
        return cfg[name] if name in cfg else config_default("layout", name, fallback)

    boxes = {str(w): list(b) for w, b in (cfg.get("boxes") or {}).items()}
    options = list(dict.fromkeys([w for w in ctx.words if w not in {",", "."}] + list(boxes)))
    chosen = keyed(st.multiselect, f"{key}.words", list(boxes), "Words to place", options=options,
                   placeholder="words of the prompt",
                   help="Each word's object is steered into its box. Words must appear in the prompt; a phrase "
                        "key (\"red circle\") can be set in the JSON view.")
    fresh = default_boxes(list(chosen))
    new_boxes = {}
    for word in chosen:
        box = boxes.get(word, fresh[word])
        cols = st.columns([2, 1, 1, 1, 1])
        cols[0].markdown(f"**{word}**")
        values = [float(keyed(c.number_input, f"{key}.box.{word}.{edge}", float(v), edge, min_value=0.0,
                              max_value=1.0, step=0.05, format="%.2f"))
                  for c, edge, v in zip(cols[1:], EDGES, box, strict=True)]
        new_boxes[word] = values
    cfg["boxes"] = new_boxes
    missing = ctx.absent(chosen)
    if missing:
        st.warning(f"Not in the prompt: {', '.join(missing)}", icon="⚠️")
    bad = [w for w, (x0, y0, x1, y1) in new_boxes.items() if not (x0 < x1 and y0 < y1)]
    if bad:
        st.warning(f"Empty box (need x0 < x1 and y0 < y1): {', '.join(bad)}", icon="⚠️")

    scale, err = schedule_editor(f"{key}.scale", "Step size η over the run", get("scale", 0.15), ctx.steps,
                                 lo=0.0, help="How far the latents move down the layout loss at each step, in units "
                                              "of their scale (default: 0.15 for the first 30% of the steps).")
    if scale is not None:
        cfg["scale"] = scale
    a, b = st.columns(2)
    cfg["iterations"] = int(keyed(a.number_input, f"{key}.iterations", int(get("iterations", 1)),
                                  "Gradient steps per step", min_value=1, max_value=20, step=1))
    cfg["loss"] = keyed(b.selectbox, f"{key}.loss", get("loss", "ratio"), "Loss", options=["ratio", "csg"],
                        help="ratio: each word's share of attention inside its box; csg: CSG's sampled "
                             "intra- and inter-token constraints")
    if err:
        cfg["_error"] = err
    return cfg


def summary(config: dict[str, Any]) -> str:
    from ..schedules_ui import describe

    boxes = config.get("boxes") or {}
    words = ", ".join(boxes) or "no words"
    scale = config.get("scale", config_default("layout", "scale", 0.15))
    return f"{words} · η {describe(scale)} · {config.get('loss', 'ratio')} loss"


PANEL = Panel(
    kind="layout",
    module="attnctl.controls.layout_guidance",
    title="Layout guidance",
    description="Each named word goes into its box: steers the latents at the first steps.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/grid_view:",
    order=30,
)
