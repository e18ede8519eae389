"""Toy-world check of rectified-flow inversion: does the inverted noise give the image back?

    python bench/inversion_eval.py                                  # toy-sd3, toy-flux, toy-flux-dev; 12 pair scenes
    python bench/inversion_eval.py --models toy-sd3 --items 4 --json out/inversion.json

For each ground-truth render of the pair prompt set (a "real" image: drawn, not generated), with its caption as the
prompt and the toy's default steps: the mean absolute pixel error (0–255) of the image decoded from its own latent
(the autoencoder's floor), of the pipeline's output from the inverted noise (no guidance), and of the output from
fresh noise (what the same prompt draws without inversion). The ratio inverted / fresh is the figure.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from report import emit
from rich.console import Console
from rich.table import Table

from attnctl.inversion import encode_image, has_guidance_embedding, invert
from attnctl.toyworld.models import default_call_kwargs, load_pipeline
from attnctl.toyworld.world import prompt_set, render, scene_from_item


def decode(pipe, z: torch.Tensor, side: int) -> np.ndarray:
    """The latent ``z`` (packed on FLUX) decoded as an ``H×W×3`` uint8 image, as the pipeline's last step does."""
    if z.ndim == 3:
        z = pipe._unpack_latents(z, side, side, pipe.vae_scale_factor)
    z = z / pipe.vae.config.scaling_factor + (getattr(pipe.vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        x = pipe.vae.decode(z, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(x, output_type="pil")[0])


def evaluate(model: str, items: int) -> dict:
    pipe = load_pipeline(model)
    call = default_call_kwargs(pipe)
    if not has_guidance_embedding(pipe):
        call["guidance_scale"] = 1.0  # no classifier-free guidance: the flow that was inverted
    side = call["height"]
    floor, back, fresh = [], [], []
    for k, item in enumerate(prompt_set("pair")[:items]):
        image = render(scene_from_item(item), side)
        ref = image.astype(float)
        floor.append(np.abs(decode(pipe, encode_image(pipe, image), side) - ref).mean())
        path = invert(pipe, image, item["prompt"], call["num_inference_steps"])
        out = pipe(item["prompt"], latents=path[0], **call).images[0]
        back.append(np.abs(np.asarray(out).astype(float) - ref).mean())
        out = pipe(item["prompt"], generator=torch.Generator().manual_seed(k), **call).images[0]
        fresh.append(np.abs(np.asarray(out).astype(float) - ref).mean())
    return {"model": model, "items": items, "steps": call["num_inference_steps"],
            "autoencoder_mae": round(float(np.mean(floor)), 3), "inverted_mae": round(float(np.mean(back)), 3),
            "fresh_noise_mae": round(float(np.mean(fresh)), 3),
            "inverted_over_fresh": round(float(np.mean(back) / np.mean(fresh)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy-sd3", "toy-flux", "toy-flux-dev"])
    ap.add_argument("--items", type=int, default=12, help="pair scenes to invert")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [evaluate(m, args.items) for m in args.models]
    table = Table(title="inversion: mean |pixel error| (0-255) against the real image")
    for col in ("model", "autoencoder", "from inverted noise", "from fresh noise", "inverted / fresh"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], f"{r['autoencoder_mae']:.2f}", f"{r['inverted_mae']:.2f}",
                      f"{r['fresh_noise_mae']:.2f}", f"{r['inverted_over_fresh']:.3f}")
    Console(stderr=True).print(table)
    emit({"inversion": rows}, args.json)


if __name__ == "__main__":
    main()
