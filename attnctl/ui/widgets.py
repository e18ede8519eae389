"""Keyed Streamlit widgets: the value lives in ``st.session_state[key]``, set once from a default.

Streamlit widgets created with a ``key`` keep their value across reruns; giving them ``value=`` as well
makes Streamlit warn and, worse, reset them whenever the default changes. :func:`keyed` sets the default
into the session state only when the key is new (or its value no longer fits the widget), then creates
the widget from the state alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _fits(value: Any, kwargs: dict[str, Any]) -> bool:
    options = kwargs.get("options")
    if options is not None:
        opts = list(options)
        if isinstance(value, list):
            return all(v in opts for v in value)
        return value in opts
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        numeric = isinstance(v, int | float) and not isinstance(v, bool)
        if numeric and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            return False
    return True


def clamp(value: Any, lo: Any = None, hi: Any = None) -> Any:
    if lo is not None and value < lo:
        return lo
    if hi is not None and value > hi:
        return hi
    return value


def keyed(widget: Callable[..., Any], key: str, default: Any, label: str, **kwargs: Any) -> Any:
    """``widget(label, key=key, **kwargs)`` whose first value is ``default`` (kept in session state)."""
    import streamlit as st

    state = st.session_state
    if key not in state or not _fits(state[key], kwargs):
        if not _fits(default, kwargs):
            options = kwargs.get("options")
            given = default
            if options is not None:
                opts = list(options)
                if isinstance(default, list):
                    default = [v for v in default if v in opts]
                    dropped = ", ".join(str(v) for v in given if v not in opts)
                    change = (f"{label}: {dropped} not offered here (this model has no such choice); left out, "
                              "which changes the run")
                else:
                    default = opts[0] if opts else None
                    change = f"{label}: {given} is not offered here; it is set to {default}, which changes the run"
            else:
                lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
                default = tuple(clamp(v, lo, hi) for v in default) if isinstance(default, tuple) else \
                    clamp(default, lo, hi)
                # a value the library takes but this field does not (a restored PNG's, say): changed, and said so
                change = (f"{label}: {given} is outside this field's range ({lo} to {hi}); it is set to {default}, "
                          "which changes the run (the JSON editor takes any value the control does)")
            _say(change)
        state[key] = default
    return widget(label, key=key, **kwargs)


def _say(change: str) -> None:
    """A value a field had to change: a warning on the card, and a note on an upload's "restored" notice."""
    import streamlit as st

    state = st.session_state
    st.warning(change, icon="⚠️")
    notice = state.get("notice")
    if isinstance(notice, dict) and notice.get("kind") in ("success", "warning") and \
            change not in (notice.get("notes") or []):  # an upload said "restored": it was not, quite
        more = "" if notice["kind"] == "warning" else " Not everything could be restored as recorded: see the notes."
        state["notice"] = {**notice, "kind": "warning", "text": notice["text"] + more,
                           "notes": [*(notice.get("notes") or []), change]}
