"""The toy models' baselines: every prompt set × model of the README / docs/toyworld.md table.

    python bench/toy_baselines.py                     # 8 seeds per prompt, prints a markdown table and JSON
    python bench/toy_baselines.py --seeds 2 --json out/toy_baselines.json

The same generation as ``attnctl eval`` (the model's default call, seeds 0..N-1, 8 images per call), plus
toy-flux with its offered true CFG (``true_cfg_scale=5`` and an empty negative prompt), which ``attnctl eval``
does not expose, and toy-flux-dev (its default: guidance 5 through the guidance embedding, no unconditional
branch). Images are scored by the shapes-world evaluator.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from report import emit, positive_int

ROWS = [("single", "toy-sd3", None), ("single", "toy-flux", None), ("single", "toy-flux", 5.0),
        ("single", "toy-flux-dev", None),
        ("pair", "toy-sd3", None), ("pair", "toy-flux", None), ("pair", "toy-flux-dev", None),
        ("relation", "toy-sd3", None), ("relation", "toy-flux", None), ("relation", "toy-flux-dev", None),
        ("count", "toy-sd3", None), ("count", "toy-flux", None), ("count", "toy-flux-dev", None)]
COLUMNS = ("presence", "colour_accuracy", "shape_accuracy", "colour_binding", "count_accuracy", "relation_accuracy")


def evaluate(model: str, prompts: str, seeds: int, true_cfg: float | None, pipes: dict) -> dict:
    from attnctl.toyworld.evaluate import evaluate_set
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = pipes.setdefault(model, load_pipeline(model))
    call = default_call_kwargs(pipe)
    if true_cfg is not None:
        call.update(true_cfg_scale=true_cfg, negative_prompt="")
    items = prompt_set(prompts)
    jobs = [(i, s) for i in range(len(items)) for s in range(seeds)]
    images = []
    for k in range(0, len(jobs), 8):
        chunk = jobs[k:k + 8]
        kw = dict(call, prompt=[items[i]["prompt"] for i, _ in chunk],
                  generator=[torch.Generator().manual_seed(s) for _, s in chunk])
        if true_cfg is not None:
            kw["negative_prompt"] = [""] * len(chunk)
        images += [np.asarray(im.convert("RGB")) for im in pipe(**kw).images]
    return evaluate_set(images, [items[i] for i, _ in jobs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=positive_int, default=8)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipes: dict = {}
    rows = []
    print("| set | model | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for prompts, model, true_cfg in ROWS:
        metrics = evaluate(model, prompts, args.seeds, true_cfg, pipes)
        label = model + (f" (true CFG {true_cfg:g})" if true_cfg else "")
        rows.append({"set": prompts, "model": label, "metrics": metrics})
        cells = [f"{metrics[c]:.3f}" if c in metrics else "" for c in COLUMNS]
        print(f"| {prompts} | {label} | " + " | ".join(cells) + " |", flush=True)
    emit({"bench": "toy_baselines", "seeds": args.seeds, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
