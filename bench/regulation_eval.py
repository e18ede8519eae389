"""Toy-world evaluation of AttentionRegulation: object presence and colour binding vs the same model and seeds.

    python bench/regulation_eval.py                                    # toy-sd3, pair + triple, 8 seeds
    python bench/regulation_eval.py --model toy-flux --json flux.json
    python bench/regulation_eval.py --configs '{}' '{"sites": "all"}' '{"steps": "window(1, 0, 0.3)"}'
    python bench/regulation_eval.py --limit 4 --seeds 2                # a quick look

For every prompt item the targets are the item's shape words (``--targets colours``: its colour words, ``both``:
both, ``phrases``: one target per object, "<colour> <shape>", whose tokens share one bias), so each prompt
regulates its own nouns, as the paper does. Baseline and every config generate the
same seeds in the same batches (one pipeline call per item and config, all seeds at once) and are timed
interleaved, so the wall-time overhead compares like with like. Images are scored by the shapes-world
evaluator (``attnctl.toyworld.evaluate``); the table shows presence (every prompted object found),
colour binding, object recall and colour / shape accuracy, the overhead per image, and what the control did at
the attention level: the loss's map terms of the plain maps and under the bias applied, averaged over its calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from report import emit, positive_int

from attnctl.headhunt import NOISE_KINDS, pair_seed
from attnctl.toyworld.world import WORD_KINDS, object_words

METRICS = ("presence", "colour_binding", "object_recall", "colour_accuracy", "shape_accuracy", "leakage")


def call_kwargs(pipe, steps: int | None, true_cfg: float | None = None) -> dict[str, Any]:
    """The model's call defaults; ``true_cfg`` (FLUX): true CFG at that scale against the empty prompt."""
    from attnctl.toyworld.models import default_call_kwargs

    call = {"height": 32, "width": 32, "num_inference_steps": 20, "max_sequence_length": 24}
    call.update(default_call_kwargs(pipe))
    if steps is not None:
        call["num_inference_steps"] = steps
    if true_cfg is not None:
        if hasattr(pipe, "text_encoder_3"):
            raise SystemExit("--true-cfg is for FLUX models; SD3 models already run CFG (guidance_scale)")
        call.update(true_cfg_scale=true_cfg, negative_prompt="")
    call["output_type"] = "np"
    return call


def generate(pipe, prompt: str, seeds: list[int], call: dict[str, Any], controls) -> tuple[list[np.ndarray], float]:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kw = dict(call)
    if "negative_prompt" in kw:
        kw["negative_prompt"] = [kw["negative_prompt"]] * len(seeds)
    t = time.perf_counter()
    out = pipe(prompt=[prompt] * len(seeds), generator=gens, controls=controls, **kw).images
    seconds = time.perf_counter() - t
    return to_uint8(out), seconds


def to_uint8(images) -> list[np.ndarray]:
    """Pipeline ``output_type="np"`` images ([0, 1] floats) as uint8 arrays."""
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]


def evaluate(model: str, sets: list[str], seeds: int, configs: list[dict], which: str, limit: int | None,
             steps: int | None, first_seed: int = 0, noise: str = "per_prompt",
             true_cfg: float | None = None) -> dict[str, Any]:
    from attnctl import AttentionRegulation
    from attnctl.toyworld.models import load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline(model)
    call = call_kwargs(pipe, steps, true_cfg)
    names = ["baseline"] + [json.dumps(c, sort_keys=True) for c in configs]
    result: dict[str, Any] = {"model": model, "seeds": seeds, "first_seed": first_seed, "noise": noise,
                              "targets": which, "call": call, "sets": {}}
    for set_name in sets:
        items = prompt_set(set_name)[:limit]
        images, seconds, made = run_interleaved(
            pipe, items, names, configs, seeds, first_seed, noise, call,
            lambda item, cfg: AttentionRegulation(**{"targets": object_words(item, which), **cfg}))
        rows, scored = score_rows(names, images, seconds, items, seeds, METRICS)
        for n in names[1:]:  # what the control achieved at the attention level: the loss's map terms
            records = [r for reg in made[n] for r in reg.records]
            rows[n]["regulated_calls_per_image"] = round(len(records) / len(items), 2)
            for key in ("plain_map_loss", "applied_map_loss"):
                rows[n][key] = round(float(np.mean([getattr(r, key) for r in records])), 4)
        result["sets"][set_name] = {"items": len(items), "images": len(scored), "rows": rows}
        print(json.dumps({set_name: rows}), file=sys.stderr)
    return result


def run_interleaved(pipe, items: list[dict], names: list[str], configs: list[dict], seeds: int, first_seed: int,
                    noise: str, call: dict[str, Any], make_control: Callable[[dict, dict], Any],
                    ) -> tuple[dict[str, list], dict[str, float], dict[str, list]]:
    """Every item's baseline and configs on the same seeds, one pipeline call each, timed interleaved so machine load
    hits them alike. ``make_control(item, config)`` builds a config's control for an item. Returns the images and the
    seconds per name, and per config the controls made (one per item, in order) for their records."""
    images: dict[str, list] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    made: dict[str, list] = {n: [] for n in names[1:]}
    for index, item in enumerate(items):
        seeds_here = [pair_seed(index, s, noise) for s in range(first_seed, first_seed + seeds)]
        for name, cfg in zip(names, [None, *configs], strict=True):
            control = make_control(item, cfg) if cfg is not None else None
            imgs, sec = generate(pipe, item["prompt"], seeds_here, call, [control] if control is not None else None)
            images[name].extend(imgs)
            seconds[name] += sec
            if control is not None:
                made[name].append(control)
    return images, seconds, made


def score_rows(names: list[str], images: dict[str, list], seconds: dict[str, float], items: list[dict], seeds: int,
               metrics: tuple[str, ...], paired_keys: tuple[str, ...] | None = None) -> tuple[dict, list]:
    """Per name, the evaluator's mean ``metrics``, the paired differences against the baseline (``paired_keys``; the
    default set when None), the seconds per image and the overhead; and the prompt item of every image."""
    from attnctl.toyworld.evaluate import evaluate_image, mean_scores

    scored = [it for it in items for _ in range(seeds)]
    per_image = {n: [evaluate_image(im, it) for im, it in zip(images[n], scored, strict=True)] for n in names}
    rows: dict[str, dict] = {}
    for n in names:
        m = mean_scores(per_image[n])
        rows[n] = {k: round(m[k], 4) for k in metrics if k in m}
        if n != "baseline":
            rows[n]["paired"] = paired_difference(per_image[n], per_image["baseline"],
                                                  *(() if paired_keys is None else (paired_keys,)))
        rows[n]["seconds_per_image"] = round(seconds[n] / len(scored), 4)
        rows[n]["overhead"] = round(seconds[n] / seconds["baseline"] - 1.0, 4)
    return rows, scored


def paired_difference(scores: list[dict[str, float]], base: list[dict[str, float]],
                      keys: tuple[str, ...] = ("presence", "colour_binding", "object_recall", "shape_accuracy"),
                      ) -> dict[str, dict[str, float]]:
    """Per metric, the mean over images of (config − baseline) on the same prompt and seed, with its standard
    error (std of the differences / √n): the comparison the shared seeds make possible, tighter than comparing
    two means."""
    out = {}
    for key in keys:
        d = np.array([a[key] - b[key] for a, b in zip(scores, base, strict=True) if key in a and key in b])
        if len(d) > 1:
            out[key] = {"diff": round(float(d.mean()), 4), "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4),
                        "n": len(d)}
    return out


def print_table(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    for set_name, data in result["sets"].items():
        t = Table(title=f"{result['model']} · {set_name} · {data['items']} items × {result['seeds']} seeds · "
                        f"targets: {result['targets']}")
        t.add_column("config")
        for k in (*METRICS, "s/image", "overhead", "map loss: plain → applied", "Δ presence, Δ binding (paired SE)"):
            t.add_column(k, justify="right")
        for name, row in data["rows"].items():
            objective = (f"{row['plain_map_loss']:.3f} → {row['applied_map_loss']:.3f}"
                         if "plain_map_loss" in row else "")
            paired = row.get("paired", {})
            deltas = ", ".join(f"{paired[k]['diff']:+.3f} ± {paired[k]['se']:.3f}"
                               for k in ("presence", "colour_binding") if k in paired)
            t.add_row(name, *(f"{row.get(k, float('nan')):.3f}" for k in METRICS), f"{row['seconds_per_image']:.3f}",
                      f"{100 * row['overhead']:+.1f}%", objective, deltas)
        Console(width=260).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux or a pipeline folder")
    ap.add_argument("--sets", nargs="+", default=["pair", "triple"])
    ap.add_argument("--seeds", type=positive_int, default=8)
    ap.add_argument("--noise", choices=NOISE_KINDS, default="per_prompt",
                    help="per_prompt: item i's seed s is generator seed s + 1000003·i, so no two images share their "
                         "initial noise; shared: every item uses the same seeds (how the first tables were made)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed … first-seed+seeds−1 (screen settings on other seeds than you report)")
    ap.add_argument("--configs", nargs="+", default=["{}"], help="AttentionRegulation settings (JSON), one per run")
    ap.add_argument("--targets", choices=WORD_KINDS, default="shapes")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each set")
    ap.add_argument("--steps", type=positive_int, default=None, help="denoising steps [default: the model's]")
    ap.add_argument("--true-cfg", type=float, default=None,
                    help="FLUX: true CFG at this scale against the empty prompt (the control acts on the "
                         "conditional call only)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [json.loads(c) for c in args.configs]
    result = evaluate(args.model, args.sets, args.seeds, configs, args.targets, args.limit, args.steps,
                      args.first_seed, args.noise, args.true_cfg)
    print_table(result)
    emit(result, args.json)


if __name__ == "__main__":
    main()
