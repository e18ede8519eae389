"""Edit a real image by a text change with UnifyEdit: invert it, replay it, and steer a target branch.

    python examples/edit.py                                       # toy-sd3: recolour a rendered scene, seconds on a CPU
    python examples/edit.py --model toy-flux
    python examples/edit.py --rf                                  # and RF-Inversion (the paper's settings), alone
    python examples/edit.py --rf-settings '{"gamma": 0.5, "eta": "window(0.9, 0, 0.4)"}'
    python examples/edit.py --share                               # and RF-Solver-Edit's value sharing, alone
    python examples/edit.py --share-settings '{"weight": "window(1, 0, 0.3)", "tokens": "image"}'
    python examples/edit.py --model stabilityai/stable-diffusion-3.5-medium --device cuda --image cat.png \\
        --source "a photo of a cat on a sofa" --target "a photo of a tiger on a sofa" --steps 28

Writes ``edit.png``: the input, the target prompt drawn from the inverted noise without latent guidance, and the
UnifyEdit result (with ``--rf``, RF-Inversion's result after them; with ``--share``, value sharing's, from the same
inversion as the first two); on the toys it also prints what the toy detector finds in each. Without ``--image`` the
input is a ground-truth render of the source caption (a "real" image to the toy model, which never drew it). See
``docs/editing.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import attnctl
from attnctl.cli import is_toy_pipeline
from attnctl.errors import exit_on_error
from attnctl.imageio import read_image
from attnctl.toyworld.models import default_call_kwargs, load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-sd3", help="toy name, pipeline folder or hub id")
    ap.add_argument("--image", default=None, help="image to edit (default: a rendered toy-world scene)")
    ap.add_argument("--source", default="a red circle on the left and a blue square on the right",
                    help="what the image shows")
    ap.add_argument("--target", default="a green circle on the left and a blue square on the right",
                    help="what it should show")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the toy's; else the "
                                                                            "pipeline's)")
    ap.add_argument("--scale", default=None, help="UnifyEdit step-size schedule, e.g. 'window(0.3, 0, 0.5)'")
    ap.add_argument("--rf", action="store_true", help="also edit with RF-Inversion's controllers (no latent guidance)")
    ap.add_argument("--rf-settings", default=None, help="RF-Inversion's settings as JSON (implies --rf), e.g. "
                                                        "'{\"gamma\": 0.5, \"eta\": \"window(0.9, 0, 0.25)\"}'")
    ap.add_argument("--share", action="store_true", help="also edit with RF-Solver-Edit's value sharing (no latent "
                                                         "guidance)")
    ap.add_argument("--share-settings", default=None, help="value sharing's settings as JSON (implies --share), "
                                                           "e.g. '{\"weight\": \"window(1, 0, 0.15)\", "
                                                           "\"tokens\": \"image\"}'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out", help="output folder")
    args = ap.parse_args()
    share = None
    if args.share or args.share_settings is not None:  # read before the model loads: bad settings fail at once
        try:
            share_json = {} if args.share_settings is None else json.loads(args.share_settings)
        except json.JSONDecodeError as e:
            ap.error(f"--share-settings is not valid JSON ({e.msg}): give an object, e.g. '{{\"tokens\": \"image\"}}'")
        share = attnctl.ValueSharing.from_json(share_json)
    rf = None
    if args.rf or args.rf_settings is not None:  # the same for RF-Inversion's settings
        try:
            rf_json = {} if args.rf_settings is None else json.loads(args.rf_settings)
        except json.JSONDecodeError as e:
            ap.error(f"--rf-settings is not valid JSON ({e.msg}): give an object, e.g. '{{\"gamma\": 0.5}}'")
        rf = attnctl.RFInversion.from_json(rf_json)
    if args.image is not None and not Path(args.image).is_file():
        ap.error(f"--image {args.image!r} is not a file: pass the path of the image to edit")
    given = None if args.image is None else read_image(args.image)  # a file that is no image fails at once too

    pipe = load_pipeline(args.model, device=args.device)
    steps = args.steps or default_call_kwargs(pipe).get("num_inference_steps", 28)
    guidance = args.guidance if args.guidance is not None else default_call_kwargs(pipe).get("guidance_scale")
    toy = given is None
    if toy and not is_toy_pipeline(pipe):  # the rendered scene and the shapes-world scores are the toys'
        ap.error("a real model edits a real image: pass --image (a file), with --source describing it")
    if toy:
        from attnctl.toyworld.world import parse_caption, render, scene_from_item

        item = {"prompt": args.source, **parse_caption(args.source)}
        item["boxes"] = [[0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]][:len(item["objects"])]
        image = render(scene_from_item(item), default_call_kwargs(pipe).get("height", 32))
    else:
        image = given

    settings = {} if args.scale is None else {"scale": args.scale}
    plain = attnctl.edit(pipe, image, args.source, args.target, steps, control=attnctl.UnifyEdit(scale=0.0),
                         guidance_scale=guidance)
    control = attnctl.UnifyEdit(**settings)
    result = attnctl.edit(pipe, image, args.source, args.target, steps, control=control, guidance_scale=guidance,
                          path=plain.path)  # the same inversion
    print(control.summary())
    shown = [("inverted noise, target prompt", np.asarray(plain.edited)), ("UnifyEdit", np.asarray(result.edited))]
    if rf is not None:  # its own inversion: RF-Inversion pulls it toward a noise sample
        rf_result = attnctl.edit(pipe, image, args.source, args.target, steps, control=attnctl.UnifyEdit(scale=0.0),
                                 guidance_scale=guidance, rf=rf)
        shown.append(("RF-Inversion", np.asarray(rf_result.edited)))
    if share is not None:  # from the plain inversion: value sharing acts in the edit only
        share_result = attnctl.edit(pipe, image, args.source, args.target, steps,
                                    control=attnctl.UnifyEdit(scale=0.0), guidance_scale=guidance, path=plain.path,
                                    share=share)
        print(share.summary() or "value sharing: weight 0 at every step, nothing shared")
        shown.append(("value sharing", np.asarray(share_result.edited)))
    if toy:
        from attnctl.toyworld.evaluate import evaluate_image
        from attnctl.toyworld.world import parse_caption

        target = {"prompt": args.target, **parse_caption(args.target)}
        for name, img in shown:
            found = evaluate_image(img, target)
            print(f"{name:>30}: target objects present {found['presence']:.0f}, colour binding "
                  f"{found.get('colour_binding', 0.0):.2f}, mean |pixel change| "
                  f"{np.abs(img.astype(float) - image).mean():.2f} of 255")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([image] + [img for _, img in shown], axis=1)).save(out / "edit.png")
    print(f"wrote {out / 'edit.png'}")


if __name__ == "__main__":
    exit_on_error(main)
