"""Toy-world check of rectified-flow inversion: does the inverted noise give the image back?

    python bench/inversion_eval.py                                  # toy-sd3, toy-flux, toy-flux-dev; 12 pair scenes
    python bench/inversion_eval.py --models toy-sd3 --items 4 --json out/inversion.json
    python bench/inversion_eval.py --solvers euler midpoint/2                 # at equal model calls only
    python bench/inversion_eval.py --solvers euler --gammas 0 0.25 0.5 1      # RF-Inversion's controlled inversion

For each ground-truth render of the pair prompt set (a "real" image: drawn, not generated), with its caption as the
prompt and the toy's default steps: the mean absolute pixel error (0–255) of the image decoded from its own latent
(the autoencoder's floor), of the pipeline's output from the inverted noise (the mean over the items, with their
median and worst), and of the output from fresh noise (what the same prompt draws without inversion). The ratio
inverted / fresh is the figure. The flow inverted and sampled is the conditional one (no CFG); a model with a
guidance embedding (toy-flux-dev) is inverted and sampled at its default guidance. Each solver inverts and samples
with its own scheduler: diffusers' Euler step, or RF-Solver's midpoint step (attnctl.midpoint), which makes two
model calls a step; ``midpoint/2`` runs it at half the steps, so at Euler's number of calls.

``--gammas`` inverts with RF-Inversion's pull toward a Gaussian sample as well (``invert(..., gamma=γ)``; 0 is plain
inversion). Beside the pixel errors each row gives what the inverted noise looks like: its standard deviation (1 for
a standard Gaussian sample) and the correlation of neighbouring latent pixels (the image's structure left in it; 0 for
white noise), averaged over the items.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from report import emit, positive_int
from rich.console import Console
from rich.table import Table

from attnctl.inversion import encode_image, has_guidance_embedding, invert
from attnctl.midpoint import FlowMatchMidpointScheduler
from attnctl.toyworld.models import default_call_kwargs, load_pipeline
from attnctl.toyworld.world import prompt_set, render, scene_from_item

SOLVERS = {"euler": FlowMatchEulerDiscreteScheduler, "midpoint": FlowMatchMidpointScheduler}


def decode(pipe, z: torch.Tensor, side: int) -> np.ndarray:
    """The latent ``z`` (packed on FLUX) decoded as an ``H×W×3`` uint8 image, as the pipeline's last step does."""
    if z.ndim == 3:
        z = pipe._unpack_latents(z, side, side, pipe.vae_scale_factor)
    z = z / pipe.vae.config.scaling_factor + (getattr(pipe.vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        x = pipe.vae.decode(z, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(x, output_type="pil")[0])


def noise_stats(pipe, z: torch.Tensor, side: int) -> tuple[float, float]:
    """The inverted noise ``z``'s standard deviation and the mean correlation of horizontally and vertically
    neighbouring latent pixels (unpacked first on FLUX)."""
    if z.ndim == 3:
        z = pipe._unpack_latents(z, side, side, pipe.vae_scale_factor)
    z = z.float()

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    lag = (corr(z[..., :, :-1], z[..., :, 1:]) + corr(z[..., :-1, :], z[..., 1:, :])) / 2
    return float(z.std()), lag


def solver_runs(spec: list[str], steps: int) -> list[tuple[str, int]]:
    """``euler``, ``midpoint`` (the model's steps) and ``midpoint/2`` (half of them: as many model calls as Euler)."""
    runs = []
    for name in spec:
        solver, _, div = name.partition("/")
        if solver not in SOLVERS or (div and not div.isdigit()):
            raise SystemExit(f"--solvers: {name!r} is not one of euler, midpoint, midpoint/2 (or another divisor)")
        runs.append((solver, max(1, steps // int(div)) if div else steps))
    return runs


def evaluate(model: str, items: int, solvers: list[str], gammas: list[float] = (0.0,)) -> list[dict]:
    base = load_pipeline(model)
    call = default_call_kwargs(base)
    if not has_guidance_embedding(base):
        call["guidance_scale"] = 1.0  # no classifier-free guidance: the flow that was inverted
    guidance = call["guidance_scale"] if has_guidance_embedding(base) else None  # FLUX.1-dev style: invert that flow
    side = call["height"]
    images = [(render(scene_from_item(item), side), item["prompt"]) for item in prompt_set("pair")[:items]]
    floor = [np.abs(decode(base, encode_image(base, image), side) - image.astype(float)).mean() for image, _ in images]
    fresh = [np.abs(np.asarray(base(prompt, generator=torch.Generator().manual_seed(k), **call).images[0])
                    .astype(float) - image).mean() for k, (image, prompt) in enumerate(images)]
    rows = []
    for (solver, steps), gamma in ((run, g) for run in solver_runs(solvers, call["num_inference_steps"])
                                   for g in gammas):
        pipe = type(base)(**{**base.components, "scheduler": SOLVERS[solver].from_config(base.scheduler.config)})
        back, stats = [], []
        for image, prompt in images:
            path = invert(pipe, image, prompt, steps, guidance=guidance, gamma=gamma)
            stats.append(noise_stats(pipe, path[0], side))
            out = pipe(prompt, latents=path[0], **{**call, "num_inference_steps": steps}).images[0]
            back.append(np.abs(np.asarray(out).astype(float) - image).mean())
        rows.append({"model": model, "solver": solver, "gamma": gamma, "items": items, "steps": steps,
                     "model_calls": steps * pipe.scheduler.order,
                     "noise_std": round(float(np.mean([a for a, _ in stats])), 3),
                     "noise_neighbour_corr": round(float(np.mean([b for _, b in stats])), 3),
                     "autoencoder_mae": round(float(np.mean(floor)), 3), "inverted_mae": round(float(np.mean(back)), 3),
                     "inverted_median": round(float(np.median(back)), 3),
                     "inverted_worst": round(float(np.max(back)), 3),
                     "fresh_noise_mae": round(float(np.mean(fresh)), 3),
                     "inverted_over_fresh": round(float(np.mean(back) / np.mean(fresh)), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy-sd3", "toy-flux", "toy-flux-dev"])
    ap.add_argument("--items", type=positive_int, default=12, help="pair scenes to invert")
    ap.add_argument("--solvers", nargs="+", default=["euler", "midpoint", "midpoint/2"],
                    help="euler, midpoint (RF-Solver's step) at the model's steps, midpoint/2 at half of them")
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.0],
                    help="RF-Inversion's gamma for each run (0: plain inversion)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for m in args.models for row in evaluate(m, args.items, args.solvers, args.gammas)]
    table = Table(title="inversion: mean |pixel error| (0-255) against the real image")
    for col in ("model", "solver", "γ", "steps", "model calls", "autoencoder", "from inverted noise (median, worst)",
                "from fresh noise", "inverted / fresh", "noise std", "neighbour corr."):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["solver"], f"{r['gamma']:g}", str(r["steps"]), str(r["model_calls"]),
                      f"{r['autoencoder_mae']:.2f}",
                      f"{r['inverted_mae']:.2f} ({r['inverted_median']:.2f}, {r['inverted_worst']:.2f})",
                      f"{r['fresh_noise_mae']:.2f}", f"{r['inverted_over_fresh']:.3f}", f"{r['noise_std']:.2f}",
                      f"{r['noise_neighbour_corr']:.2f}")
    Console(stderr=True, width=160).print(table)
    emit({"inversion": rows}, args.json)


if __name__ == "__main__":
    main()
