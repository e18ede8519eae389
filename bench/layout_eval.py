"""Toy-world evaluation of LayoutGuidance: do the objects land in the boxes asked for, and at what cost?

    python bench/layout_eval.py                                          # toy-sd3, pair + triple, 8 seeds
    python bench/layout_eval.py --model toy-flux --json flux.json
    python bench/layout_eval.py --configs '{}' '{"loss": "csg"}' '{"scale": "window(0.6, 0, 0.5)"}'
    python bench/layout_eval.py --limit 4 --seeds 2                      # a quick look

Every prompt item of the shapes world carries a layout (one box per object); the control gets those boxes keyed
by each object's words (``--words colours``: its colour word, ``shapes``: its shape word, ``phrases``: "<colour>
<shape>"). Baseline and every config generate the same seeds, one pipeline call per item and config, timed
interleaved. The evaluator (``attnctl.toyworld.evaluate``) gives the box IoU of the detected objects with the
requested boxes (a missing object counts 0), presence, colour binding, recall, shape accuracy and sharpness; the
table adds the paired differences against the baseline on the same seeds and the wall-time overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
from regulation_eval import call_kwargs, run_interleaved, score_rows
from report import emit, positive_int

from attnctl.errors import AttnCtlError
from attnctl.headhunt import NOISE_KINDS
from attnctl.toyworld.world import BOX_KEYS, object_boxes

METRICS = ("box_iou", "presence", "colour_binding", "object_recall", "shape_accuracy", "sharpness")


def usable(item: dict[str, Any], words: str) -> bool:
    """Whether the item's boxes can be keyed by ``words`` (one instance per object, keys that tell them apart)."""
    try:
        object_boxes(item, words)
    except AttnCtlError:
        return False
    return True


def evaluate(model: str, sets: list[str], seeds: int, configs: list[dict], words: str, limit: int | None,
             steps: int | None, first_seed: int = 0, noise: str = "per_prompt") -> dict[str, Any]:
    from attnctl import LayoutGuidance
    from attnctl.toyworld.models import load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline(model)
    call = call_kwargs(pipe, steps)
    names = ["baseline"] + [json.dumps(c, sort_keys=True) for c in configs]
    result: dict[str, Any] = {"model": model, "seeds": seeds, "first_seed": first_seed, "noise": noise,
                              "words": words, "call": call, "sets": {}}
    for set_name in sets:
        items = [it for it in prompt_set(set_name) if usable(it, words)][:limit]
        images, seconds, made = run_interleaved(
            pipe, items, names, configs, seeds, first_seed, noise, call,
            lambda item, cfg: LayoutGuidance(**{"boxes": object_boxes(item, words), **cfg}))
        rows, scored = score_rows(names, images, seconds, items, seeds, METRICS, METRICS[:5])
        for n in names[1:]:  # the layout loss at the first and the last guided step, averaged over the items
            losses = [(c.history[0][1], c.history[-1][1]) for c in made[n] if c.history]
            if losses:
                rows[n]["loss_first_step"] = round(float(np.mean([a for a, _ in losses])), 4)
                rows[n]["loss_last_step"] = round(float(np.mean([b for _, b in losses])), 4)
        result["sets"][set_name] = {"items": len(items), "images": len(scored), "rows": rows}
        print(json.dumps({set_name: rows}), file=sys.stderr)
    return result


def print_table(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    for set_name, data in result["sets"].items():
        t = Table(title=f"{result['model']} · {set_name} · {data['items']} items × {result['seeds']} seeds · "
                        f"boxes keyed by {result['words']}")
        t.add_column("config")
        for k in (*METRICS, "overhead", "loss: first → last guided step", "Δ box IoU, Δ presence (paired SE)"):
            t.add_column(k, justify="right")
        for name, row in data["rows"].items():
            loss = f"{row['loss_first_step']:.3f} → {row['loss_last_step']:.3f}" if "loss_first_step" in row else ""
            p = row.get("paired", {})
            deltas = ", ".join(f"{p[k]['diff']:+.3f} ± {p[k]['se']:.3f}" for k in ("box_iou", "presence") if k in p)
            t.add_row(name, *(f"{row.get(k, float('nan')):.3f}" for k in METRICS), f"{100 * row['overhead']:+.1f}%",
                      loss, deltas)
        Console(width=240).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux or a pipeline folder")
    ap.add_argument("--sets", nargs="+", default=["pair", "triple"])
    ap.add_argument("--seeds", type=positive_int, default=8)
    ap.add_argument("--noise", choices=NOISE_KINDS, default="per_prompt",
                    help="per_prompt: item i's seed s is generator seed s + 1000003·i (no two images share noise)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed+seeds−1")
    ap.add_argument("--configs", nargs="+", default=["{}"], help="LayoutGuidance settings (JSON), one per run")
    ap.add_argument("--words", choices=BOX_KEYS, default="colours", help="what keys each object's box")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each set")
    ap.add_argument("--steps", type=positive_int, default=None, help="denoising steps [default: the model's]")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [json.loads(c) for c in args.configs]
    result = evaluate(args.model, args.sets, args.seeds, configs, args.words, args.limit, args.steps,
                      args.first_seed, args.noise)
    print_table(result)
    emit(result, args.json)


if __name__ == "__main__":
    main()
