"""Isolation panel: which subjects of the prompt are kept apart, how strongly over the run, and at which sites.

The UI generates one prompt per side, so the panel edits isolation alone; reposition needs reference prompts in the
same call (``references=True``: from a script, ``attnctl generate --reference-prompt``, or a batch item's
``reference_prompts``)."""

from __future__ import annotations

from typing import Any

from . import Panel, PanelContext, config_default

SITE_CHOICES = ("late", "all")


def subject_phrases(words: list[str]) -> list[str]:
    """The "<colour> <shape>" phrases of a shapes-world prompt, in order; else its shape or other nouns."""
    from ...toyworld import vocab

    nouns = set(vocab.SHAPES) | set(vocab.PLURALS.values())
    phrases = [f"{a} {b}" for a, b in zip(words, words[1:], strict=False) if a in vocab.COLOURS and b in nouns]
    return list(dict.fromkeys(phrases))


def default(ctx: PanelContext) -> dict[str, Any]:
    from .regulation import default_targets

    subjects = subject_phrases(ctx.words) or default_targets(ctx.words)
    if len(subjects) < 2:
        subjects = ["red circle", "blue square"]
    return {"kind": "isolation", "subjects": subjects[:3]}


def render(ctx: PanelContext, key: str, config: dict[str, Any]) -> dict[str, Any]:
    import streamlit as st

    from ..schedules_ui import schedule_editor
    from ..widgets import keyed

    cfg = dict(config)
    current = list(cfg.get("subjects") or [])
    options = list(dict.fromkeys(subject_phrases(ctx.words) + [w for w in ctx.words if w not in {",", "."}]
                                 + current))
    cfg["subjects"] = list(keyed(st.multiselect, f"{key}.subjects", current, "Subjects to keep apart",
                                 options=options, placeholder="phrases or words of the prompt",
                                 help="Each subject's image tokens stop reading the other subjects' tokens. Name "
                                      "two or more; a subject is a word or phrase of the prompt."))
    if len(cfg["subjects"]) < 2:
        st.warning("Name at least two subjects to isolate.", icon="⚠️")
    missing = [s for s in cfg["subjects"] if any(w.lower() not in ctx.words for w in s.split())]
    if missing:
        st.warning(f"Not in the prompt: {', '.join(missing)}", icon="⚠️")
    strength, err = schedule_editor(f"{key}.isolation", "Isolation over the run",
                                    cfg.get("isolation", config_default("isolation", "isolation", 1.0)), ctx.steps,
                                    lo=0.0, hi=1.0, help="1 removes the other subjects' keys from a subject's "
                                                         "queries; 0 leaves them.")
    if strength is not None:
        cfg["isolation"] = strength
    sites = cfg.get("sites", config_default("isolation", "sites", "late"))
    if isinstance(sites, str) and sites in SITE_CHOICES:
        cfg["sites"] = keyed(st.selectbox, f"{key}.sites", sites, "Sites", options=list(SITE_CHOICES),
                             help="late: the second half of the sites by depth (IR-Diffusion's decoder side)")
    if err:
        cfg["_error"] = err
    return cfg


def summary(config: dict[str, Any]) -> str:
    from ..schedules_ui import describe

    subjects = ", ".join(config.get("subjects") or []) or "no subjects"
    strength = config.get("isolation", config_default("isolation", "isolation", 1.0))
    return f"{subjects} · isolation {describe(strength)}"


PANEL = Panel(
    kind="isolation",
    module="attnctl.controls.isolation",
    title="Isolation",
    description="Subjects kept apart: no subject's image tokens read another's.",
    default=default,
    render=render,
    summary=summary,
    icon=":material/join_left:",
    order=40,
)
