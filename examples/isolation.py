"""Isolation and reposition attention: several subjects in one image, none fused with another, each after its reference.

    python examples/isolation.py                                   # toy-sd3, a few seconds on a CPU
    python examples/isolation.py --model toy-flux --config '{"sites": "all"}'
    python examples/isolation.py --model stabilityai/stable-diffusion-3.5-medium --device cuda \\
        --subjects "corgi" "tabby cat" --references "a photo of a corgi" "a photo of a tabby cat" \\
        --prompt "a corgi and a tabby cat on a sofa"

One set of prompts, ``[reference_1 … reference_n, scene]``, generated three ways, one row each: plain (no control),
isolation alone (no subject reads another's tokens) and isolation with reposition (each subject also reads its
reference's tokens, moved into its place). The references are plain runs in every row, so the first columns
repeat; the last column is the scene. On the toy models it prints, per subject, the size and shape of the largest
object of its colour in the reference and in the scene (``bench/isolation_eval.py`` measures it over a prompt
set). See ``docs/isolation.md`` for the method and its settings.
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


def describe(image: np.ndarray, colour: str) -> str:
    from attnctl.toyworld.evaluate import detect_objects

    found = [o for o in detect_objects((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) if o.colour == colour]
    if not found:
        return "missing"
    o = max(found, key=lambda o: o.area)
    return f"{o.shape} {o.box[2] - o.box[0]:.2f} wide"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, toy-flux-dev, a folder or hub id")
    ap.add_argument("--subjects", nargs="+", default=["red circle", "blue square"])
    ap.add_argument("--references", nargs="+", default=["a small red circle", "a large blue square"],
                    help="one prompt per subject, showing it alone")
    ap.add_argument("--prompt", default="a red circle and a blue square", help="the scene with every subject")
    ap.add_argument("--config", default="{}", help="more IsolationAttention settings as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/isolation")
    args = ap.parse_args()
    if len(args.references) != len(args.subjects):
        raise SystemExit(f"{len(args.subjects)} subjects need as many --references prompts, not "
                         f"{len(args.references)}")

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    call = {**default_call_kwargs(pipe), "output_type": "np"}
    more = json.loads(args.config)
    rows = {"plain": [],
            "isolation": [attnctl.IsolationAttention(subjects=args.subjects, references=True, reposition=0.0, **more)],
            "isolation + reposition": [attnctl.IsolationAttention(subjects=args.subjects, references=True, **more)]}
    prompts = [*args.references, args.prompt]
    toy = toy_metadata(resolve_model(args.model)) is not None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = []
    for name, controls in rows.items():
        gens = [torch.Generator(args.device).manual_seed(args.seed * 3 + j) for j in range(len(prompts))]
        t = time.perf_counter()
        images = pipe(prompt=prompts, generator=gens, controls=controls, **call).images
        line = f"{name:24s} {time.perf_counter() - t:6.1f} s"
        if controls and controls[0].summary():
            line += f"   {controls[0].summary()}"
        print(line)
        if toy:
            for subject, ref in zip(args.subjects, images[:-1], strict=True):
                colour = subject.split()[0]
                print(f"    {subject:16s} reference: {describe(ref, colour):20s} scene: {describe(images[-1], colour)}")
        tiles.append(np.concatenate(list(images), axis=1))
    sheet = (np.clip(np.concatenate(tiles, axis=0), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(sheet)
    scale = max(1, 256 // (sheet.shape[0] // len(rows)))  # each image about 256 pixels high
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = out_dir / "isolation.png"
    img.save(path)
    print(f"rows: {', '.join(rows)}; columns: the references, then the scene → {path}")


if __name__ == "__main__":
    exit_on_error(main)
