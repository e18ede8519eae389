"""Invert a real image and draw it back: the noise from rectified-flow inversion, then the pipeline from that noise.

    python examples/invert.py                                     # toy-sd3: a rendered scene, under a second on a CPU
    python examples/invert.py --model toy-flux
    python examples/invert.py --solver midpoint                 # RF-Solver's second-order step, both ways
    python examples/invert.py --model black-forest-labs/FLUX.1-dev --device cuda --image photo.png \\
        --prompt "a photo of a corgi on a sofa" --steps 28

Writes ``invert.png``: the input, the image drawn from its inverted noise, and the same prompt from fresh noise;
prints the mean pixel error of the last two against the input. Without ``--image`` the input is a ground-truth
render of a toy-world scene (a "real" image to the toy model, which never drew it). See ``docs/inversion.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
from attnctl.errors import exit_on_error
from attnctl.imageio import read_image
from attnctl.inversion import has_guidance_embedding
from attnctl.midpoint import FlowMatchMidpointScheduler
from attnctl.toyworld.models import default_call_kwargs, load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-sd3", help="toy name, pipeline folder or hub id")
    ap.add_argument("--image", default=None, help="image to invert (default: a rendered toy-world scene)")
    ap.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--solver", choices=["euler", "midpoint"], default="euler",
                    help="euler: the pipeline's own step; midpoint: RF-Solver's (two model calls a step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out", help="output folder")
    args = ap.parse_args()
    if args.image is not None and not Path(args.image).is_file():  # before the model loads
        ap.error(f"--image {args.image!r} is not a file: pass the path of the image to invert")
    # attnctl's reader, as `attnctl edit` and examples/edit.py use: EXIF orientation applied, 16-bit scaled to 8 bits,
    # a file that is no image named as such
    given = None if args.image is None else read_image(args.image)

    pipe = load_pipeline(args.model, device=args.device)
    if args.solver == "midpoint":  # the inversion follows the pipeline's scheduler
        pipe.scheduler = FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)
    call = default_call_kwargs(pipe)
    if not has_guidance_embedding(pipe):
        call["guidance_scale"] = 1.0  # reconstruct the conditional flow that was inverted
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    steps = call.setdefault("num_inference_steps", 28)
    if given is None:
        from attnctl.toyworld.world import parse_caption, render, scene_from_item

        item = {"prompt": args.prompt, **parse_caption(args.prompt)}
        item["boxes"] = [[0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]][:len(item["objects"])]
        image = render(scene_from_item(item), call.get("height", 32))
    else:
        image = given
    call["height"], call["width"] = image.shape[:2]

    guidance = call.get("guidance_scale") if has_guidance_embedding(pipe) else None  # the flow it samples: invert it
    path = attnctl.invert(pipe, image, args.prompt, steps, guidance=guidance)
    back = np.asarray(pipe(args.prompt, latents=path[0], **call).images[0])
    fresh = np.asarray(pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0])
    for name, img in (("from inverted noise", back), ("from fresh noise", fresh)):
        print(f"{name:>20}: mean |pixel error| {np.abs(img.astype(float) - image).mean():.2f} of 255")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([image, back, fresh], axis=1)).save(out / "invert.png")
    print(f"wrote {out / 'invert.png'} (input | from inverted noise | from fresh noise)")


if __name__ == "__main__":
    exit_on_error(main)
