"""Benchmark of ``attnctl batch``: images per second for a 64-item toy batch, 1 process vs 2 processes.

Both runs happen in the same invocation, on the same batch file, each into a fresh output folder, through
the real command (``python -m attnctl batch FILE --processes N``), so the numbers include what a user
waits for. Two rates are reported per run:

- ``wall``: images / wall-clock seconds of the whole command (imports, model load, rendezvous included);
- ``steady``: images / seconds from the first image started to the last one finished (from the manifest:
  ``time`` and ``seconds`` of each record), i.e. the generation throughput once the workers are up.

Model: ``toy-sd3`` when it is installed (``attnctl/toyworld/models/toy-sd3``), else a tiny random SD3 pipeline
folder (``attnctl.testing``), which the report names.

    python bench/batch.py                       # 64 items, processes 1 and 2
    python bench/batch.py --items 16 --processes 1:1,1,2 --json /tmp/batch.json   # N:T = N processes, T threads
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit, positive_int

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def make_batch(n: int, steps: int | None) -> dict:
    items = []
    for i in range(n):
        prompt = f"a {COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]} " \
                 f"{PLACES[(i // 3) % len(PLACES)]}"
        items.append({"id": f"b{i:03d}", "prompt": prompt, "seed": i})
    data: dict = {"version": 1, "description": "bench/batch.py", "items": items}
    if steps is not None:
        data["defaults"] = {"steps": steps}
    return data


def pick_model(work: Path) -> tuple[str, str]:
    """(model argument, label): toy-sd3 when installed, else a tiny pipeline folder."""
    from attnctl.toyworld.models import TOY_MODELS

    if (TOY_MODELS["toy-sd3"] / "model_index.json").is_file():
        return "toy-sd3", "toy-sd3 (trained toy model)"
    from attnctl.testing import save_pipeline, tiny_sd3_pipeline

    folder = save_pipeline(tiny_sd3_pipeline("sd3"), work / "tiny-sd3")
    return str(folder), "tiny-sd3 (random tiny SD3 pipeline folder; toy-sd3 not installed yet)"


def run_once(batch: Path, out: Path, model: str, processes: int, threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "attnctl", "batch", str(batch), "--out", str(out), "--model", model,
           "--processes", str(processes)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    from attnctl.batch import read_manifest

    records = [r for r in read_manifest(out).values() if r["status"] == "done"]
    first = min(r["time"] - r["seconds"] for r in records)
    last = max(r["time"] for r in records)
    n = len(records)
    cpus = os.cpu_count() or 1
    return {"processes": processes, "threads_per_process": threads or max(1, cpus // processes), "images": n,
            "wall_seconds": round(wall, 3),
            "images_per_second_wall": round(n / wall, 3),
            "generation_seconds": round(last - first, 3),
            "images_per_second_steady": round(n / (last - first), 3) if last > first else None,
            "seconds_per_image_in_worker": round(sum(r["seconds"] for r in records) / n, 4)}


def process_runs(text: str) -> list[tuple[int, int | None]]:
    """argparse type of ``--processes``: comma-separated ``N`` or ``N:T`` → ``[(N, T or None), ...]``."""
    runs = []
    for spec in text.split(","):
        n, colon, t = spec.partition(":")
        try:
            runs.append((positive_int(n), positive_int(t) if colon else None))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{spec!r}: {e} (a run is N processes or N:T, T threads each)") from None
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=positive_int, default=64)
    parser.add_argument("--processes", type=process_runs, default="1,2",
                        help="comma-separated runs: N processes, or N:T for N processes of T torch threads each "
                             "(default threads: cores / N)")
    parser.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--model", default=None, help="default: toy-sd3 if installed, else a tiny pipeline")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="attnctl-bench-batch-") as tmp:
        work = Path(tmp)
        model, label = (args.model, args.model) if args.model else pick_model(work)
        batch = work / "bench.json"
        batch.write_text(json.dumps(make_batch(args.items, args.steps)))
        runs = []
        for i, (n, t) in enumerate(args.processes):
            runs.append(run_once(batch, work / f"out-{i}", model, n, t))
    result = {
        "benchmark": "attnctl batch",
        "model": label,
        "items": args.items,
        "steps": args.steps or "model default",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "runs": runs,
    }
    print(f"attnctl batch · {args.items} items · {label} · {os.cpu_count()} CPUs")
    head = (f"{'processes':>9} {'threads':>7} {'images':>6} {'wall s':>8} {'img/s wall':>10} {'gen s':>8} "
            f"{'img/s steady':>12}")
    print(head)
    print("-" * len(head))
    for r in runs:
        steady = "-" if r["images_per_second_steady"] is None else f"{r['images_per_second_steady']:.2f}"
        print(f"{r['processes']:>9} {r['threads_per_process']:>7} {r['images']:>6} {r['wall_seconds']:>8.1f} "
              f"{r['images_per_second_wall']:>10.2f} "
              f"{r['generation_seconds']:>8.1f} {steady:>12}")
    emit(result, args.json, indent=2)


if __name__ == "__main__":
    main()
