"""SoftPAG: perturbed-attention guidance on chosen attention heads, in one batched forward.

    python examples/softpag.py                                      # toy-sd3, seconds on a CPU
    python examples/softpag.py --model toy-flux
    python examples/softpag.py --heads L1H0 L2H3 L3H1 --u 0.5 --scale 3 --target identity --scope joint
    python examples/softpag.py --heads presets/my-heads.json        # a head set saved by a search
    python examples/softpag.py --model stabilityai/stable-diffusion-3.5-medium --device cuda --heads L5H0:8

It writes one strip per prompt: no perturbation guidance | diffusers-style layer PAG (all heads of one layer,
u = 1, image scope) | SoftPAG on the chosen heads — same seed, same CFG, same w. The perturbed branch runs in
the same transformer call as the CFG branches ([uncond, cond, perturbed]); see docs/softpag.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
from attnctl.controls.softpag import PRESETS_DIR
from attnctl.errors import exit_on_error
from attnctl.toyworld.models import default_call_kwargs, load_pipeline


def default_heads(model: str, sites: list[attnctl.Site]) -> str | list[str]:
    """The shipped HeadHunter preset of a toy model; elsewhere head 0 of every site in the first half of the
    model (quality heads sit early to mid, per the paper) — run `attnctl headhunt` for better ones."""
    if (PRESETS_DIR / f"{model}-headhunter.json").is_file():
        return f"{model}-headhunter.json"
    return [f"L{s.index}H0" for s in sites[: max(1, len(sites) // 2)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="a toy model (toy-sd3, toy-flux, toy-flux-dev), a pipeline "
                                                       "folder or a hub id")
    ap.add_argument("--prompt", nargs="+", default=["a red circle to the left of a blue square"])
    ap.add_argument("--heads", nargs="+", help="LxHy selectors or a preset .json (default: the toy model's shipped "
                                               "HeadHunter preset; head 0 of early sites on other models)")
    ap.add_argument("--layer", type=int, help="site index for the layer-PAG column (default: a third in)")
    ap.add_argument("--u", type=float, default=1.0, help="strength toward the target map, in [0, 1]")
    ap.add_argument("--scale", default="2.0", help="guidance weight w, a number or a schedule ('linear(3, 0)')")
    ap.add_argument("--target", default="identity", choices=["identity", "uniform", "mean_query"])
    ap.add_argument("--scope", default="joint", choices=["joint", "image"])
    ap.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/softpag")
    args = ap.parse_args()

    pipe = load_pipeline(args.model, device=args.device)  # AttnCtlSD3Pipeline / AttnCtlFluxPipeline
    call = default_call_kwargs(pipe)
    if args.steps:
        call["num_inference_steps"] = args.steps
    sites = attnctl.list_sites(pipe.transformer)
    if args.heads:
        heads = args.heads[0] if args.heads[0].endswith(".json") else args.heads
    else:
        heads = default_heads(args.model, sites)
    joint = [s for s in sites if s.kind != "sd3_image"]  # diffusers' PAG perturbs the joint attention
    layer = sites[args.layer] if args.layer is not None else joint[len(joint) // 3]

    columns = {
        "no PAG": [],
        f"layer PAG ({layer.name})": [attnctl.SoftPAG(heads=[layer.name], u=1.0, scope="image", scale=args.scale)],
        "SoftPAG": [attnctl.SoftPAG(heads=heads, u=args.u, target=args.target, scope=args.scope, scale=args.scale)],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(args.prompt):
        images = []
        for name, controls in columns.items():
            generator = torch.Generator(args.device).manual_seed(args.seed)
            images.append(pipe(prompt, controls=controls, generator=generator, **call).images[0])
            print(f"{prompt!r}: {name} done")
        strip = np.concatenate([np.asarray(im.convert("RGB")) for im in images], axis=1)
        big = Image.fromarray(strip)
        if big.height < 256:
            f = 256 // big.height
            big = big.resize((big.width * f, big.height * f), Image.NEAREST)
        big.save(out / f"softpag_{i}.png")
    pag = columns["SoftPAG"][0]
    print(f"SoftPAG heads: {pag.head_set.pairs() if pag.head_set else heads}")
    print(f"wrote {len(args.prompt)} strip(s) to {out}/ (columns: {' | '.join(columns)})")


if __name__ == "__main__":
    exit_on_error(main)
