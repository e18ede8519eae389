"""Seconds per image of the shipped toy models: 20 steps, one 32×32 image, their default call settings.

    python bench/toy_speed.py [--repeats 5] [--threads 2] [--json out.json]

Prints best and median over the repeats (after one warm-up) for toy-sd3 (CFG, as it samples by default),
toy-flux (no unconditional branch), toy-flux with true CFG and toy-flux-dev (guidance 5 through its guidance
embedding, one forward per step), and the shapes world's batch maker (64 rendered scenes with captions, what one
training step draws). On a shared machine the best figure is the one closest to the machine's real speed; both are
printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import emit, positive_int

from attnctl.toyworld.models import default_call_kwargs, load_pipeline
from attnctl.toyworld.world import make_batch


def seconds_per_image(name: str, repeats: int, extra: dict) -> list[float]:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    kw = {**default_call_kwargs(pipe), **extra}
    pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)  # warm-up
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        pipe("a red circle", generator=torch.Generator().manual_seed(i), **kw)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, name, extra in [("toy-sd3 (CFG)", "toy-sd3", {}), ("toy-flux", "toy-flux", {}),
                               ("toy-flux (true CFG 5)", "toy-flux", {"true_cfg_scale": 5.0, "negative_prompt": ""}),
                               ("toy-flux-dev (guidance 5)", "toy-flux-dev", {})]:
        t = seconds_per_image(name, args.repeats, extra)
        rows.append({"model": label, "best_s": round(min(t), 3), "median_s": round(statistics.median(t), 3)})
        print(f"{label:24s} best {min(t):.3f} s   median {statistics.median(t):.3f} s")
    make_batch(0, 64)  # warm-up
    t = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        make_batch(seed, 64)
        t.append(time.perf_counter() - start)
    rows.append({"model": "world batch (64 scenes)", "best_s": round(min(t), 4),
                 "median_s": round(statistics.median(t), 4)})
    print(f"{'world batch (64 scenes)':24s} best {min(t):.4f} s   median {statistics.median(t):.4f} s")
    result = {"bench": "toy_speed", "steps": 20, "size": "32x32", "threads": args.threads, "rows": rows}
    emit(result, args.json)


if __name__ == "__main__":
    main()
