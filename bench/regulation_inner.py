"""Time of AttentionRegulation's inner optimisation alone, and what denormal bump tails would cost it.

    python bench/regulation_inner.py                 # toy shapes and SD3.5-large / FLUX.1-dev 512² and 1024²
    python bench/regulation_inner.py --json inner.json

One regulated call's inner loop (``descend``: the paper's 20 gradient steps plus the last loss) on random row
terms of real shapes: ``(rows, N_img, heads, words)``. Two bases, timed interleaved in one process:

- ``shipped``: ``gaussian_basis`` as the control uses it (tails below 1e-20 set to zero);
- ``denormal tails``: the same bumps with their far tails left as computed (denormal floats where they underflow).

The ratio ``denormal / shipped`` is the figure: it is why the basis has a floor. ``tail_denormals`` counts the
basis entries that are denormal without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, positive_int  # noqa: E402

# name: (rows of the batch regulated, image grid side, heads)
SHAPES = {
    "toy (8 images)": (8, 8, 4),
    "SD3.5-large 512²": (1, 32, 38),
    "FLUX.1-dev 512²": (1, 32, 24),
    "SD3.5-large 1024²": (1, 64, 38),
    "FLUX.1-dev 1024²": (1, 64, 24),
}


def inputs(rows: int, side: int, heads: int, words: int = 2):
    from attnctl.controls.regulation import row_terms

    g = torch.Generator().manual_seed(0)
    rel = torch.log_softmax(torch.randn(rows, side * side, heads, 40, generator=g) * 2, -1)
    terms = row_terms(rel[..., : 2 * words], [t for t in range(words) for _ in range(2)], words,
                      rel[..., 2 * words : 2 * words + 2], torch.logsumexp(rel[..., 2 * words + 2 :], -1), "text")
    w0 = torch.rand(rows, 1, words, 49, generator=g)
    return terms, w0


def time_shape(name: str, repeats: int) -> dict:
    from attnctl.controls.regulation import AttentionRegulation, descend, gaussian_basis

    rows, side, heads = SHAPES[name]
    terms, w0 = inputs(rows, side, heads)
    cfg = AttentionRegulation(targets=["a", "b"]).config
    raw = gaussian_basis(side, side, floor=0.0)
    bases = {"shipped": gaussian_basis(side, side), "denormal tails": raw}
    for basis in bases.values():  # warm-up
        descend(terms, w0, basis, cfg)
    times: dict[str, list[float]] = {k: [] for k in bases}
    for _ in range(repeats):
        for k, basis in bases.items():
            t = time.perf_counter()
            descend(terms, w0, basis, cfg)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tiny = torch.finfo(torch.float32).tiny
    return {"shape": name, "rows": rows, "image_tokens": side * side, "heads": heads,
            "iterations": cfg.iterations, "seconds": {k: round(v, 5) for k, v in med.items()},
            "denormal_over_shipped": round(med["denormal tails"] / med["shipped"], 2),
            "tail_denormals": int(((raw > 0) & (raw < tiny)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=positive_int, default=7)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [time_shape(s, args.repeats) for s in args.shapes]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="AttentionRegulation inner loop (20 steps + last loss), median of interleaved repeats")
        for col in ("shape", "image tokens", "heads", "shipped ms", "denormal tails ms", "denormal / shipped",
                    "denormal entries"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(r["shape"], str(r["image_tokens"]), str(r["heads"]), f"{1e3 * r['seconds']['shipped']:.1f}",
                      f"{1e3 * r['seconds']['denormal tails']:.1f}", f"{r['denormal_over_shipped']:.2f}",
                      str(r["tail_denormals"]))
        Console(width=160).print(t)
    except ImportError:
        pass
    emit({"bench": "regulation_inner", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "rows": rows}, args.json)


if __name__ == "__main__":
    main()
