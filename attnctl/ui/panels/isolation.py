"""Isolation panel: which subjects of the prompt are kept apart, how strongly over the run, and at which sites.

With "Reposition after references" on, the panel also takes one reference prompt per subject (each showing that
subject alone): both runs then make ``[reference_1 … reference_n, scene]`` in one call, the controlled run with
``references=True``, and the images shown are the scenes. The prompts travel in the config under the UI-only key
``_reference_prompts``, which the app moves into the setup."""

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
    subjects = cfg.get("subjects") or []
    current = [subjects] if isinstance(subjects, str) else [str(x) for x in subjects]
    options = list(dict.fromkeys(subject_phrases(ctx.words) + [w for w in ctx.words if w not in {",", "."}]
                                 + current))
    cfg["subjects"] = list(keyed(st.multiselect, f"{key}.subjects", current, "Subjects to keep apart",
                                 options=options, placeholder="phrases or words of the prompt",
                                 help="Each subject's image tokens stop reading the other subjects' tokens. Name "
                                      "two or more; a subject is a word or phrase of the prompt."))
    repositioning = keyed(st.toggle, f"{key}.references", bool(cfg.get("references", False)),
                          "Reposition after references",
                          help="Also draw each subject after a reference image of it, made in the same call "
                               "(IR-Diffusion's reposition)")
    # the config's reference prompts follow its subjects' order: kept by subject, so a reordered or dropped subject
    # keeps its own prompt
    given = dict(zip(current, cfg.pop("_reference_prompts", None) or [], strict=False))
    if len(cfg["subjects"]) < 2 and not repositioning:
        st.warning("Name at least two subjects to isolate.", icon="⚠️")
    missing = ctx.absent(cfg["subjects"])
    if missing:
        st.warning(f"Not in the prompt: {', '.join(missing)}", icon="⚠️")
    strength, err = schedule_editor(f"{key}.isolation", "Isolation over the run",
                                    cfg.get("isolation", config_default("isolation", "isolation", 1.0)), ctx.steps,
                                    lo=0.0, hi=1.0, help="1 removes the other subjects' keys from a subject's "
                                                         "queries; 0 leaves them.")
    if strength is not None:
        cfg["isolation"] = strength
    if repositioning:
        cfg["references"] = True
        prompts = []
        for subject in cfg["subjects"]:
            prompts.append(keyed(st.text_input, f"{key}.ref.{subject}", given.get(subject, f"a {subject}"),
                                 f"Reference prompt of {subject!r}", max_chars=2000,
                                 help="A prompt showing this subject alone").strip())
        if any(not p for p in prompts):
            st.warning("Write a reference prompt for every subject.", icon="⚠️")
        cfg["_reference_prompts"] = prompts
        weight, werr = schedule_editor(f"{key}.reposition", "Reposition weight over the run",
                                       cfg.get("reposition", config_default("isolation", "reposition", 0.9)),
                                       ctx.steps, lo=0.0, hi=None,
                                       help="Weight of the relocated reference keys; 0: none.")
        if weight is not None:
            cfg["reposition"] = weight
        err = err or werr
    else:
        for name in ("references", "reposition"):
            cfg.pop(name, None)
    sites = cfg.get("sites", config_default("isolation", "sites", "late"))
    if isinstance(sites, str) and sites in SITE_CHOICES:
        cfg["sites"] = keyed(st.selectbox, f"{key}.sites", sites, "Sites", options=list(SITE_CHOICES),
                             help="late: the second half of the blocks by depth (IR-Diffusion's decoder side)")
    if err:
        cfg["_error"] = err
    return cfg


def summary(config: dict[str, Any]) -> str:
    from ..schedules_ui import describe

    subjects = ", ".join(config.get("subjects") or []) or "no subjects"
    strength = config.get("isolation", config_default("isolation", "isolation", 1.0))
    line = f"{subjects} · isolation {describe(strength)}"
    if config.get("references"):
        line += f" · reposition {describe(config.get('reposition', config_default('isolation', 'reposition', 0.9)))}"
    return line


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
