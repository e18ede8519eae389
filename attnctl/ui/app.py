"""The attnctl editing UI — a Streamlit script (``attnctl ui``, or ``streamlit run attnctl/ui/app.py``).

Only the Streamlit layer lives here: widgets, layout and session state. What a click does is in plain
functions of :mod:`attnctl.ui.engine` (generation), :mod:`attnctl.ui.setup` (settings, metadata, batch
item), :mod:`attnctl.ui.safety` (uploads), :mod:`attnctl.ui.heatmap` (overlays) and the control panels
of :mod:`attnctl.ui.panels`.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from typing import Any

import streamlit as st
from PIL import Image

from attnctl.errors import AttnCtlError
from attnctl.imageio import encode_png
from attnctl.ui import DEVICE_ENV, DTYPE_ENV, MAX_UPLOAD_MB, MODEL_ENV, engine, heatmap
from attnctl.ui.panels import GENERIC, PanelContext, available_panels, panel_for
from attnctl.ui.safety import UploadError, check_control_json, check_png_upload
from attnctl.ui.setup import (
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    TOY_NAMES,
    Setup,
    batch_file,
    check_batch_file,
    control_problem,
    describe_changes,
    metadata_for,
    setup_from_metadata,
)
from attnctl.ui.widgets import keyed

OTHER = "other"
HISTORY_LIMIT = 16
SETTING_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width")

st.set_page_config(page_title="attnctl · attention controls", page_icon="🎛️", layout="wide",
                   initial_sidebar_state="expanded")

CSS = """
<style>
.block-container {padding-top: 2.2rem; padding-bottom: 2rem; max-width: 1500px;}
h1.attnctl-title {font-size: 1.9rem; font-weight: 750; margin: 0 0 .1rem 0; letter-spacing: -.02em;}
h1.attnctl-title span {color: #ff7a45;}
.attnctl-sub {opacity: .65; margin-bottom: .8rem; font-size: .95rem;}
.attnctl-label {font-size: .78rem; text-transform: uppercase; letter-spacing: .08em; opacity: .6;
                margin: .1rem 0 .25rem 0;}
.attnctl-empty {border: 1px dashed rgba(255,255,255,.18); border-radius: .8rem; padding: 2.2rem 1.5rem;
                text-align: center; opacity: .75;}
[data-testid="stSidebar"] [data-testid="stImage"] img {border-radius: .4rem;}
[data-testid="stImage"] img {border-radius: .55rem;}
</style>
"""


# --------------------------------------------------------------------------------------------- state


@st.cache_resource(show_spinner=False, max_entries=3)
def cached_model(name: str, device: str, dtype: str) -> engine.LoadedModel:
    return engine.load_model(name, device=device, dtype=dtype)


def init_state() -> None:
    ss = st.session_state
    if ss.get("_init"):
        return
    start = os.environ.get(MODEL_ENV, "").strip() or "toy-sd3"
    first = Setup(model=start)
    ss.model_choice = start if start in TOY_NAMES else OTHER
    ss.model_path = "" if start in TOY_NAMES else start
    for k in SETTING_KEYS:
        ss[k] = getattr(first, k)
    ss.controls = []
    ss.loose_references = []  # reference prompts a PNG recorded with no control to take them (a baseline's)
    ss.max_sequence_length = None  # a PNG's recorded T5 length; None: the model's
    ss.next_id = 1
    ss.history = []
    ss.current = None
    ss.defaults_for = None
    ss.notice = None
    ss.seeded_controls = False
    ss.edit_source = first.prompt
    ss.edit_target = ""
    ss.edit_scale = 0.2
    ss.edit_solver = "euler"
    ss.edit_rf = False
    ss.edit_rf_gamma = 0.5
    ss.edit_rf_eta = 0.9
    ss.edit_rf_stop = 0.25
    ss.edit_share = False
    ss.edit_share_weight = 1.0
    ss.edit_share_stop = 0.15
    ss.edit_share_tokens = "all"
    ss.edit_result = None
    ss._init = True


def model_name() -> str:
    ss = st.session_state
    return ss.model_choice if ss.model_choice != OTHER else (ss.get("model_path") or "").strip()


def current_setup(enabled_only: bool = True) -> Setup:
    ss = st.session_state
    entries = [c for c in ss.controls if c.get("enabled", True) or not enabled_only]
    repositioning = [c for c in entries if c["config"].get("kind") == "isolation" and c["config"].get("references")]
    references = list((repositioning[0].get("reference_prompts") if repositioning else ss.get("loose_references"))
                      or [])
    return Setup(model=model_name(), prompt=ss.prompt, negative_prompt=ss.negative_prompt, seed=int(ss.seed),
                 steps=int(ss.steps), guidance=float(ss.guidance), height=int(ss.height), width=int(ss.width),
                 controls=[dict(c["config"]) for c in entries], reference_prompts=references,
                 max_sequence_length=ss.get("max_sequence_length"))


def new_control(kind: str, config: dict[str, Any], enabled: bool = True) -> dict[str, Any]:
    ss = st.session_state
    entry = {"id": ss.next_id, "kind": kind, "config": config, "enabled": enabled}
    ss.next_id += 1
    return entry


def apply_setup(s: Setup) -> None:
    """Put a setup into the widgets (from a PNG or the history); called from callbacks only."""
    ss = st.session_state
    panels = available_panels()
    ss.model_choice = s.model if s.model in TOY_NAMES else OTHER
    ss.model_path = "" if s.model in TOY_NAMES else s.model
    for k in SETTING_KEYS:
        ss[k] = getattr(s, k)
    ss.controls = []
    for c in s.controls:  # a config the library refuses opens as JSON, where it can be fixed (a panel may not draw it)
        problem = control_problem(c)
        entry = new_control(c["kind"] if c.get("kind") in panels and problem is None else GENERIC, dict(c))
        if problem and c.get("kind") in panels:
            entry["note"] = f"This {panels[c['kind']].title} control is not valid as given, so it opens as JSON: " \
                            f"{problem}"
        ss.controls.append(entry)
    ss.loose_references = list(s.reference_prompts)
    for entry in ss.controls:  # the reference prompts belong to the control that repositions after them
        if entry["kind"] == "isolation" and entry["config"].get("references"):
            entry["reference_prompts"] = list(s.reference_prompts)
            ss.loose_references = []
            break
    ss.max_sequence_length = s.max_sequence_length
    ss.defaults_for = s.model  # keep these settings when the model loads
    ss.seeded_controls = True


# --------------------------------------------------------------------------------------------- callbacks


def on_upload() -> None:
    ss = st.session_state
    f = ss.get("upload")
    if f is None:
        return
    try:
        checked = check_png_upload(f.name, f.getvalue())
        restored, notes = setup_from_metadata(checked.metadata, base=current_setup())
    except (UploadError, AttnCtlError) as e:
        ss.notice = {"kind": "error", "text": f"Could not open {f.name!r}: {e}"}
        return
    apply_setup(restored)
    thumb = io.BytesIO()
    heatmap.upscale(checked.image, 192).save(thumb, format="PNG")
    n = len(restored.controls)
    changed = " Not everything could be restored as recorded: see the notes." if notes else ""
    ss.notice = {"kind": "warning" if notes else "success",
                 "text": f"Restored the settings of {f.name!r}: {restored.model}, seed {restored.seed}, "
                         f"{restored.steps} steps, {n} control{'s' if n != 1 else ''}.{changed}",
                 "notes": notes, "thumb": thumb.getvalue()}


def on_add(ctx: PanelContext) -> None:
    ss = st.session_state
    panels = available_panels()
    kind = ss.get("add_kind")
    if kind not in panels:
        return
    ss.controls.append(new_control(kind, panels[kind].default(ctx)))


def on_remove(cid: int) -> None:
    ss = st.session_state
    ss.controls = [c for c in ss.controls if c["id"] != cid]


def on_restore(run_id: int) -> None:
    ss = st.session_state
    for run in ss.history:
        if run["id"] == run_id:
            apply_setup(run["setup"])
            ss.notice = {"kind": "success", "text": f"Restored the settings of run #{run_id}."}


def on_show(run_id: int) -> None:
    st.session_state.current = run_id


def on_default_text_length() -> None:
    st.session_state.max_sequence_length = None


def on_drop_references() -> None:
    st.session_state.loose_references = []


def on_new_seed() -> None:
    st.session_state.seed = random.randint(0, 2**31 - 1)


def on_surprise() -> None:
    from attnctl.toyworld.world import prompt_set

    kind = random.choice(["pair", "relation", "triple", "count", "position"])
    st.session_state.prompt = random.choice(prompt_set(kind))["prompt"]


# --------------------------------------------------------------------------------------------- sidebar


def sidebar() -> tuple[engine.LoadedModel | None, Any]:
    ss = st.session_state
    with st.sidebar:
        st.markdown("<h1 class='attnctl-title'>attn<span>ctl</span></h1>"
                    "<div class='attnctl-sub'>attention controls for SD3 · SD3.5 · FLUX</div>",
                    unsafe_allow_html=True)
        model_box = st.container()
        upload_box = st.container()  # filled first in script order (an upload may set the model)
    with upload_box:
        st.divider()
        st.markdown("<div class='attnctl-label'>Open an image</div>", unsafe_allow_html=True)
        st.file_uploader("Open a PNG made by attnctl", type=["png"], key="upload", on_change=on_upload,
                         max_upload_size=MAX_UPLOAD_MB, label_visibility="collapsed",
                         help="Every setting recorded in the PNG (prompt, seed, model, controls) is restored.")
        notice_box = st.container()  # filled after the control cards, which may add to the notice (show_notice)
        st.caption(f"PNG only, up to {MAX_UPLOAD_MB} MB and 4096×4096 pixels. The UI is served on "
                   "this machine only unless started with --host.")
    with model_box:
        st.markdown("<div class='attnctl-label'>Model</div>", unsafe_allow_html=True)
        st.selectbox("Model", [*TOY_NAMES, OTHER], key="model_choice", label_visibility="collapsed",
                     format_func=lambda m: "Hub id or local folder…" if m == OTHER else f"{m} · shapes world")
        if ss.model_choice == OTHER:
            st.text_input("Hub id or pipeline folder", key="model_path", max_chars=400,
                          placeholder="stabilityai/stable-diffusion-3.5-medium",
                          help="A diffusers SD3 / SD3.5 / FLUX.1 pipeline: a hub id, or an existing local folder "
                               "with model_index.json (read only).")
        name = model_name()
        if not name:
            st.info("Type a hub id or a folder.", icon="ℹ️")
            return None, notice_box
        try:
            with st.spinner(f"Loading {name}…"):
                model = cached_model(name, os.environ.get(DEVICE_ENV, "").strip() or "cpu",
                                     os.environ.get(DTYPE_ENV, "").strip() or "fp32")
        except Exception as e:  # noqa: BLE001 - any load failure is a message, not a traceback
            st.error(str(e) if isinstance(e, AttnCtlError) else f"cannot load {name!r}: {type(e).__name__}: {e}",
                     icon="🚫")
            return None, notice_box
        heads = sum(s.heads for s in model.sites)
        st.markdown(f":orange-badge[{model.family.upper()}] :gray-badge[{len(model.sites)} sites] "
                    f":gray-badge[{heads} heads] :gray-badge[{model.defaults.get('width')}×"
                    f"{model.defaults.get('height')}]")
    return model, notice_box


def show_notice(box: Any) -> None:
    """The upload's notice: drawn after the control cards, since a card that had to change a restored value past
    its field's range turns a "restored" notice into a warning that names the change (:func:`widgets.keyed`)."""
    note = st.session_state.get("notice")
    if not note:
        return
    with box:
        if note["kind"] == "error":
            st.error(note["text"], icon="🚫")
            return
        if note.get("thumb"):
            st.image(note["thumb"], width=96)
        if note["kind"] == "warning":  # restored with changes: each change is named, not a small caption
            st.warning(note["text"] + "".join(f"\n- {n}" for n in note.get("notes") or []), icon="⚠️")
        else:
            st.success(note["text"], icon="✅")


def apply_model_defaults(model: engine.LoadedModel, ctx: PanelContext) -> None:
    ss = st.session_state
    if ss.defaults_for != model.name:
        d = model.defaults
        ss.steps = int(d.get("steps", ss.steps))
        ss.guidance = float(d.get("guidance", ss.guidance))
        ss.height = int(d.get("height", ss.height))
        ss.width = int(d.get("width", ss.width))
        ss.max_sequence_length = None
        ss.defaults_for = model.name
    if not ss.seeded_controls:  # a first SoftPAG control, so the first Generate already compares
        panels = available_panels()
        if "softpag" in panels and not ss.controls:
            ss.controls.append(new_control("softpag", panels["softpag"].default(ctx)))
        ss.seeded_controls = True


# --------------------------------------------------------------------------------------------- main area


def settings_row(model: engine.LoadedModel | None) -> None:
    ss = st.session_state
    st.text_area("Prompt", key="prompt", height=78, max_chars=2000,
                 placeholder="a red circle to the left of a blue square")
    if model is not None and model.is_toy:
        from attnctl.toyworld import vocab

        c1, c2 = st.columns([5, 1], vertical_alignment="center")
        c1.caption("The toy models know these words: " + " ".join(w for w in vocab.words() if w != ","))
        c2.button("Surprise me", on_click=on_surprise, icon=":material/casino:", width="stretch")
    m, low = (model.size_multiple, model.smallest_side) if model is not None else (8, 8)
    cols = st.columns([1.3, 0.35, 1, 1, 1, 1], vertical_alignment="bottom")
    cols[0].number_input("Seed", key="seed", min_value=0, max_value=MAX_SEED, step=1)
    cols[1].button("", icon=":material/casino:", on_click=on_new_seed, help="New random seed", key="new_seed")
    cols[2].number_input("Steps", key="steps", min_value=1, max_value=MAX_STEPS, step=1)
    cols[3].number_input("Guidance", key="guidance", min_value=0.0, max_value=100.0, step=0.5, format="%g")
    snapped = []
    for col, k in ((cols[4], "width"), (cols[5], "height")):
        if ss[k] % m or not low <= ss[k] <= MAX_SIDE:
            typed = ss[k]
            ss[k] = snap_side(typed, m, low)
            snapped.append(f"{k} {typed} → {ss[k]}")
        col.number_input(k.capitalize(), key=k, min_value=low, max_value=MAX_SIDE, step=m)
    if snapped:
        st.caption(f"Sides are multiples of {m} px from {low} to {MAX_SIDE} for this model: "
                   f"{', '.join(snapped)}.")
    if ss.get("max_sequence_length"):
        c1, c2 = st.columns([5, 1], vertical_alignment="center")
        default = f" (the model's default: {model.info['max_sequence_length']})" if model is not None else ""
        c1.caption(f"Text length {ss.max_sequence_length} tokens, as the opened PNG records it{default}.")
        c2.button("Model's default", key="reset_text_length", on_click=on_default_text_length, width="stretch")
    with st.expander("Negative prompt"):
        st.text_area("Negative prompt", key="negative_prompt", height=68, max_chars=2000,
                     label_visibility="collapsed", placeholder="what the image should not show (CFG models)")


def snap_side(value: int, m: int, low: int) -> int:
    """``value`` to the nearest multiple of ``m`` (halves up), within ``low``..MAX_SIDE."""
    return max(low, min(MAX_SIDE, (int(value) + m // 2) // m * m))


def controls_panel(ctx: PanelContext, model: engine.LoadedModel | None) -> list[str]:
    """The controls column; returns the problems that block Generate."""
    ss = st.session_state
    panels = available_panels()
    problems = []
    st.markdown("<div class='attnctl-label'>Controls</div>", unsafe_allow_html=True)
    add_col, btn_col = st.columns([3, 1], vertical_alignment="bottom")
    add_col.selectbox("Add a control", list(panels), key="add_kind", label_visibility="collapsed",
                      format_func=lambda k: panels[k].title)
    btn_col.button("Add", key="add_control", on_click=on_add, args=(ctx,), icon=":material/add:", width="stretch")
    if ss.get("loose_references"):
        with st.container(border=True, key="loose_references"):
            refs = ", ".join(repr(r) for r in ss.loose_references)
            st.markdown(f"**Reference prompts** · {refs}")
            st.caption("The opened image was made as the last of this set in one call (a reposition run's baseline): "
                       "Generate makes the set again from the same noise and shows the scene.")
            st.button("Drop them (make the image alone)", key="drop_references", on_click=on_drop_references,
                      icon=":material/delete:")
    if not ss.controls:
        st.markdown("<div class='attnctl-empty'>No controls: Generate makes the plain image.<br>"
                    "Add one to compare it with the controlled image.</div>", unsafe_allow_html=True)
    for n, entry in enumerate(ss.controls):
        panel = panel_for(entry["kind"], panels)
        cid = entry["id"]
        with st.container(border=True, key=f"card{cid}"):
            head, toggle, remove = st.columns([6, 1.4, 1], vertical_alignment="center")
            head.markdown(f"**{n + 1}. {panel.title}**")
            entry["enabled"] = toggle.toggle("on", value=entry.get("enabled", True), key=f"c{cid}.on",
                                             label_visibility="collapsed",
                                             help="Switch off to leave it out of the next run")
            remove.button("", icon=":material/delete:", key=f"remove{cid}", on_click=on_remove, args=(cid,),
                          help="Remove this control", type="tertiary")
            summary = st.empty()
            with st.expander("Settings", expanded=True):
                given = dict(entry["config"])
                if entry.get("reference_prompts") and panel.kind == "isolation":
                    given["_reference_prompts"] = list(entry["reference_prompts"])
                if entry.get("note"):
                    st.warning(entry["note"], icon="⚠️")
                try:
                    cfg = panel.render(ctx, f"c{cid}", given)
                except Exception as e:  # noqa: BLE001 - a panel that cannot draw a config hands it to the JSON panel
                    if panel.kind == GENERIC:
                        raise
                    entry["note"] = (f"The {panel.title} panel cannot show this config ({type(e).__name__}: {e}), "
                                     "so it opens as JSON: fix it here.")
                    entry["kind"], panel = GENERIC, panels[GENERIC]
                    st.warning(entry["note"], icon="⚠️")
                    given.pop("_reference_prompts", None)
                    cfg = panel.render(ctx, f"c{cid}", given)
            error = cfg.pop("_error", None)
            entry["reference_prompts"] = cfg.pop("_reference_prompts", None) or []
            entry["config"] = cfg
            if error is None:
                error = control_error(cfg, model)
                if error:
                    st.error(error, icon="⚠️")
            try:
                summary.caption(panel.summary(cfg))
            except Exception:  # noqa: BLE001 - a summary of a config being fixed: its JSON instead
                summary.caption(panels[GENERIC].summary(cfg))
            if error and entry["enabled"]:
                problems.append(f"Control {n + 1} ({panel.title}): {error}")
    return problems


def control_error(cfg: dict[str, Any], model: engine.LoadedModel | None) -> str | None:
    """Why this control cannot run on the model (its config, or its sites and heads), or None."""
    from attnctl.controls import control_from_json

    problem = control_problem(cfg)
    if problem:
        return problem
    control = control_from_json(check_control_json(cfg))
    if model is not None:
        problems = engine.bind_problems(model, [cfg], [control])
        if problems:
            return problems[0].split(": ", 1)[-1]
    return None


def maps_panel(model: engine.LoadedModel | None) -> engine.MapOptions:
    with st.expander("Attention maps", icon=":material/gradient:"):
        st.caption("Every Generate also records where the image attends to each word of the prompt "
                   "(mean over the heads, sites and steps chosen here).")
        ss = st.session_state
        if model is None:  # the sites and heads stay as chosen until a model loads
            chosen, heads = ss.get("map_sites_kept") or [], ss.get("map_heads_kept") or []
            st.caption("Sites and heads are chosen once a model loads.")
        else:
            sites = model.sites
            labels = [s.label for s in sites]
            names = {s.label: f"{s.label} · {s.name}" for s in sites}
            chosen = keyed(st.multiselect, "map_sites", list(ss.get("map_sites_kept") or []), "Sites",
                           options=labels, format_func=lambda x: names.get(x, x), placeholder="all sites")
            picked = [s for s in sites if s.label in chosen] or sites
            n_heads = min((s.heads for s in picked), default=1)
            heads = keyed(st.multiselect, "map_heads", list(ss.get("map_heads_kept") or []), "Heads",
                          options=list(range(n_heads)), placeholder="all heads")
            ss.map_sites_kept, ss.map_heads_kept = list(chosen), list(heads)
        span = st.slider("Steps (fraction of the run)", 0.0, 1.0, (0.0, 1.0), step=0.05, key="map_steps")
    return engine.MapOptions(sites=list(chosen) or "all", heads=sorted(heads) or None, start=span[0], stop=span[1])


# --------------------------------------------------------------------------------------------- runs


def show_failure(bar: Any, e: Exception, what: str) -> None:
    """A failed run or edit as one error line (attnctl's own message, or the exception's type and text)."""
    bar.empty()
    st.error(str(e) if isinstance(e, AttnCtlError) else f"the {what} failed: {type(e).__name__}: {e}", icon="🚫")


def run_generation(model: engine.LoadedModel, maps: engine.MapOptions, box) -> None:
    ss = st.session_state
    setup = current_setup()
    with box:
        bar = st.progress(0.0, text="Starting…")
        try:
            result = engine.generate(model, setup, maps, progress=lambda f, t: bar.progress(f, text=t))
        except Exception as e:  # noqa: BLE001 - a failed run is a message; the app keeps working
            show_failure(bar, e, "run")
            return
        bar.empty()
    previous = ss.history[-1]["setup"] if ss.history else None
    views = {"baseline": view_pngs(result.baseline_views, metadata_for(setup, result.info, controls=[])),
             "controlled": view_pngs(result.controlled_views, metadata_for(setup, result.info))}
    run = {
        "id": (ss.history[-1]["id"] + 1) if ss.history else 1,
        "setup": setup,
        "time": time.strftime("%H:%M:%S"),
        "seconds": result.seconds,
        "changes": describe_changes(previous, setup),
        "baseline": views["baseline"][0] if views["baseline"] else
        encode_png(result.baseline, metadata_for(setup, result.info, controls=[])),
        "controlled": views["controlled"][0] if views["controlled"] else
        encode_png(result.controlled, metadata_for(setup, result.info)) if result.controlled is not None else None,
        "baseline_views": views["baseline"],  # every view's PNG when the run makes several (view 1 is the above)
        "controlled_views": views["controlled"],
        "maps": result.maps,
        "words": result.words,
        "note": result.map_note,
        "control_notes": result.control_notes,
        "summary": controls_summary(setup),
        "maps_from": maps_description(maps),
    }
    ss.history = (ss.history + [run])[-HISTORY_LIMIT:]
    ss.current = run["id"]
    ss.notice = None


def view_pngs(views: list[Image.Image], meta: dict[str, Any]) -> list[bytes]:
    """The PNGs of a run's views, each recording the set's size and its index (as ``attnctl generate`` writes
    them), so any view regenerates the whole set."""
    return [encode_png(v, {**meta, "images": len(views), "image_index": i}) for i, v in enumerate(views)]


def views_zip(run: dict[str, Any], stem: str) -> bytes:
    """Every view of both images of a run, as one ZIP (``<stem>-baseline-<i>.png``, ``<stem>-controlled-<i>.png``)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for label in ("baseline", "controlled"):
            for i, png in enumerate(run.get(f"{label}_views") or []):
                z.writestr(f"{stem}-{label}-{i}.png", png)
    return buf.getvalue()


def maps_description(maps: engine.MapOptions) -> str:
    sites = "all sites" if maps.sites == "all" else "sites " + ", ".join(maps.sites)
    heads = "all heads" if maps.heads is None else "heads " + ", ".join(map(str, maps.heads))
    steps = "all steps" if (maps.start, maps.stop) == (0.0, 1.0) else f"steps {maps.start:g}–{maps.stop:g} of the run"
    return f"{sites} · {heads} · {steps}"


def controls_summary(setup: Setup) -> str:
    panels = available_panels()
    if not setup.controls:
        return "no controls"
    return " + ".join(panel_for(c.get("kind", ""), panels).title if c.get("kind") in panels else str(c.get("kind"))
                      for c in setup.controls)


def decode(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB")


def current_run() -> dict[str, Any] | None:
    ss = st.session_state
    for run in ss.history:
        if run["id"] == ss.current:
            return run
    return ss.history[-1] if ss.history else None


def empty_state() -> None:
    st.markdown("<div class='attnctl-empty'><b>Press Generate</b><br>The plain image and the controlled "
                "image appear side by side, from the same seed.</div>", unsafe_allow_html=True)


def compare_tab(run: dict[str, Any] | None) -> None:
    if run is None:
        empty_state()
        return
    s = run["setup"]
    if run.get("baseline_views"):
        views_rows(run)
    else:
        left, right = st.columns(2)
        with left:
            st.markdown("<div class='attnctl-label'>Baseline</div>", unsafe_allow_html=True)
            st.image(heatmap.upscale(decode(run["baseline"])), width="stretch")
        with right:
            st.markdown("<div class='attnctl-label'>Controlled</div>", unsafe_allow_html=True)
            if run["controlled"] is not None:
                st.image(heatmap.upscale(decode(run["controlled"])), width="stretch")
            else:
                st.markdown("<div class='attnctl-empty'>No controls in this run.</div>", unsafe_allow_html=True)
    st.caption(f"Run #{run['id']} · {s.model} · seed {s.seed} · {s.steps} steps · guidance {s.guidance:g} · "
               f"{s.width}×{s.height} · {run['summary']} · {run['seconds']:.1f} s")
    for line in run.get("control_notes", []):
        st.caption(line)


def views_rows(run: dict[str, Any]) -> None:
    """A run of several views: one row per image kind, one column per camera."""
    n = len(run["baseline_views"])
    header = st.columns(n)
    for i, col in enumerate(header):
        col.markdown(f"<div class='attnctl-label'>View {i + 1}</div>", unsafe_allow_html=True)
    rows = [("Baseline · independent views", run["baseline_views"]),
            ("Controlled", run.get("controlled_views") or [])]
    for label, pngs in rows:
        st.markdown(f"<div class='attnctl-label'>{label}</div>", unsafe_allow_html=True)
        for col, png in zip(st.columns(n), pngs, strict=False):
            col.image(heatmap.upscale(decode(png)), width="stretch")


def attention_tab(run: dict[str, Any] | None) -> None:
    if run is None:
        empty_state()
        return
    if run.get("note"):
        st.warning(run["note"], icon="⚠️")
    words = [w for w in run["words"] if any(w in m for m in run["maps"].values())]
    if not words:
        st.info("No attention maps in this run.", icon="ℹ️")
        return
    from attnctl.ui.panels.regulation import STOPWORDS, default_targets

    nouns = [w for w in default_targets(words) if w in words]
    default = list(dict.fromkeys(nouns + [w for w in words if w not in STOPWORDS]))[:4] or words[:1]
    a, b = st.columns([4, 1.4], vertical_alignment="bottom")
    chosen = a.multiselect("Words", words, default=default, key=f"words{run['id']}", max_selections=6,
                           help="Where the image attends to each word: the probe's mean over the sites, heads "
                                "and steps chosen under Attention maps.")
    strength = b.slider("Overlay", 0.2, 1.0, 0.8, 0.05, key="overlay")
    images = {"baseline": decode(run["baseline"])}
    if run["controlled"] is not None:
        images["controlled"] = decode(run["controlled"])
    if not chosen:
        return
    maps = {w: engine.joint_maps(run["maps"], w) for w in chosen}
    widths = [1.0] + [1.0] * len(chosen)
    header = st.columns(widths)
    header[0].markdown("<div class='attnctl-label'>image</div>", unsafe_allow_html=True)
    for col, w in zip(header[1:], chosen, strict=True):
        col.markdown(f"<div class='attnctl-label'>“{escape_html(w)}”</div>", unsafe_allow_html=True)
    for label, img in images.items():
        row = st.columns(widths)
        row[0].image(heatmap.upscale(img, 256), caption=label, width="stretch")
        for col, w in zip(row[1:], chosen, strict=True):
            if label in maps[w]:
                col.image(heatmap.overlay(img, maps[w][label], strength=strength, side=256), width="stretch")
    st.image(heatmap.colorbar(), caption="low → high attention (each word scaled over both images)", width=256)
    st.caption(f"Mean attention of the image on each word over {run.get('maps_from', 'all sites')}; "
               "change them under Attention maps and generate again.")


def escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def strip(pngs: list[bytes], side: int = 96, gap: int = 4) -> Image.Image:
    """Thumbnails side by side, for the history."""
    pics = [heatmap.upscale(decode(p), side) for p in pngs]
    pics = [p.resize((side, round(side * p.height / p.width))) for p in pics]
    height = max(p.height for p in pics)
    out = Image.new("RGB", (side * len(pics) + gap * (len(pics) - 1), height), (15, 17, 23))
    for i, p in enumerate(pics):
        out.paste(p, (i * (side + gap), 0))
    return out


def history_tab() -> None:
    ss = st.session_state
    if not ss.history:
        empty_state()
        return
    st.caption(f"The last {HISTORY_LIMIT} runs of this session, newest first: what changed, and the images "
               "(baseline | controlled).")
    shown = (current_run() or {}).get("id")
    for run in reversed(ss.history):
        s = run["setup"]
        with st.container(border=True, key=f"run{run['id']}"):
            thumbs, text, buttons = st.columns([2, 4, 1.3], vertical_alignment="center")
            pngs = [run["baseline"]] + ([run["controlled"]] if run["controlled"] is not None else [])
            thumbs.image(strip(pngs), width="stretch")
            badge = " :orange-badge[shown]" if run["id"] == shown else ""
            text.markdown(f"**Run #{run['id']}** · {run['time']}{badge}  \n{run['changes']}")
            text.caption(f"“{s.prompt}” · seed {s.seed} · {s.steps} steps · {run['summary']}")
            buttons.button("Show", key=f"show{run['id']}", on_click=on_show, args=(run["id"],), width="stretch")
            buttons.button("Restore", key=f"restore{run['id']}", on_click=on_restore, args=(run["id"],),
                           width="stretch", help="Put this run's settings back into the editor")


def export_tab(run: dict[str, Any] | None, model: engine.LoadedModel | None, card_problems: list[str]) -> None:
    st.markdown("<div class='attnctl-label'>Images</div>", unsafe_allow_html=True)
    if run is None:
        st.caption("Generate first: the PNGs of the shown run appear here.")
    else:
        s = run["setup"]
        stem = f"attnctl-run{run['id']}-seed{s.seed}"
        a, b = st.columns(2)
        if run["controlled"] is not None:
            a.download_button("Controlled PNG", run["controlled"], file_name=f"{stem}-controlled.png",
                              mime="image/png", icon=":material/download:", width="stretch", type="primary")
        b.download_button("Baseline PNG", run["baseline"], file_name=f"{stem}-baseline.png", mime="image/png",
                          icon=":material/download:", width="stretch")
        if run.get("baseline_views"):
            st.download_button(f"All {len(run['baseline_views'])} views of both (ZIP)", views_zip(run, stem),
                               file_name=f"{stem}-views.zip", mime="application/zip", icon=":material/folder_zip:",
                               width="stretch", help="The PNGs above are view 1; every view's PNG records the set")
        st.caption(f"Run #{run['id']}. Each PNG carries every setting in its metadata: open it here (sidebar), "
                   "or regenerate it with `attnctl generate --from image.png`.")
    st.markdown("<div class='attnctl-label'>Current setup as a batch file</div>", unsafe_allow_html=True)
    data = batch_file(current_setup(), model.pipe if model is not None else None,
                      model.info.get("model") if model is not None else None)
    problems = check_batch_file(data, model.pipe if model is not None else None)
    if card_problems:  # the file would hold those cards' last valid settings, not what they show
        problems = ["Fix the control cards first: the file would hold their last valid settings.",
                    *card_problems, *problems]
    text = json.dumps(data, indent=2)
    st.download_button("Batch file (JSON)", text, file_name="attnctl-batch.json", mime="application/json",
                       icon=":material/data_object:", key="download_item", disabled=bool(problems))
    for p in problems:
        st.error(p, icon="⚠️")
    st.caption("The editor's settings now, controls and schedules included, as the one item of a batch file: "
               "`attnctl batch attnctl-batch.json` makes the image; add items or seeds to make more.")
    st.code(text, language="json", height=320)


# --------------------------------------------------------------------------------------------- page


def edit_tab(run: dict[str, Any] | None, model: engine.LoadedModel | None) -> None:
    """Edit a real image (the current baseline or an uploaded PNG) by a change of its caption, with UnifyEdit."""
    ss = st.session_state
    st.caption("The image is inverted under the source prompt; the target prompt is then drawn from that noise "
               "twice: as it is, and with UnifyEdit (self-attention kept, the new words pulled into the region of "
               "the replaced ones). Steps and guidance are the settings above.")
    choice = st.radio("Image", ["Current baseline", "Upload a PNG"], key="edit_from", horizontal=True)
    image = None
    if choice == "Upload a PNG":
        f = st.file_uploader("PNG to edit", type=["png"], key="edit_upload",
                             help=f"PNG files up to {MAX_UPLOAD_MB} MB")
        if f is not None:
            try:
                image = check_png_upload(f.name, f.getvalue(), settings=False).image  # any real image
            except UploadError as e:
                st.error(f"Could not open {f.name!r}: {e}", icon="🚫")
    elif run is not None:
        image = decode(run["baseline"])
        if ss.get("edit_source_run") != run["id"]:  # a new baseline: what it shows is its own prompt (the first
            ss.edit_source_run = run["id"]  # prompt of the session stayed here, under every later image)
            ss.edit_source = run["setup"].prompt
    else:
        st.caption("Generate first, or upload a PNG.")
    st.text_input("Source prompt: what the image shows", key="edit_source")
    st.text_input("Target prompt: what it should show", key="edit_target",
                  placeholder="the source prompt with the words of the edit changed")
    st.number_input("Step size η over the first half of the steps", min_value=0.0, max_value=2.0, step=0.05,
                    key="edit_scale")
    solvers = {"euler": "Euler", "midpoint": "Midpoint (RF-Solver)"}  # attnctl.midpoint.SOLVERS, as labelled here
    st.radio("Solver", list(solvers), key="edit_solver", horizontal=True, format_func=solvers.get,
             help="Midpoint: RF-Solver's second-order step for the inversion and both runs; two model calls a "
                  "step, and the image comes back closer")
    st.checkbox("RF-Inversion", key="edit_rf",
                help="RF-Inversion's controllers on both runs: the inversion is pulled toward a noise sample (γ), "
                     "the edit toward the input over the first steps (η)")
    off = not ss.edit_rf  # the inputs stay drawn (greyed out), so their values survive the box being unticked
    g_col, e_col, s_col = st.columns(3)
    g_col.number_input("γ (inversion)", min_value=0.0, max_value=1.0, step=0.05, key="edit_rf_gamma", disabled=off)
    e_col.number_input("η (edit)", min_value=0.0, max_value=1.0, step=0.05, key="edit_rf_eta", disabled=off)
    s_col.number_input("η until (share of the steps)", min_value=0.05, max_value=1.0, step=0.05, key="edit_rf_stop",
                       disabled=off, help="η is on from the first step until this share of the steps (set η to 0 "
                                          "to turn it off)")
    rf = None if off else {"gamma": float(ss.edit_rf_gamma),
                           "eta": f"window({float(ss.edit_rf_eta)!r}, 0, {float(ss.edit_rf_stop)!r})"}
    st.checkbox("Value sharing (RF-Solver-Edit)", key="edit_share",
                help="RF-Solver-Edit's feature sharing on both runs: at the late attention sites, over the first "
                     "steps, the target attends with the input's values, so its layout and look hold")
    off = not ss.edit_share  # drawn greyed out when off, as RF-Inversion's, so the values survive
    w_col, u_col, t_col = st.columns(3)
    w_col.number_input("Weight", min_value=0.0, max_value=1.0, step=0.05, key="edit_share_weight", disabled=off,
                       help="The share of the input's values the target reads (1: replace them; 0: no sharing)")
    u_col.number_input("Until (share of the steps)", min_value=0.05, max_value=1.0, step=0.05, key="edit_share_stop",
                       disabled=off, help="Values are shared from the first step until this share of the steps (set "
                                          "the weight to 0 to turn it off)")
    share_tokens = {"all": "All tokens", "image": "Image tokens"}
    t_col.radio("Tokens", list(share_tokens), key="edit_share_tokens", format_func=share_tokens.get, disabled=off,
                help="All: text and image values, as RF-Solver-Edit; image: the target prompt's text values stay "
                     "its own")
    share = None if off else {"weight": f"window({float(ss.edit_share_weight)!r}, 0, {float(ss.edit_share_stop)!r})",
                              "tokens": ss.edit_share_tokens}
    clicked = st.button("Edit", key="edit_run", icon=":material/edit:", disabled=model is None or image is None)
    if clicked and model is not None and image is not None:
        bar = st.progress(0.0, text="Inverting…")
        try:
            result = engine.edit_image(model, image, ss.edit_source, ss.edit_target, int(ss.steps),
                                       float(ss.guidance), {"scale": f"window({float(ss.edit_scale)!r}, 0, 0.5)"},
                                       progress=lambda f, t: bar.progress(f, text=t), solver=ss.edit_solver,
                                       rf=rf, share=share)
        except Exception as e:  # noqa: BLE001 - a failed edit is a message; the app keeps working
            show_failure(bar, e, "edit")
            return
        bar.empty()
        meta = {"model": model.name, "edited_from": "an image edited in attnctl ui",
                "source_prompt": ss.edit_source, "prompt": ss.edit_target, "steps": int(ss.steps),
                "guidance": float(ss.guidance), "controls": [result.control], "solver": ss.edit_solver,
                **({"rf_inversion": result.rf} if result.rf is not None else {}),
                **({"value_sharing": result.share} if result.share is not None else {})}
        added = " + ".join(name for name, on in (("RF-Inversion", rf is not None), ("value sharing", share is not None))
                           if on)  # what both runs have beside UnifyEdit's latent guidance
        labels = ("Input", "Target prompt, unguided", "UnifyEdit") if not added else \
            ("Input", f"Target prompt, {added}", f"UnifyEdit + {added}")
        ss.edit_result = {"images": [encode_png(result.source, {}), encode_png(result.unguided, meta),
                                     encode_png(result.edited, meta)],
                          "labels": labels, "summary": result.summary, "seconds": result.seconds}
    shown = ss.get("edit_result")
    if shown:
        labels = shown.get("labels", ("Input", "Target prompt, unguided", "UnifyEdit"))
        for col, label, png in zip(st.columns(3), labels, shown["images"], strict=True):
            with col:
                st.markdown(f"<div class='attnctl-label'>{label}</div>", unsafe_allow_html=True)
                st.image(heatmap.upscale(decode(png)), width="stretch")
        st.caption(f"{shown['summary'] or 'no guided step'} · {shown['seconds']:.1f} s")
        st.download_button("Download the edit (PNG)", shown["images"][2], file_name="edited.png",
                           mime="image/png", key="edit_download")


def main() -> None:
    init_state()
    st.markdown(CSS, unsafe_allow_html=True)
    ss = st.session_state
    model, notice_box = sidebar()
    ctx = PanelContext(steps=int(ss.steps), words=engine.prompt_words(ss.prompt, limit=None), prompt=ss.prompt)
    if model is not None:
        ctx.sites, ctx.family, ctx.is_toy = model.sites, model.family, model.is_toy
        apply_model_defaults(model, ctx)
        ctx.steps = int(ss.steps)

    settings_row(model)
    gen_col, status_col = st.columns([1, 3], vertical_alignment="center")
    clicked = gen_col.button("Generate", type="primary", icon=":material/auto_awesome:", key="generate",
                             width="stretch", disabled=model is None)
    progress_box = status_col.container()

    left, right = st.columns([5, 7], gap="large")
    with left, st.container(key="controls_column"):
        problems = controls_panel(ctx, model)
        maps = maps_panel(model)
    show_notice(notice_box)
    if clicked and model is not None:
        if problems:
            progress_box.error(" ".join(problems), icon="⚠️")
        else:
            run_generation(model, maps, progress_box)
    elif model is None:
        progress_box.caption("Pick a model that loads to generate.")
    with right, st.container(key="results_column"):
        run = current_run()
        compare, attention, history, export, editing = st.tabs(["Compare", "Attention", "History", "Export",
                                                                 "Edit image"])
        with compare, st.container(key="compare"):
            compare_tab(run)
        with attention:
            attention_tab(run)
        with history:
            history_tab()
        with export:
            export_tab(run, model, problems)
        with editing:
            edit_tab(run, model)


main()
