"""Toy-world check of UnifyEdit: colour edits of real (rendered) pair scenes, editability against fidelity.

    python bench/edit_eval.py                                   # toy-sd3 and toy-flux, 48 edits each
    python bench/edit_eval.py --models toy-sd3 --items 4 --json out/edit.json
    python bench/edit_eval.py --solver midpoint                 # RF-Solver's step: inversion and edit
    python bench/edit_eval.py --methods inversion rf-inversion --rf '{"gamma": 0.5, "eta": "window(0.9, 0, 0.25)"}'
    python bench/edit_eval.py --solver midpoint --methods inversion value-sharing   # RF-Solver-Edit

Each edit takes a ground-truth render of the pair prompt set and recolours one object in the prompt
("a red circle and a blue square" → "a green circle and a blue square"). Methods, on the same inverted noise:
``inversion`` (the target prompt from the inverted noise, no latent guidance), ``sa`` (self-attention
preservation only), ``ca`` (cross-attention alignment only), ``fixed`` (both, no gates), ``unifyedit`` (both,
adaptive: the defaults), ``unifyedit+project`` (the same, with conflicting gradient components projected out),
``rf-inversion`` (RF-Inversion's controlled inversion and edit, ``--rf`` settings, default the paper's; no latent
guidance) and ``unifyedit+rf`` (both methods). The RF methods invert anew (their inversion is pulled toward noise).
``value-sharing`` (RF-Solver-Edit's feature sharing, ``--share`` settings, default ``ValueSharing()``; no latent
guidance; with ``--solver midpoint`` that is RF-Solver-Edit) and ``unifyedit+share`` (both).

- **editability**: the edited object is found in its new colour (shape and colour, the toy detector), and
  ``edit_binding`` is the whole target prompt's colour binding;
- **fidelity**: the mean absolute pixel error (0–255) against the source image outside the edited object's box,
  and ``kept``: the other object is still found in its own colour;
- **success**: both at once (the edit happened and the rest stayed), the figure of merit.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from report import emit, positive_int
from rich.console import Console
from rich.table import Table

from attnctl import FlowMatchMidpointScheduler, RFInversion, UnifyEdit, ValueSharing, edit
from attnctl.toyworld import vocab
from attnctl.toyworld.evaluate import evaluate_image
from attnctl.toyworld.models import default_call_kwargs, load_pipeline
from attnctl.toyworld.world import parse_caption, pixel_box, prompt_set, render, scene_from_item

METHODS = {
    "inversion": {"scale": 0.0},
    "sa": {"ca_weight": 0.0},
    "ca": {"sa_weight": 0.0},
    "fixed": {"balance": "fixed"},
    "unifyedit": {},
    "unifyedit+project": {"conflict": "project"},
    "rf-inversion": {"scale": 0.0, "rf": True},
    "unifyedit+rf": {"rf": True},
    "value-sharing": {"scale": 0.0, "share": True},
    "unifyedit+share": {"share": True},
}
"""UnifyEdit overrides per method; ``"rf": True`` adds RF-Inversion's controllers (``--rf`` settings), ``"share":
True`` RF-Solver-Edit's value sharing (``--share`` settings)."""


def colour_edits(n: int) -> list[dict]:
    """``n`` edits of the pair set, each object of each item in turn: the item, the index of the recoloured object,
    its new colour (cycling over the colours the item does not use), the target prompt (its article follows the new
    colour: "a red" → "an orange") and the words to give UnifyEdit (the new colour; the old one for the mask)."""
    out = []
    for item in prompt_set("pair"):
        objs = item["objects"]
        words = item["prompt"].split()
        for k, obj in enumerate(objs):
            if words.count(obj["colour"]) != 1:
                continue
            free = [c for c in vocab.COLOURS if c not in {o["colour"] for o in objs}]
            new = free[len(out) % len(free)]
            i = words.index(obj["colour"])
            changed = [*words[:i], new, *words[i + 1:]]
            if i and changed[i - 1] in ("a", "an"):
                changed[i - 1] = "an" if new[0] in "aeiou" else "a"
            target = " ".join(changed)
            out.append({"item": item, "index": k, "colour": new, "target": target,
                        "words": {"edit_words": [new], "mask_words": [obj["colour"]]},
                        "target_item": {"prompt": target, **parse_caption(target)}})
            if len(out) == n:
                return out
    return out


def score(image: np.ndarray, source: np.ndarray, e: dict, side: int) -> dict[str, float]:
    objs = e["item"]["objects"]
    k = e["index"]
    x0, y0, x1, y1 = pixel_box(tuple(e["item"]["boxes"][k]), side)
    outside = np.ones(source.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    err = np.abs(image.astype(float) - source.astype(float)).mean(-1)
    edited = {"objects": [{**objs[k], "colour": e["colour"]}]}
    other = {"objects": [objs[1 - k]]}
    full = evaluate_image(image, e["target_item"])
    done, kept = evaluate_image(image, edited)["presence"], evaluate_image(image, other)["presence"]
    return {"edited": done, "kept": kept, "success": done * kept, "edit_binding": full.get("colour_binding", 0.0),
            "outside_mae": float(err[outside].mean())}


def evaluate(model: str, n: int, methods: list[str], overrides: dict, guidance: float | None = None,
             solver: str = "euler", rf: RFInversion | None = None, share: dict | None = None) -> list[dict]:
    pipe = load_pipeline(model)
    if solver == "midpoint":  # RF-Solver's step for the inversion and both branches
        pipe.scheduler = FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)
    call = default_call_kwargs(pipe)
    side, steps = call["height"], call["num_inference_steps"]
    guidance = call.get("guidance_scale") if guidance is None else guidance
    rows = []
    per_edit: dict[str, np.ndarray] = {}
    edits = colour_edits(n)
    rf = RFInversion() if rf is None else rf
    for name in methods:
        scores, seconds = [], 0.0
        settings = dict(METHODS[name])
        method_rf = rf if settings.pop("rf", False) else None
        shares = settings.pop("share", False)
        for e in edits:
            source = render(scene_from_item(e["item"]), side)
            control = UnifyEdit(**{**e["words"], **overrides, **settings})
            method_share = ValueSharing(**(share or {})) if shares else None  # a control: one per run
            t0 = time.perf_counter()
            res = edit(pipe, source, e["item"]["prompt"], e["target"], steps, control=control,
                       guidance_scale=guidance, rf=method_rf, share=method_share)
            seconds += time.perf_counter() - t0
            scores.append(score(np.asarray(res.edited), source, e, side))
        mean = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
        row = {"model": model, "method": name, "solver": solver, "edits": len(edits), "steps": steps,
               "guidance": guidance, "rf": method_rf.to_json() if method_rf else None,
               "share": ValueSharing(**(share or {})).config.model_dump(mode="json") if shares else None,
               "seconds_per_edit": round(seconds / len(edits), 3), **mean}
        per_edit[name] = np.array([s["success"] for s in scores])
        if "inversion" in per_edit and name != "inversion":  # paired over the same edits
            diff = per_edit[name] - per_edit["inversion"]
            row["success_vs_inversion"] = round(float(diff.mean()), 4)
            row["success_vs_inversion_se"] = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4) \
                if len(diff) > 1 else None
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy-sd3", "toy-flux"])
    ap.add_argument("--items", type=positive_int, default=48, help="colour edits per model")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="UnifyEdit config overrides for every method, e.g. scale=0.3 sites=mid")
    ap.add_argument("--guidance", type=float, default=None, help="guidance_scale of the edit (default: the toy's, "
                                                                  "as default_call_kwargs gives it)")
    ap.add_argument("--solver", choices=["euler", "midpoint"], default="euler",
                    help="the step of the inversion and the edit: the pipeline's Euler, or RF-Solver's midpoint")
    ap.add_argument("--rf", default=None, metavar="JSON",
                    help="RF-Inversion's settings for the rf methods (default: the paper's, RFInversion())")
    ap.add_argument("--share", default=None, metavar="JSON",
                    help="value-sharing settings for the share methods (default: ValueSharing()'s)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = float(value) if key != "iterations" else int(value)
        except ValueError:
            overrides[key] = value
    rf = RFInversion.from_json(json.loads(args.rf)) if args.rf else RFInversion()
    share = json.loads(args.share) if args.share else {}
    share.pop("kind", None)
    ValueSharing(**share)  # bad settings fail here, before any model loads
    rows = [r for m in args.models
            for r in evaluate(m, args.items, args.methods, overrides, args.guidance, args.solver, rf, share)]
    table = Table(title="UnifyEdit: colour edits of real toy scenes")
    for col in ("model", "method", "success", "vs inversion", "edited", "kept", "binding", "outside MAE", "s / edit"):
        table.add_column(col)
    for r in rows:
        cells = [f"{r[k]:.2f}" for k in ("success", "edited", "kept", "edit_binding", "outside_mae",
                                           "seconds_per_edit")]
        vs = "" if r.get("success_vs_inversion") is None else \
            f"{r['success_vs_inversion']:+.3f} ± {r['success_vs_inversion_se'] or 0:.3f}"
        table.add_row(r["model"], r["method"], *cells[:1], vs, *cells[1:])
    Console(stderr=True, width=160).print(table)
    emit({"edit": rows, "overrides": overrides, "rf": rf.to_json(),
          "share": ValueSharing(**share).config.model_dump(mode="json")}, args.json)


if __name__ == "__main__":
    main()
