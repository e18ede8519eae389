"""What a Generate click does, as plain functions: load a model, check a setup, run baseline and
controlled images from the same seed with an attention probe on each, and keep the word maps.

The Streamlit app caches :func:`load_model` (``st.cache_resource``); everything here also works without
Streamlit (tests, notebooks). A model is shared by every browser session of the app, so generation holds
the model's lock: controls install their processors for the length of one pipeline call.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnCtlError
from .safety import check_control_json
from .setup import MAX_SIDE, MAX_STEPS, TOY_NAMES, Setup, for_ui

_WORD = re.compile(r"\w+")
MAX_MAP_WORDS = 24
"""At most this many distinct prompt words get an attention map per run."""

Progress = Callable[[float, str], None]


@dataclass
class LoadedModel:
    """A loaded pipeline and what the UI needs to know about it."""

    name: str
    pipe: Any
    family: str
    sites: list[Any]
    defaults: dict[str, Any]
    is_toy: bool
    size_multiple: int
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def smallest_side(self) -> int:
        """The smallest side the UI offers: a multiple of the model's size multiple, and no less than the CLI's."""
        from ..sizes import SMALLEST_SIDE

        return -(-SMALLEST_SIDE // self.size_multiple) * self.size_multiple

    @property
    def label(self) -> str:
        return self.name if self.name in TOY_NAMES else Path(self.name).name or self.name


@dataclass
class MapOptions:
    """Where the attention probe listens: site selector, heads (None: all), and a window of the run."""

    sites: str | list[str] = "all"
    heads: list[int] | None = None
    start: float = 0.0
    stop: float = 1.0

    def probe_json(self, words: list[str]) -> dict[str, Any]:
        stop = min(1.0, max(self.stop, self.start))
        weight: Any = 1.0 if (self.start, stop) == (0.0, 1.0) else \
            {"kind": "window", "value": 1.0, "start": self.start, "stop": stop}
        return {"kind": "probe", "words": words, "sites": self.sites, "heads": self.heads, "weight": weight}


@dataclass
class RunResult:
    """One Generate click: the images, the word maps of each, and how long it took."""

    setup: Setup
    baseline: Any  # PIL image
    controlled: Any | None  # PIL image, None without controls
    maps: dict[str, dict[str, np.ndarray]]  # "baseline" / "controlled" -> word -> (h, w) mean attention
    words: list[str]
    seconds: float
    info: dict[str, Any]
    map_note: str | None = None
    control_notes: list[str] = field(default_factory=list)  # each control's summary of the controlled run
    baseline_views: list[Any] = field(default_factory=list)  # every view when the run makes several (epipolar)
    controlled_views: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- models


def check_model_name(name: str) -> str:
    """The model field, checked: a toy name, an existing local pipeline folder (read only) or a hub id."""
    from ..toyworld.models import resolve_model

    name = (name or "").strip()
    if not name:
        raise AttnCtlError("no model given",
                           f"pick a toy model ({', '.join(TOY_NAMES)}), or type a hub id or a local folder")
    if len(name) > 400 or any(ord(c) < 32 for c in name):
        raise AttnCtlError("the model name is not a name, a hub id or a folder",
                           "type a hub id such as owner/name or the path of a pipeline folder")
    resolve_model(name)  # raises a clear AttnCtlError for unknown names and folders without model_index.json
    return name


def load_model(name: str, device: str = "cpu", dtype: str = "fp32") -> LoadedModel:
    """Load ``name`` (toy name, local pipeline folder or hub id) on ``device`` in ``dtype`` (fp32, fp16 or bf16;
    the names ``attnctl generate`` takes)."""
    import diffusers
    import torch

    from .. import __version__
    from ..cli import DTYPE_NAMES, call_defaults, check_device, is_toy_pipeline, parse_dtype
    from ..sites import family_of, list_sites
    from ..sizes import size_multiple
    from ..toyworld.models import load_pipeline

    name = check_model_name(name)
    dev, torch_dtype = check_device(device), parse_dtype(dtype)
    pipe = load_pipeline(name, device=str(dev), dtype=torch_dtype, controlled=True)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe.transformer)
    path = Path(name).expanduser()
    record = name if name in TOY_NAMES or not path.exists() else str(path.resolve())
    defaults = call_defaults(pipe)
    info = {
        "model": record,
        "family": family,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "max_sequence_length": int(defaults.get("max_sequence_length", 256)),
        "attnctl_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "device": str(dev),
        "dtype": DTYPE_NAMES[str(torch_dtype).removeprefix("torch.")],
    }
    return LoadedModel(name=name, pipe=pipe, family=family, sites=list_sites(pipe.transformer),
                       defaults=defaults, is_toy=is_toy_pipeline(pipe), size_multiple=size_multiple(pipe), info=info)


# --------------------------------------------------------------------------------------------- checks


def prompt_words(prompt: str, limit: int | None = MAX_MAP_WORDS) -> list[str]:
    """Distinct words of the prompt, lowercased, in order (what maps and word pickers offer); ``limit=None``: all."""
    out: list[str] = []
    for w in _WORD.findall(prompt.lower()):
        if w not in out:
            out.append(w)
    return out[:limit]


def build_controls(configs: list[dict[str, Any]]) -> list[Any]:
    """Controls from their JSON configs; an error names the control's number and kind."""
    from ..controls import control_from_json

    controls = []
    for i, cfg in enumerate(configs):
        where = f"control #{i + 1} ({cfg.get('kind', '?') if isinstance(cfg, dict) else '?'})"
        try:
            check_control_json(cfg, where)
            controls.append(control_from_json(cfg))
        except ValueError as e:  # AttnCtlError, UploadError and pydantic's errors are ValueErrors
            raise AttnCtlError(f"{where}: {for_ui(str(e))}") from None
    return controls


def check_setup(model: LoadedModel, setup: Setup) -> list[str]:
    """Everything wrong with ``setup`` for ``model``, as messages (empty: ready to generate)."""
    from ..cli import check_vocabulary
    from ..sizes import largest_side

    problems = []
    if not setup.prompt.strip():
        problems.append("Write a prompt.")
    elif len(setup.prompt) > 2000:
        problems.append("The prompt is longer than 2000 characters.")
    else:
        try:
            check_vocabulary(model.pipe, [setup.prompt, setup.negative_prompt, *setup.reference_prompts],
                             model.label)
        except AttnCtlError as e:
            problems.append(str(e))
    if setup.negative_prompt.strip() and model.family == "flux":
        problems.append("The negative prompt does nothing on a FLUX model here: it acts only through true CFG, which "
                        "the editor does not run. Clear it.")
    elif setup.negative_prompt.strip() and setup.guidance <= 1:
        problems.append(f"The negative prompt acts through CFG, which a guidance of {setup.guidance} turns off: raise "
                        "the guidance above 1, or clear the negative prompt.")
    embeds = model.pipe.transformer.config.get("guidance_embeds")
    if model.family == "flux" and not embeds and setup.guidance != model.defaults["guidance"]:
        problems.append(f"The guidance does nothing on this FLUX model (it takes no guidance value): set it back to "
                        f"{model.defaults['guidance']}.")
    m, low, top = model.size_multiple, model.smallest_side, min(MAX_SIDE, largest_side(model.pipe) or MAX_SIDE)
    for side, v in (("height", setup.height), ("width", setup.width)):
        if not low <= v <= top or v % m:
            problems.append(f"The {side} must be a multiple of {m} between {low} and {top} (got {v}).")
    if not 1 <= setup.steps <= MAX_STEPS:
        problems.append(f"Steps must be 1..{MAX_STEPS}.")
    try:
        controls = build_controls(setup.controls)
    except AttnCtlError as e:
        problems.append(str(e))
        controls = []
    for c in controls:
        if c.kind in ("unify_edit", "value_sharing"):
            problems.append(f"The {c.kind} control edits an existing image: use the Edit tab for it.")
    problems.extend(bind_problems(model, setup.controls, controls))
    try:
        call_prompt(setup, controls)
        views_of(setup, controls)
    except AttnCtlError as e:
        problems.append(str(e))
    return problems


def views_of(setup: Setup, controls: list[Any]) -> int:
    """Images per prompt of both runs: an epipolar control's views, else 1 (the baseline makes as many, from the same
    noise, independently)."""
    from ..views import images_per_prompt

    return images_per_prompt(controls, None, setup.reference_prompts, option="images")


def call_prompt(setup: Setup, controls: list[Any]) -> str | list[str]:
    """The pipeline's prompt: the scene, or ``[reference_1 … reference_n, scene]`` for reposition (the baseline makes
    the same set without controls, so both runs start from the same noise)."""
    from ..cli import reposition_prompts

    return reposition_prompts(setup.prompt, setup.reference_prompts or None, controls, "reference prompt")


def bind_problems(model: LoadedModel, configs: list[dict[str, Any]], controls: list[Any]) -> list[str]:
    """Resolve each control against the model (sites, heads, family) without installing anything."""
    from ..controller import Controller

    out = []
    for i, (cfg, control) in enumerate(zip(configs, controls, strict=False)):
        try:
            Controller(model.pipe, [control])  # the pipeline: latent guidance needs its scheduler
        except AttnCtlError as e:
            out.append(f"control #{i + 1} ({cfg.get('kind', '?')}): {e}")
    return out


# --------------------------------------------------------------------------------------------- generation


def _call(model: LoadedModel, setup: Setup, controls: list[Any], progress: Progress | None, done: int,
          total: int, label: str, views: int = 1) -> list[Any]:
    import torch

    def on_step(pipe, i, t, kwargs):
        if progress is not None:
            progress(min(1.0, (done + i + 1) / total), f"{label}: step {i + 1} of {setup.steps}")
        return kwargs

    call: dict[str, Any] = {
        "prompt": call_prompt(setup, controls),
        "num_inference_steps": setup.steps,
        "guidance_scale": setup.guidance,
        "height": setup.height,
        "width": setup.width,
        "max_sequence_length": setup.max_sequence_length or model.info["max_sequence_length"],
        "generator": torch.Generator("cpu").manual_seed(setup.seed),
        "output_type": "pil",
        "callback_on_step_end": on_step,
    }
    if setup.negative_prompt:
        call["negative_prompt"] = setup.negative_prompt
    if views > 1:
        call["num_images_per_prompt"] = views
    try:
        out = model.pipe(**call, controls=controls or None)
    except AttnCtlError:
        raise
    except ValueError as e:
        raise AttnCtlError(f"the pipeline refused the call: {' '.join(str(e).split())[:400]}",
                           "check the size, steps, guidance and prompt") from e
    return out.images if views > 1 else out.images[-1:]  # a reposition scene comes after its references


def _maps_of(probe) -> dict[str, np.ndarray]:
    return {w: m[0].detach().float().cpu().numpy() for w, m in probe.word_maps().items()}


def generate(model: LoadedModel, setup: Setup, maps: MapOptions | None = None,
             progress: Progress | None = None) -> RunResult:
    """Baseline (no controls) and controlled image from the same seed, each with its word maps."""
    from ..controls import control_from_json

    problems = check_setup(model, setup)
    if problems:
        raise AttnCtlError(" ".join(problems))
    words = prompt_words(setup.prompt)
    runs = [("baseline", [])] + ([("controlled", setup.controls)] if setup.controls else [])
    total = setup.steps * len(runs)
    views = views_of(setup, build_controls(setup.controls))
    images: dict[str, list[Any]] = {}
    all_maps: dict[str, dict[str, np.ndarray]] = {}
    note = None
    with_maps = maps is not None and bool(words)
    if maps is not None and setup.reference_prompts:
        note, with_maps = "attention maps are not made for reposition runs (the references share the call)", False
    elif with_maps and maps.start >= min(1.0, maps.stop):
        note, with_maps = "no attention maps: their span of the steps is empty (widen the steps of the maps)", False
    elif maps is not None and views > 1:
        note = f"the attention maps are those of view 1 of {views}"
    notes: list[str] = []
    start = time.perf_counter()
    with model.lock:
        for n, (label, configs) in enumerate(runs):
            controls = build_controls(configs)
            probe = control_from_json(maps.probe_json(words)) if with_maps else None
            try:
                images[label] = _call(model, setup, controls + ([probe] if probe else []), progress,
                                      n * setup.steps, total, label, views)
            except AttnCtlError as e:
                if probe is None or "probe" not in str(e).lower() and "word" not in str(e).lower():
                    raise
                note, with_maps = f"attention maps are not available for this run: {e}", False
                probe = None
                images[label] = _call(model, setup, controls, progress, n * setup.steps, total, label, views)
            if label == "controlled":
                notes = [n for n in (c.summary() for c in controls) if n]
            if probe is not None:
                try:
                    all_maps[label] = _maps_of(probe)
                except AttnCtlError as e:
                    note, with_maps = f"no attention maps: {e} (widen the steps or sites of the maps)", False
    several = views > 1
    return RunResult(setup=setup, baseline=images["baseline"][0],
                     controlled=images["controlled"][0] if "controlled" in images else None,
                     maps=all_maps, words=words, seconds=time.perf_counter() - start, info=dict(model.info),
                     map_note=note, control_notes=notes, baseline_views=images["baseline"] if several else [],
                     controlled_views=images.get("controlled", []) if several else [])


def joint_maps(maps: dict[str, dict[str, np.ndarray]], word: str) -> dict[str, np.ndarray]:
    """The word's maps of both images (``RunResult.maps``) scaled together to [0, 1], so their strengths
    compare."""
    found = {k: v[word] for k, v in maps.items() if word in v}
    if not found:
        return {}
    hi = max(float(m.max()) for m in found.values())
    lo = min(float(m.min()) for m in found.values())
    scale = hi - lo if hi > lo else 1.0
    return {k: (m - lo) / scale for k, m in found.items()}


# --------------------------------------------------------------------------------------------- real-image edits


@dataclass
class EditRun:
    """One edit of the Edit tab: the input, the target prompt from its inverted noise without latent guidance, and
    the UnifyEdit result."""

    source: Any
    unguided: Any
    edited: Any
    seconds: float
    summary: str | None
    control: dict[str, Any]
    rf: dict[str, Any] | None = None
    share: dict[str, Any] | None = None


def edit_image(model: LoadedModel, image: Any, source: str, target: str, steps: int, guidance: float,
               config: dict[str, Any] | None = None, progress: Progress | None = None,
               solver: str = "euler", rf: dict[str, Any] | None = None,
               share: dict[str, Any] | None = None) -> EditRun:
    """Edit ``image`` (PIL) from ``source`` to ``target`` with UnifyEdit (``config``: its settings), next to the
    unguided edit from the same inverted noise. ``solver`` "midpoint" inverts and samples with RF-Solver's step
    (:class:`~attnctl.midpoint.FlowMatchMidpointScheduler`, in place of the model's scheduler for this edit only).
    ``rf`` (RF-Inversion's settings, :class:`~attnctl.rf_inversion.RFInversion` JSON) adds its controllers to both
    runs, so the unguided one is RF-Inversion alone. ``share`` (value-sharing settings,
    :class:`~attnctl.controls.value_sharing.ValueSharing` JSON) adds RF-Solver-Edit's value sharing to both runs the
    same way."""
    from ..cli import check_vocabulary
    from ..controls.unify_edit import UnifyEdit
    from ..controls.value_sharing import ValueSharing
    from ..editing import edit
    from ..midpoint import SOLVERS, use_solver
    from ..rf_inversion import RFInversion
    from ..sizes import largest_side

    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    m = model.size_multiple
    problems = []
    top = min(MAX_SIDE, largest_side(model.pipe) or MAX_SIDE)
    if h % m or w % m or max(h, w) > top or min(h, w) < model.smallest_side:
        problems.append(f"the image is {w}×{h} px; this model needs sides that are multiples of {m}, from "
                        f"{model.smallest_side} up to {top} px (crop or resize it first)")
    try:
        check_vocabulary(model.pipe, [source, target], model.label)
    except AttnCtlError as e:
        problems.append(str(e))
    if not 1 <= int(steps) <= MAX_STEPS:
        problems.append(f"steps must be 1 to {MAX_STEPS}")
    if not source.strip() or not target.strip():
        problems.append("describe the image (source prompt) and the edit (target prompt)")
    if solver not in SOLVERS:
        problems.append(f"the solver is {solver!r}; choose one of {', '.join(SOLVERS)}")
    if problems:
        raise AttnCtlError(" ".join(problems))
    rf_config = None if rf is None else RFInversion.from_json(rf)
    share_config = None if share is None else ValueSharing.from_json(share)
    control = UnifyEdit(**(config or {}))
    runs = [("unguided", UnifyEdit(scale=0.0)), ("UnifyEdit", control)]
    out: dict[str, Any] = {}
    path = None  # the inversion, shared by both runs
    shared = None  # the last run's value sharing, for its summary
    start = time.perf_counter()
    with model.lock, use_solver(model.pipe, solver):  # the solver for this edit only
        calls = int(steps) * model.pipe.scheduler.order  # loop calls per run
        for n, (label, ctl) in enumerate(runs):
            def on_step(pipe, i, t, kwargs, n=n, label=label):
                if progress is not None:
                    step = i // pipe.scheduler.order + 1
                    progress(min(1.0, (n * calls + i + 1) / (2 * calls)), f"{label}: step {step} of {steps}")
                return kwargs

            shared = None if share is None else ValueSharing.from_json(share)  # fresh: a control keeps run state
            res = edit(model.pipe, arr, source, target, int(steps), control=ctl, guidance_scale=guidance,
                       path=path, max_sequence_length=model.info["max_sequence_length"],
                       callback_on_step_end=on_step, rf=rf_config, share=shared)
            out[label], path = res.edited, res.path
    lines = [line for line in (control.summary(), shared and shared.summary()) if line]
    return EditRun(source=image.convert("RGB"), unguided=out["unguided"], edited=out["UnifyEdit"],
                   seconds=time.perf_counter() - start, summary=" · ".join(lines) or None, control=control.to_json(),
                   rf=None if rf_config is None else rf_config.to_json(),
                   share=None if share_config is None else share_config.to_json())
