"""Toy-world evaluation of IsolationAttention: are the subjects kept apart, and drawn after their references?

    python bench/isolation_eval.py                               # toy-sd3: isolation on pair + triple, 8 seeds
    python bench/isolation_eval.py --mode reposition             # references → scene, pair set, 8 seeds
    python bench/isolation_eval.py --model toy-flux --configs '{}' '{"sites": "all"}' --json out.json

``--mode isolation``: every prompt item of the sets (one instance per object) with its objects as the subjects
("<colour> <shape>" phrases); baseline and configs on the same seeds, timed interleaved; scored by the shapes-world
evaluator (presence, colour binding, recall, accuracy, leakage), with the paired differences against the baseline.

``--mode reposition``: for every pair item, two references — "a small red circle", "a large blue square" (the sizes
alternate over the items) — and the scene without sizes, "a red circle and a blue square", generated as one set
``[reference_1, reference_2, scene]`` (each image its own noise; the references are plain runs in every row). For
each subject found both in its reference and in the scene (the largest object of its colour): whether the scene
draws it at the reference's size (small or large, by the world's box-width threshold) and with its shape, and
the scene's presence and colour binding. The baseline draws the scene with the same noise and no control, so
size agreement there is chance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from regulation_eval import METRICS, call_kwargs, run_interleaved, score_rows, to_uint8
from report import emit, positive_int

from attnctl.headhunt import NOISE_KINDS, pair_seed
from attnctl.toyworld.world import GRID, SIZE_UNITS, object_words, parse_caption, prompt_set

SIZE_THRESHOLD = (SIZE_UNITS["small"] + SIZE_UNITS["large"]) / 2 / GRID
"""Box width (fraction of the image) between the world's small and large objects."""


def single_instances(item: dict[str, Any]) -> bool:
    objects = item["objects"] if "objects" in item else parse_caption(item["prompt"])["objects"]
    return all(int(o.get("count", 1)) == 1 for o in objects) and len(object_words(item, "phrases")) == len(objects)


def evaluate_isolation(pipe, model: str, sets: list[str], seeds: int, configs: list[dict], limit: int | None,
                       call: dict, noise: str) -> dict[str, Any]:
    from attnctl import IsolationAttention

    names = ["baseline"] + [json.dumps(c, sort_keys=True) for c in configs]
    result: dict[str, Any] = {"model": model, "mode": "isolation", "seeds": seeds, "call": call, "sets": {}}
    for set_name in sets:
        items = [it for it in prompt_set(set_name) if single_instances(it)][:limit]
        images, seconds, made = run_interleaved(
            pipe, items, names, configs, seeds, 0, noise, call,
            lambda item, cfg: IsolationAttention(**{"subjects": object_words(item, "phrases"), **cfg}))
        rows, scored = score_rows(names, images, seconds, items, seeds, METRICS,
                                  ("presence", "colour_binding", "object_recall", "leakage"))
        for n in names[1:]:
            cov = [c for ctl in made[n] for c in ctl.coverage]
            rows[n]["mask_coverage"] = round(float(np.mean(cov)), 4) if cov else None
            ious = [iou for i, (ctl, item) in enumerate(zip(made[n], items, strict=True))
                    for iou in mask_ious(ctl, item, images[n][i * seeds:(i + 1) * seeds])]
            rows[n]["mask_iou"] = round(float(np.mean(ious)), 4) if ious else None
        result["sets"][set_name] = {"items": len(items), "images": len(scored), "rows": rows}
        print(json.dumps({set_name: rows}), file=sys.stderr)
    return result


def mask_ious(ctl, item: dict[str, Any], images: list[np.ndarray]) -> list[float]:
    """How well the control's last masks find the objects: per scene image and subject whose object was drawn, the
    IoU of the mask with the tokens whose centres fall in the object's box (the largest object of its colour)."""
    if ctl._masks is None:
        return []
    objects = item["objects"] if "objects" in item else parse_caption(item["prompt"])["objects"]
    targets = [t for _, t in ctl._sets]
    n_img = ctl._masks.shape[-1]
    side = int(round(n_img ** 0.5))
    centres = (torch.arange(side) + 0.5) / side
    out = []
    for row, image in zip(targets, images, strict=True):
        for i, o in enumerate(objects):
            obj = _largest(image, o["colour"])
            if obj is None:
                continue
            x0, y0, x1, y1 = obj.box
            inside = (((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :])
            m = ctl._masks[row, i].view(side, side).cpu()
            union = int((m | inside).sum())
            out.append(int((m & inside).sum()) / union if union else 0.0)
    return out


def _largest(image: np.ndarray, colour: str):
    from attnctl.toyworld.evaluate import detect_objects

    found = [o for o in detect_objects(image) if o.colour == colour]
    return max(found, key=lambda o: o.area) if found else None


def _size(obj) -> str:
    return "large" if obj.box[2] - obj.box[0] >= SIZE_THRESHOLD else "small"


def evaluate_reposition(pipe, model: str, seeds: int, configs: list[dict], limit: int | None, call: dict,
                        noise: str) -> dict[str, Any]:
    from attnctl import IsolationAttention
    from attnctl.toyworld.evaluate import evaluate_image

    items = [it for it in prompt_set("pair") if single_instances(it)][:limit]
    rows = {"baseline": None, **{json.dumps(c, sort_keys=True): c for c in configs}}
    acc = {n: {"same_size": [], "same_shape": [], "found": [], "presence": [], "colour_binding": [],
               "seconds": 0.0} for n in rows}
    for index, item in enumerate(items):
        objects = item["objects"] if "objects" in item else parse_caption(item["prompt"])["objects"]
        sizes = ("small", "large") if index % 2 == 0 else ("large", "small")
        refs = [f"a {sz} {o['colour']} {o['shape']}" for sz, o in zip(sizes, objects, strict=True)]
        scene = " and ".join(f"a {o['colour']} {o['shape']}" for o in objects)
        scene_item = {"prompt": scene, "objects": [{**o, "count": 1} for o in objects]}
        subjects = [f"{o['colour']} {o['shape']}" for o in objects]
        prompts = [p for _ in range(seeds) for p in (*refs, scene)]
        for name, cfg in rows.items():  # interleaved: the overhead compares like with like
            gens = [torch.Generator().manual_seed(pair_seed(index, s, noise) * 3 + j)
                    for s in range(seeds) for j in range(3)]
            controls = [] if cfg is None else [IsolationAttention(**{"subjects": subjects, "references": True,
                                                                     **cfg})]
            t = time.perf_counter()
            out = to_uint8(pipe(prompt=prompts, generator=gens, controls=controls, **call).images)
            acc[name]["seconds"] += time.perf_counter() - t
            for s in range(seeds):
                ref_images, target = out[3 * s:3 * s + 2], out[3 * s + 2]
                m = evaluate_image(target, scene_item)
                acc[name]["presence"].append(m["presence"])
                if "colour_binding" in m:  # defined when some named object was found
                    acc[name]["colour_binding"].append(m["colour_binding"])
                for o, ref_image in zip(objects, ref_images, strict=True):
                    a, b = _largest(ref_image, o["colour"]), _largest(target, o["colour"])
                    acc[name]["found"].append(float(a is not None and b is not None))
                    if a is not None and b is not None:
                        acc[name]["same_size"].append(float(_size(a) == _size(b)))
                        acc[name]["same_shape"].append(float(a.shape == b.shape))
    n_images = len(items) * seeds
    table = {}
    for name, a in acc.items():
        table[name] = {k: round(float(np.mean(a[k])), 4) if a[k] else None  # None: nothing to score
                       for k in ("same_size", "same_shape", "found", "presence", "colour_binding")}
        n = len(a["same_size"])
        table[name]["same_size_se"] = round(float(np.std(a["same_size"], ddof=1) / np.sqrt(n)), 4) if n > 1 else None
        table[name]["seconds_per_set"] = round(a["seconds"] / n_images, 4)
        table[name]["overhead"] = round(a["seconds"] / acc["baseline"]["seconds"] - 1.0, 4)
    print(json.dumps(table), file=sys.stderr)
    return {"model": model, "mode": "reposition", "seeds": seeds, "call": call, "items": len(items), "rows": table}


def print_table(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    if result["mode"] == "reposition":
        t = Table(title=f"{result['model']} · reposition · {result['items']} pair items × {result['seeds']} seeds")
        cols = ("found", "same_size", "same_shape", "presence", "colour_binding", "overhead")
        t.add_column("config")
        for c in cols:
            t.add_column(c, justify="right")
        for name, row in result["rows"].items():
            t.add_row(name, *("—" if row[c] is None else f"{row[c]:+.1%}" if c == "overhead" else f"{row[c]:.3f}"
                              for c in cols))
        Console(width=200).print(t)
        return
    for set_name, data in result["sets"].items():
        t = Table(title=f"{result['model']} · isolation · {set_name} · {data['items']} items × {result['seeds']} seeds")
        t.add_column("config")
        for k in (*METRICS, "overhead", "Δ presence, Δ binding (paired SE)"):
            t.add_column(k, justify="right")
        for name, row in data["rows"].items():
            p = row.get("paired", {})
            deltas = ", ".join(f"{p[k]['diff']:+.3f} ± {p[k]['se']:.3f}" for k in ("presence", "colour_binding")
                               if k in p)
            t.add_row(name, *(f"{row.get(k, float('nan')):.3f}" for k in METRICS), f"{100 * row['overhead']:+.1f}%",
                      deltas)
        Console(width=240).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, toy-flux-dev or a pipeline folder")
    ap.add_argument("--mode", choices=("isolation", "reposition"), default="isolation")
    ap.add_argument("--sets", nargs="+", default=["pair", "triple"], help="prompt sets (isolation mode)")
    ap.add_argument("--seeds", type=positive_int, default=8)
    ap.add_argument("--noise", choices=NOISE_KINDS, default="per_prompt")
    ap.add_argument("--configs", nargs="+", default=["{}"], help="IsolationAttention settings (JSON), one per row")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each set")
    ap.add_argument("--steps", type=positive_int, default=None, help="denoising steps [default: the model's]")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    call = call_kwargs(pipe, args.steps)
    configs = [json.loads(c) for c in args.configs]
    if args.mode == "isolation":
        result = evaluate_isolation(pipe, args.model, args.sets, args.seeds, configs, args.limit, call, args.noise)
    else:
        result = evaluate_reposition(pipe, args.model, args.seeds, configs, args.limit, call, args.noise)
    print_table(result)
    emit(result, args.json)


if __name__ == "__main__":
    main()
