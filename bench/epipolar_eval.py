"""Toy-world evaluation of EpipolarAttention: do jointly generated views put each object where the geometry allows?

    python bench/epipolar_eval.py                                  # toy-sd3, the rolled rig, pair prompts, 4 seeds
    python bench/epipolar_eval.py --rig rectified --model toy-flux --json flux.json
    python bench/epipolar_eval.py --configs '{}' '{"band": 0.5}' '{"falloff": "soft", "band": 0.5}'

The shapes world is flat, so the toy models know nothing of 3D; what can be measured is whether the views follow
the cameras' epipolar geometry. Two views per prompt (``num_images_per_prompt=2``, each its own noise) of a rig:

- ``rectified``: the second camera 0.3 units to the right, same orientation: the epipolar lines are the image rows;
- ``rolled``: the same baseline with the second camera rolled by ``--roll`` degrees (default 90) about its axis:
  its epipolar lines are tilted by the roll, so a plain copy of the first view breaks the geometry.

Each object (the largest of each colour) found in both views is matched by colour; its **epipolar error** is the
distance, in tokens, of its centroid in view 2 from the epipolar line of its centroid in view 1. Rows: independent
views (no control), plain extended attention (``falloff="none"``: the views see each other without geometry), then
each config. Columns: colours found in both views, mean epipolar error, the share of matched objects within one
token of their line, the share drawn with the same shape in both views, and the wall-time overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from regulation_eval import call_kwargs
from report import emit, positive_int

RIGS = ("rolled", "rectified")


def cameras(rig: str, roll: float, size: tuple[int, int]):
    from attnctl import StereoRig

    return StereoRig(baseline=0.3, roll=0.0 if rig == "rectified" else roll).cameras(size=size)


def largest_by_colour(objects) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in objects:
        if o.colour not in out or o.area > out[o.colour].area:
            out[o.colour] = o
    return out


def score_pair(views, F, size: tuple[int, int], token: float) -> dict[str, list[float]]:
    """Per matched object of one pair of views: epipolar error (tokens) and same shape; and the colours shared."""
    from attnctl.epipolar import line_distance
    from attnctl.toyworld.evaluate import detect_objects

    found = [largest_by_colour(detect_objects((np.clip(x, 0, 1) * 255).round().astype(np.uint8))) for x in views]
    both, either = set(found[0]) & set(found[1]), set(found[0]) | set(found[1])
    errors, same = [], []
    for c in sorted(both):
        a, b = found[0][c], found[1][c]
        u = torch.tensor([[a.centroid[0] * size[0], a.centroid[1] * size[1]]], dtype=torch.float64)
        w = torch.tensor([[b.centroid[0] * size[0], b.centroid[1] * size[1]]], dtype=torch.float64)
        errors.append(float(line_distance(F, u, w)) / token)
        same.append(float(a.shape == b.shape))
    return {"errors": errors, "same_shape": same, "shared": [len(both) / max(1, len(either))]}


def evaluate(model: str, rig: str, roll: float, sets: list[str], seeds: int, configs: list[dict],
             limit: int | None, steps: int | None) -> dict[str, Any]:
    from attnctl import EpipolarAttention
    from attnctl.epipolar import fundamental
    from attnctl.toyworld.models import load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    call = call_kwargs(pipe, steps)
    size = (call["width"], call["height"])
    cams = cameras(rig, roll, size)
    F = fundamental(cams[0], cams[1])
    token = size[0] / (call["width"] // (pipe.vae_scale_factor * 2))  # pixels per token (patch size 2)
    rows = {"independent": None, '{"falloff": "none"}': {"falloff": "none"},
            **{json.dumps(c, sort_keys=True): c for c in configs}}
    result: dict[str, Any] = {"model": model, "rig": rig, "roll": roll if rig == "rolled" else 0.0, "seeds": seeds,
                              "call": call, "sets": {}}
    for set_name in sets:
        items = prompt_set(set_name)[:limit]
        acc = {n: {"errors": [], "same_shape": [], "shared": [], "seconds": 0.0} for n in rows}
        for i, item in enumerate(items):
            for s in range(seeds):
                for name, cfg in rows.items():  # interleaved: the overhead compares like with like
                    controls = [] if cfg is None else [EpipolarAttention(cameras=cams, **cfg)]
                    t = time.perf_counter()
                    out = pipe(item["prompt"], num_images_per_prompt=2, controls=controls,
                               generator=torch.Generator().manual_seed(s + 1000003 * i), **call).images
                    acc[name]["seconds"] += time.perf_counter() - t
                    for k, v in score_pair(out, F, size, token).items():
                        acc[name][k] += v
        base = acc["independent"]["seconds"]
        table = {}
        for name, a in acc.items():
            e = np.array(a["errors"])
            table[name] = {
                "shared_colours": round(float(np.mean(a["shared"])), 4),
                "matched": len(e),
                "epipolar_error": round(float(e.mean()), 4) if len(e) else None,
                "epipolar_error_se": round(float(e.std(ddof=1) / math.sqrt(len(e))), 4) if len(e) > 1 else None,
                "within_one_token": round(float((e < 1).mean()), 4) if len(e) else None,
                "same_shape": round(float(np.mean(a["same_shape"])), 4) if a["same_shape"] else None,
                "overhead": round(a["seconds"] / base - 1, 4),
            }
        result["sets"][set_name] = {"items": len(items), "pairs": len(items) * seeds, "rows": table}
        print(json.dumps({set_name: table}), file=sys.stderr)
    return result


def print_table(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    for set_name, data in result["sets"].items():
        roll = f", roll {result['roll']:g}°" if result["rig"] == "rolled" else ""
        t = Table(title=f"{result['model']} · {result['rig']} rig{roll} · {set_name} · {data['pairs']} view pairs")
        t.add_column("views")
        for col in ("colours in both", "epipolar error (tokens)", "within 1 token", "same shape", "overhead"):
            t.add_column(col, justify="right")
        for name, r in data["rows"].items():
            err = "—" if r["epipolar_error"] is None else \
                f"{r['epipolar_error']:.2f} ± {r['epipolar_error_se'] or 0:.2f}"
            t.add_row(name, f"{r['shared_colours']:.3f}", err, f"{r['within_one_token'] or 0:.3f}",
                      f"{r['same_shape'] or 0:.3f}", f"{100 * r['overhead']:+.0f}%")
        Console(width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, toy-flux-dev or a pipeline folder")
    ap.add_argument("--rig", choices=RIGS, default="rolled")
    ap.add_argument("--roll", type=float, default=90.0, help="roll of the second camera, degrees (rolled rig)")
    ap.add_argument("--sets", nargs="+", default=["pair"])
    ap.add_argument("--seeds", type=positive_int, default=4)
    ap.add_argument("--configs", nargs="+", default=["{}", '{"band": 0.5}'],
                    help="EpipolarAttention settings (JSON) besides the cameras, one per row")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each set")
    ap.add_argument("--steps", type=positive_int, default=None, help="denoising steps [default: the model's]")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.rig, args.roll, args.sets, args.seeds, [json.loads(c) for c in args.configs],
                      args.limit, args.steps)
    print_table(result)
    emit(result, args.json)


if __name__ == "__main__":
    main()
