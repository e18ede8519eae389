"""The user's setup as plain data, and its three forms: PNG metadata, a JSON batch item, a change list.

A :class:`Setup` is what one Generate click runs: model, prompt, seed, steps, guidance, size, the
controls (as their JSON configs) and, for reposition, the reference prompts made in the same call. It
round-trips through the metadata attnctl writes into PNGs (:mod:`attnctl.imageio`), so an image opened in the
UI restores every setting, and it exports as an item of the JSON batch file ``attnctl batch`` reads.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..toyworld import TOY_MODEL_NAMES
from .safety import UploadError, check_control_json

TOY_NAMES = TOY_MODEL_NAMES

MAX_SEED = 2**32 - 1
MAX_STEPS = 200
MAX_SIDE = 2048
MAX_TEXT_LENGTH = 4096


FILE_HINTS = {"pass a HeadSet, a preset path (*.json), or selectors such as":
              "choose layers or heads on the card, a head set shipped for this model, or write selectors such as",
              "a preset path (*.json)": "a head set shipped for this model"}
"""The library's ways out that name a file, as the UI offers them (it opens no file named in settings)."""


def for_ui(message: str) -> str:
    """A library message with its ways out that name a file put as the UI offers them."""
    for said, meant in FILE_HINTS.items():
        message = message.replace(said, meant)
    return message


def control_problem(config: Any) -> str | None:
    """Why the library refuses this control config (its own message), or None when it builds."""
    from ..controls import control_from_json

    try:
        control_from_json(check_control_json(config))
    except ValueError as e:  # AttnCtlError, UploadError and pydantic's errors are ValueErrors
        return for_ui(str(e))
    except Exception as e:  # noqa: BLE001 - a config the control's code trips over is refused all the same
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class Setup:
    model: str = "toy-sd3"
    prompt: str = "a red circle to the left of a blue square"
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    height: int = 32
    width: int = 32
    controls: list[dict[str, Any]] = field(default_factory=list)
    reference_prompts: list[str] = field(default_factory=list)
    """Reposition: the prompts of the subjects' reference images, made in the same call before the scene."""
    max_sequence_length: int | None = None
    """T5 tokens of the prompt; None: the model's default."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- metadata


def _int(meta: dict[str, Any], key: str, lo: int, hi: int, default: int | None, notes: list[str]) -> int | None:
    if key not in meta or meta[key] is None:
        return default
    v = meta[key]
    kept = "the model's default" if default is None else default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)) or int(v) != v:
        notes.append(f"{key}={v!r} is not an integer; kept {kept}")
        return default
    if not lo <= int(v) <= hi:
        notes.append(f"{key}={v!r} is outside {lo}..{hi}; kept {kept}")
        return default
    return int(v)


def _float(meta: dict[str, Any], key: str, lo: float, hi: float, default: float, notes: list[str]) -> float:
    if key not in meta or meta[key] is None:
        return default
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)) or not lo <= v <= hi:
        notes.append(f"{key}={v!r} is not a number in {lo}..{hi}; kept {default}")
        return default
    return float(v)


def setup_from_metadata(meta: dict[str, Any], base: Setup | None = None) -> tuple[Setup, list[str]]:
    """The setup recorded in a PNG's attnctl metadata, over ``base`` for what it lacks; plus notes on
    fields that were missing or refused. Controls that name files are refused (:class:`UploadError`)."""
    base = base or Setup()
    notes: list[str] = []
    if "edited_from" in meta or "source_prompt" in meta:  # an edit's PNG (Edit tab, attnctl edit): not a setup
        raise UploadError(f"this PNG is an edit (of {meta.get('source_prompt')!r} into {meta.get('prompt')!r}), not a "
                          "generated image: to edit it further, open it in the Edit tab with 'Upload a PNG'")
    model = meta.get("model")
    if not isinstance(model, str) or not model.strip():
        notes.append(f"no model recorded; kept {base.model}")
        model = base.model
    prompt = meta.get("prompt")
    if not isinstance(prompt, str):
        raise UploadError("the attnctl settings in this PNG have no prompt")
    negative = meta.get("negative_prompt") or ""
    if not isinstance(negative, str):
        negative = ""
    controls = meta.get("controls") or []
    if not isinstance(controls, list):
        raise UploadError("the attnctl settings in this PNG list no controls (\"controls\" is not a list)")
    checked = [check_control_json(c, f"control #{i + 1} of the PNG") for i, c in enumerate(controls)]
    for i, c in enumerate(checked):
        problem = control_problem(c)
        if problem:
            notes.append(f"control #{i + 1} ({c.get('kind', '?')}) is not valid as recorded ({problem}); it opens in "
                         "the JSON panel to fix")
    references = meta.get("reference_prompts") or []
    if not (isinstance(references, list) and all(isinstance(r, str) for r in references)) or len(references) > 16:
        notes.append("the reference prompts recorded are not a list of at most 16 strings; left out")
        references = []
    true_cfg = meta.get("true_cfg")
    if true_cfg is not None:
        notes.append(f"true CFG {true_cfg} is recorded, and the editor does not run true CFG: its image will differ "
                     "(`attnctl generate --from` makes the recorded one)")
    epipolar = any(isinstance(c, dict) and c.get("kind") == "epipolar" for c in controls)
    index = meta.get("image_index")
    if isinstance(meta.get("images"), int) and meta["images"] > 1 and not epipolar:
        notes.append(f"this PNG is image {(index or 0) + 1} of {meta['images']} made in one call, and the editor makes "
                     "one image a call: its image will differ (`attnctl generate --from` makes the recorded one)")
    elif isinstance(index, int) and index > 0:
        notes.append(f"this PNG is view {index + 1} of its set; the editor shows view 1 first")
    setup = Setup(
        model=model.strip(),
        prompt=prompt[:2000],
        negative_prompt=negative[:2000],
        seed=_int(meta, "seed", 0, MAX_SEED, base.seed, notes),
        steps=_int(meta, "steps", 1, MAX_STEPS, base.steps, notes),
        guidance=_float(meta, "guidance", 0.0, 100.0, base.guidance, notes),
        height=_int(meta, "height", 8, MAX_SIDE, base.height, notes),
        width=_int(meta, "width", 8, MAX_SIDE, base.width, notes),
        controls=[json.loads(json.dumps(c)) for c in checked],
        reference_prompts=[r[:2000] for r in references],
        max_sequence_length=_int(meta, "max_sequence_length", 1, MAX_TEXT_LENGTH, None, notes),
    )
    return setup, notes


def metadata_for(setup: Setup, info: dict[str, Any], controls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The PNG metadata of an image made from ``setup`` (``controls`` overrides the setup's, e.g. ``[]``
    for the baseline). ``info`` adds what the engine knows: model record, family, pipeline, scheduler,
    max_sequence_length, versions."""
    meta: dict[str, Any] = {
        "prompt": setup.prompt,
        "negative_prompt": setup.negative_prompt or None,
        "seed": setup.seed,
        "generator": "cpu",
        "model": info.get("model", setup.model),
        "family": info.get("family"),
        "pipeline": info.get("pipeline"),
        "steps": setup.steps,
        "guidance": setup.guidance,
        "height": setup.height,
        "width": setup.width,
        "max_sequence_length": setup.max_sequence_length or info.get("max_sequence_length"),
        "true_cfg": None,
        "dtype": info.get("dtype", "fp32"),
        "controls": list(setup.controls if controls is None else controls),
        "scheduler": info.get("scheduler"),
        "device": info.get("device", "cpu"),
        "attention_backend": None,
        "made_with": "attnctl ui",
    }
    if setup.reference_prompts:
        meta["reference_prompts"] = list(setup.reference_prompts)
    for key in ("attnctl_version", "diffusers_version", "torch_version"):
        if info.get(key):
            meta[key] = info[key]
    return meta


# --------------------------------------------------------------------------------------------- batch item


def batch_item(setup: Setup, guidance: bool = True) -> dict[str, Any]:
    """The setup as one item of an ``attnctl batch`` file (``attnctl.batch.GenerateItem``): prompt,
    negative prompt, seed, steps, guidance, size and controls. The model is a field of the file, not of the
    item (:func:`batch_file`). ``guidance=False`` leaves the guidance out, for a model that takes none (a FLUX
    transformer without a guidance embedding, where the batch check refuses the field)."""
    item: dict[str, Any] = {"prompt": setup.prompt}
    if setup.negative_prompt:
        item["negative_prompt"] = setup.negative_prompt
    item.update(seed=setup.seed, steps=setup.steps, guidance=float(setup.guidance), height=setup.height,
                width=setup.width, controls=[json.loads(json.dumps(c)) for c in setup.controls])
    if not guidance:
        del item["guidance"]
    if setup.reference_prompts:
        item["reference_prompts"] = list(setup.reference_prompts)
    if setup.max_sequence_length:
        item["max_sequence_length"] = int(setup.max_sequence_length)
    return item


def batch_file(setup: Setup, pipe: Any = None, model: str | None = None) -> dict[str, Any]:
    """A batch file (schema version 1) holding the setup as its one item: ``attnctl batch FILE`` runs it. With the
    loaded ``pipe``, a guidance the model does not take is left out. ``model`` is the loaded model's record (a local
    folder made absolute, as the PNGs record it); without it, the setup's model as typed."""
    from ..sites import family_of

    transformer = getattr(pipe, "transformer", None)
    ignored = transformer is not None and family_of(transformer) == "flux" and not transformer.config.get(
        "guidance_embeds")
    return {"version": 1, "model": model or setup.model, "items": [batch_item(setup, guidance=not ignored)]}


def check_batch_file(data: dict[str, Any], pipe: Any = None) -> list[str]:
    """The problems ``attnctl batch`` would report for ``data`` (empty: valid). Uses ``attnctl.batch``'s own
    validation, and with ``pipe`` (the loaded model) its check against the model too; when that module is not
    importable, nothing is checked."""
    try:
        batch = importlib.import_module("attnctl.batch")
    except Exception:  # noqa: BLE001 - the batch module is optional here
        return []
    try:
        plan = batch.plan_batch(data, "the exported batch file")
    except ValueError as e:  # BatchFileError (a ConfigError) and any other AttnCtlError
        return list(getattr(e, "problems", None) or [str(e)])
    return batch.model_problems(plan, pipe) if pipe is not None else []


# --------------------------------------------------------------------------------------------- changes


def describe_changes(before: Setup | None, after: Setup) -> str:
    """A short human summary of what changed from ``before`` to ``after`` (for the run history)."""
    if before is None:
        return "first run"
    out = []
    for key in ("model", "prompt", "negative_prompt", "seed", "steps", "guidance"):
        a, b = getattr(before, key), getattr(after, key)
        if a != b:
            if key in ("prompt", "negative_prompt"):
                out.append(f"{key.replace('_', ' ')} edited")
            else:
                out.append(f"{key} {a} → {b}")
    if before.reference_prompts != after.reference_prompts:
        out.append("reference prompts edited")
    if (before.height, before.width) != (after.height, after.width):
        out.append(f"size {before.width}×{before.height} → {after.width}×{after.height}")
    kinds_a = [c.get("kind") for c in before.controls]
    kinds_b = [c.get("kind") for c in after.controls]
    for k in kinds_b:
        if kinds_b.count(k) > kinds_a.count(k):
            out.append(f"+{k}")
    for k in kinds_a:
        if kinds_a.count(k) > kinds_b.count(k):
            out.append(f"−{k}")
    if not out and before.controls != after.controls:
        out.append("control settings edited")
    out = list(dict.fromkeys(out))
    return ", ".join(out) if out else "same settings"
