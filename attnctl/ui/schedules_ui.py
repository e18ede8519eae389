"""The schedule editor: every strength is edited as a schedule, with a small plot over the run's steps.

Pure part (tested without Streamlit): :func:`form_from_json` splits a schedule's JSON into an editor kind
and its fields, :func:`json_from_form` builds and validates the JSON back (through
:func:`attnctl.schedules.as_schedule`), :func:`curve` gives the value at every step. :func:`schedule_editor`
is the Streamlit widget.

Editor kinds: ``constant`` (value), ``linear`` / ``cosine`` (start → end), ``window`` (value between two
fractions of the run, else 0), ``piecewise`` (points ``progress:value``), and ``custom`` — any schedule
the library reads, as the shorthand (``"2 * cosine(1, 0)"``) or JSON; adaptive and scaled schedules open
there. Shorthand is parsed, never evaluated as Python.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import AttnCtlError
from ..schedules import as_schedule

EDITOR_KINDS = ("constant", "linear", "cosine", "window", "piecewise", "custom")
KIND_LABELS = {
    "constant": "constant",
    "linear": "linear ramp",
    "cosine": "cosine ramp",
    "window": "window",
    "piecewise": "piecewise",
    "custom": "custom",
}


def _num(x: Any, default: float = 0.0) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _strip_bounds(data: dict[str, Any]) -> dict[str, Any]:
    """The JSON without the ``lo``/``hi`` bounds a control adds (it adds them again when it validates)."""
    out = {k: v for k, v in data.items() if k not in ("lo", "hi")}
    for k, v in out.items():
        if isinstance(v, dict) and "kind" in v:
            out[k] = _strip_bounds(v)
    return out


def form_from_json(value: Any) -> tuple[str, dict[str, Any]]:
    """Editor kind and fields for a schedule given in any form ``as_schedule`` accepts."""
    try:
        data = as_schedule(value).to_json()
    except AttnCtlError:
        return "custom", {"text": json.dumps(value) if not isinstance(value, str) else value}
    data = _strip_bounds(data)
    kind = data.get("kind")
    if kind == "constant":
        return "constant", {"value": _num(data["value"])}
    if kind in ("linear", "cosine"):
        return kind, {"start": _num(data["start"]), "end": _num(data["end"])}
    if kind == "window" and not isinstance(data.get("value"), dict) and not data.get("off") \
            and not data.get("rescale"):
        return "window", {"value": _num(data["value"]), "start": _num(data["start"]), "stop": _num(data["stop"])}
    if kind == "piecewise" and data.get("interpolation", "linear") == "linear":
        return "piecewise", {"points": format_points(data["points"])}
    return "custom", {"text": str(as_schedule(data))}


def format_points(points: Any) -> str:
    return ", ".join(f"{_fmt(x)}:{_fmt(y)}" for x, y in points)


def _fmt(x: float) -> str:
    """The shortest text that reads back as the same float (``%g`` kept 6 digits: a PNG's points changed on
    opening)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def parse_points(text: str) -> list[list[float]]:
    """``"0:1, 0.5:0.2, 1:0"`` → ``[[0, 1], [0.5, 0.2], [1, 0]]``; :class:`ValueError` naming the bad part."""
    points = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise ValueError(f"point {part!r} is not progress:value (e.g. 0.5:0.2)")
        x, y = part.split(":", 1)
        try:
            points.append([float(x), float(y)])
        except ValueError:
            raise ValueError(f"point {part!r} is not two numbers progress:value") from None
    if not points:
        raise ValueError("give at least one point progress:value, e.g. 0:1, 1:0")
    return points


def json_from_form(kind: str, fields: dict[str, Any], lo: float | None = None,
                   hi: float | None = None) -> dict[str, Any]:
    """Schedule JSON from the editor's fields, validated (and checked against ``[lo, hi]``); raises
    :class:`ValueError` (``AttnCtlError`` is one) with a message for the user."""
    if kind == "constant":
        data: Any = {"kind": "constant", "value": float(fields["value"])}
    elif kind in ("linear", "cosine"):
        data = {"kind": kind, "start": float(fields["start"]), "end": float(fields["end"])}
    elif kind == "window":
        start, stop = float(fields["start"]), float(fields["stop"])
        data = {"kind": "window", "value": float(fields["value"]), "start": start, "stop": stop}
    elif kind == "piecewise":
        data = {"kind": "piecewise", "points": parse_points(str(fields["points"]))}
    elif kind == "custom":
        text = str(fields.get("text", "")).strip()
        if len(text) > 2000:
            raise ValueError("the schedule text is longer than 2000 characters")
        data = text
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")
    sched = as_schedule(data)
    if lo is not None or hi is not None:
        sched.checked(lo, hi)  # validates the values against the strength's range
    return data if isinstance(data, dict) else _strip_bounds(sched.to_json())


def curve(value: Any, steps: int) -> list[float]:
    """The schedule's value at each of ``steps`` steps (adaptive parts: before any report)."""
    return as_schedule(value).values(max(1, int(steps)))


def describe(value: Any) -> str:
    """The shorthand of a schedule (``"linear(1.0, 0.0)"``), for summaries."""
    try:
        return str(as_schedule(value))
    except AttnCtlError:
        return "?"


# --------------------------------------------------------------------------------------------- Streamlit


def curve_chart(values: list[float], lo: float | None = None, hi: float | None = None):
    """A small Altair chart of a strength over the steps."""
    import altair as alt
    import pandas as pd

    df = pd.DataFrame({"step": list(range(1, len(values) + 1)), "strength": values})
    ys = values + [0.0] + [b for b in (lo, hi) if b is not None]
    top = max(ys) if max(ys) > min(ys) else min(ys) + 1.0
    scale = alt.Scale(domain=[min(ys), top], nice=True)
    base = alt.Chart(df).encode(
        x=alt.X("step:Q", scale=alt.Scale(domain=[1, max(len(values), 2)]),
                axis=alt.Axis(title=None, tickMinStep=1, format="d", labelFontSize=10, grid=False)),
        y=alt.Y("strength:Q", scale=scale, axis=alt.Axis(title=None, tickCount=3, labelFontSize=10)),
        tooltip=["step", alt.Tooltip("strength:Q", format=".3g")],
    )
    area = base.mark_area(color="#ff7a45", opacity=0.22, interpolate="linear")
    line = base.mark_line(color="#ff7a45", strokeWidth=2)
    dots = base.mark_circle(color="#ff9f70", size=22)
    return (area + line + dots).properties(height=80)


def schedule_editor(key: str, label: str, value: Any, steps: int, *, lo: float | None = None,
                    hi: float | None = None, help: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The Streamlit editor of one strength: kind, its fields, and the curve over ``steps`` steps.

    Returns ``(schedule JSON, None)`` or ``(None, error message)``. Widget keys start with ``key``.
    """
    import streamlit as st

    from .widgets import keyed

    kind0, fields0 = form_from_json(value)
    rng = None if lo is None and hi is None else \
        f"Allowed range {'-∞' if lo is None else _fmt(lo)} … {'∞' if hi is None else _fmt(hi)}."
    tip = " ".join(t for t in (help, rng, "Plotted over the steps of the run.") if t)
    head, kind_col = st.columns([3, 2], vertical_alignment="center")
    head.markdown(f"**{label}**", help=tip)
    kind = keyed(kind_col.selectbox, f"{key}.kind", kind0, "schedule", options=list(EDITOR_KINDS),
                 format_func=lambda k: KIND_LABELS[k], label_visibility="collapsed")
    f = fields0 if kind == kind0 else {}
    step = 0.05 if (hi is not None and hi <= 1) else 0.1
    fields: dict[str, Any] = {}
    if kind == "constant":
        fields["value"] = keyed(st.number_input, f"{key}.value", float(f.get("value", hi if hi else 1.0)),
                                "value", step=step, format="%g", min_value=lo, max_value=hi)
    elif kind in ("linear", "cosine"):
        a, b = st.columns(2)
        fields["start"] = keyed(a.number_input, f"{key}.start", float(f.get("start", hi if hi else 1.0)),
                                "at the first step", step=step, format="%g", min_value=lo, max_value=hi)
        fields["end"] = keyed(b.number_input, f"{key}.end", float(f.get("end", lo if lo is not None else 0.0)),
                              "at the last step", step=step, format="%g", min_value=lo, max_value=hi)
    elif kind == "window":
        a, b = st.columns([1, 2])
        fields["value"] = keyed(a.number_input, f"{key}.value", float(f.get("value", hi if hi else 1.0)),
                                "value", step=step, format="%g", min_value=lo, max_value=hi)
        span = keyed(b.slider, f"{key}.span", (float(f.get("start", 0.0)), float(f.get("stop", 0.5))),
                     "active over the run (fractions)", min_value=0.0, max_value=1.0, step=0.05)
        fields["start"], fields["stop"] = span
    elif kind == "piecewise":
        fields["points"] = keyed(st.text_input, f"{key}.points", str(f.get("points", "0:1, 0.5:0.5, 1:0")),
                                 "points progress:value", max_chars=400,
                                 help="Fractions of the run and values, joined by straight lines.")
    else:
        fields["text"] = keyed(st.text_input, f"{key}.text", str(f.get("text", describe(value))),
                               "schedule", max_chars=2000,
                               help="Any schedule attnctl reads: 0.7, linear(1, 0), 2 * cosine(1, 0), "
                                    "window(linear(1, 0), 0, 0.5, rescale=True), or its JSON.")
    try:
        data = json_from_form(kind, fields, lo, hi)
        values = curve(data, steps)
    except (ValueError, AttnCtlError) as e:
        st.error(str(e), icon="⚠️")
        return None, str(e)
    st.altair_chart(curve_chart(values, lo, hi), width="stretch")
    return data, None
