"""Sample sheet of a toy model (not a benchmark): the images behind docs/img/samples-<model>.png.

    python bench/toy_samples.py --model toy-flux-dev --out docs/img/samples-toy-flux-dev.png

Rows: the prompt sets single, pair, triple, relation, count and position; columns: their first ``--items`` prompts,
each with seed 0 and the model's default call, scaled up ``--scale`` times without smoothing. Also prints the
evaluator's presence per row, so the sheet can be read against the numbers.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import positive_int

SETS = ("single", "pair", "triple", "relation", "count", "position")


def main() -> None:
    from attnctl.io import atomic_write_bytes
    from attnctl.toyworld.evaluate import evaluate_set
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--items", type=positive_int, default=12)
    ap.add_argument("--scale", type=positive_int, default=4)
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    call = default_call_kwargs(pipe)
    rows = []
    for name in SETS:
        items = prompt_set(name)[: args.items]
        out = pipe(prompt=[it["prompt"] for it in items], generator=[torch.Generator().manual_seed(0) for _ in items],
                   **call).images
        images = [np.asarray(im.convert("RGB")) for im in out]
        print(f"{name:9s} presence {evaluate_set(images, items)['presence']:.3f}")
        gap = np.full((images[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([x for im in images for x in (im, gap)][:-1], axis=1))
    band = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    sheet = np.concatenate([x for r in rows for x in (r, band)][:-1], axis=0)
    sheet = sheet.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    png = io.BytesIO()
    Image.fromarray(sheet).save(png, format="PNG")
    atomic_write_bytes(args.out, png.getvalue())  # a sheet is never half written
    print(args.out)


if __name__ == "__main__":
    main()
