"""The design card's usage: build attnctl processors and install them with the public diffusers API.

    python examples/set_attn_processor.py                          # toy-sd3, runs in seconds on a CPU
    python examples/set_attn_processor.py --model toy-flux
    python examples/set_attn_processor.py --model stabilityai/stable-diffusion-3.5-medium --device cuda
    python examples/set_attn_processor.py --softpag toy-sd3-headhunter.json   # and SoftPAG in the same run

It generates one image with a plain diffusers pipeline whose attention processors were replaced by
attnctl's (``pipe.transformer.set_attn_processor(ctl.processors())``), with an ``AttentionProbe`` that
collects where each named word's attention lands, and writes the image plus one heatmap per word. With
``--softpag`` the controller also runs SoftPAG's perturbed branch on these heads. ``ctl.restore()`` puts the stock
processors back and takes the controller's hooks and wrappers off.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
from attnctl.errors import exit_on_error
from attnctl.toyworld.models import default_call_kwargs, load_pipeline


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """Red heat over a greyed copy of the image."""
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32) * 0.6
    h = heat.cpu().numpy()[..., None]
    red = np.concatenate([np.full_like(h, 255.0), np.zeros_like(h), np.zeros_like(h)], -1)
    return Image.fromarray((grey * (1 - h) + red * h).clip(0, 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3")
    ap.add_argument("--prompt", default="a red circle to the left of a blue square")
    ap.add_argument("--words", nargs="+", default=["circle", "square"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--softpag", nargs="+", metavar="HEADS",
                    help="also SoftPAG on these heads: a preset (*.json) or selectors such as L4H2")
    ap.add_argument("--softpag-scale", type=float, default=2.0, help="its guidance weight w")
    ap.add_argument("--out", default="out/set_attn_processor")
    args = ap.parse_args()

    pipe = load_pipeline(args.model, device=args.device, controlled=False)  # a plain diffusers pipeline
    probe = attnctl.AttentionProbe(words=args.words)
    controls = [probe]
    if args.softpag:
        heads = args.softpag[0] if len(args.softpag) == 1 else args.softpag
        controls.append(attnctl.SoftPAG(heads=heads, scale=args.softpag_scale))
    ctl = attnctl.Controller(pipe, controls)
    pipe.transformer.set_attn_processor(ctl.processors())  # the public diffusers API
    try:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        image = pipe(args.prompt, generator=generator, **default_call_kwargs(pipe)).images[0]
    finally:
        ctl.restore()  # the processors ctl.processors() replaced, back; the hooks and wrappers, off

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zoom = max(1, 256 // max(image.width, image.height))  # a toy's 32 px image to 256 px; a real model's as it is
    big = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    big.save(out / "image.png")
    for word in args.words:
        heat = probe.heatmap(word, (big.height, big.width))
        overlay(big, heat).save(out / f"attention_{word}.png")
    print(f"wrote {out}/image.png and {len(args.words)} heatmaps ({', '.join(args.words)})")


if __name__ == "__main__":
    exit_on_error(main)
