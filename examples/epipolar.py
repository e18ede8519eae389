"""Epipolar attention: views generated together see each other along their epipolar lines.

    python examples/epipolar.py                                    # toy-sd3, a few seconds on a CPU
    python examples/epipolar.py --model toy-flux --roll 45 --config '{"falloff": "soft"}'
    python examples/epipolar.py --config '{"falloff": "adaptive", "strong": 32}'   # AnimateAnywhere's rule
    python examples/epipolar.py --model black-forest-labs/FLUX.1-dev --device cuda --size 1024 \\
        --prompt "a wooden chair in an empty room" --views 3 --orbit 20

It generates the views of one camera rig three ways, one row each: independent views (no control), plain extended
attention (every view sees the others' image tokens, no geometry) and ``EpipolarAttention``. The default rig is
two cameras 0.3 units apart, the second rolled by ``--roll`` degrees (its epipolar lines tilt with the roll);
``--orbit DEG`` instead puts ``--views`` cameras on a circle around the scene, DEG degrees apart. On the toy
models it prints each row's epipolar error: how far, in tokens, each object of the second view lies from the
epipolar line of the same-coloured object of the first (``bench/epipolar_eval.py`` measures it over a prompt set).
See ``docs/epipolar.md`` for the method and its settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
from attnctl.errors import exit_on_error
from attnctl.toyworld.models import default_call_kwargs, load_pipeline, resolve_model, toy_metadata


def rig(args) -> attnctl.StereoRig | attnctl.OrbitRig:
    if args.orbit is not None:  # cameras on a circle of radius 4 around the origin, looking at it
        return attnctl.OrbitRig(views=args.views, degrees=args.orbit)
    return attnctl.StereoRig(baseline=0.3, roll=args.roll)  # the second camera 0.3 to the right, rolled


def epipolar_errors(views: np.ndarray, cams: list[attnctl.Camera], token: float) -> list[float]:
    """Token distance of each colour's largest object in view 2 from the epipolar line of its match in view 1."""
    from attnctl.epipolar import fundamental, line_distance
    from attnctl.toyworld.evaluate import detect_objects

    found = []
    for im in views[:2]:
        best: dict = {}
        for o in detect_objects((np.clip(im, 0, 1) * 255).round().astype(np.uint8)):
            if o.colour not in best or o.area > best[o.colour].area:
                best[o.colour] = o
        found.append(best)
    W, H = cams[0].size
    F = fundamental(cams[0], cams[1])
    out = []
    for c in sorted(set(found[0]) & set(found[1])):
        u = torch.tensor([[found[0][c].centroid[0] * W, found[0][c].centroid[1] * H]], dtype=torch.float64)
        w = torch.tensor([[found[1][c].centroid[0] * W, found[1][c].centroid[1] * H]], dtype=torch.float64)
        out.append(float(line_distance(F, u, w)) / token)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, toy-flux-dev, a folder or hub id")
    ap.add_argument("--prompt", default="a red circle and a blue square")
    ap.add_argument("--roll", type=float, default=90.0, help="roll of the second camera (default rig), degrees")
    ap.add_argument("--orbit", type=float, default=None, help="cameras on a circle, this many degrees apart")
    ap.add_argument("--views", type=int, default=None, help="number of cameras of the --orbit rig [default: 2]")
    ap.add_argument("--config", default="{}", help="more EpipolarAttention settings as JSON")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels [default: the model's]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/epipolar")
    args = ap.parse_args()
    if args.views is not None and args.orbit is None:
        ap.error("--views sets the cameras of the --orbit rig; a stereo pair has two (add --orbit DEG)")
    args.views = 2 if args.views is None else args.views

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    call = {**default_call_kwargs(pipe), "output_type": "np"}
    if args.size:
        call.update(height=args.size, width=args.size)
    side = call.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    call.update(height=side, width=side)
    cameras = rig(args)
    cams = cameras.cameras(size=(side, side))  # the rig's cameras at this size, for scoring
    rows = {"independent": [], "extended (no geometry)": [attnctl.EpipolarAttention(rig=cameras, falloff="none")],
            "epipolar": [attnctl.EpipolarAttention(rig=cameras, **json.loads(args.config))]}
    token = side / (side // (pipe.vae_scale_factor * 2))  # pixels per token (patch size 2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = []
    for name, controls in rows.items():
        t = time.perf_counter()
        views = pipe(args.prompt, num_images_per_prompt=len(cams), controls=controls,
                     generator=torch.Generator(args.device).manual_seed(args.seed), **call).images
        took = time.perf_counter() - t
        line = f"{name:24s} {took:6.1f} s"
        if toy_metadata(resolve_model(args.model)) is not None:  # a shapes-world model: score the objects
            errs = epipolar_errors(views, cams, token)
            line += f"   epipolar error of the matched objects (tokens): {[round(e, 2) for e in errs]}"
        print(line)
        tiles.append(np.concatenate(list(views), axis=1))
    sheet = (np.clip(np.concatenate(tiles, axis=0), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(sheet)
    scale = max(1, 256 // side)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = out_dir / "epipolar.png"
    img.save(path)
    print(f"rows: {', '.join(rows)}; columns: the views → {path}")


if __name__ == "__main__":
    exit_on_error(main)
