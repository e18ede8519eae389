"""Attention regulation: every named word gets its share of the image's attention.

    python examples/regulation.py                                  # toy-sd3, a few seconds on a CPU
    python examples/regulation.py --model toy-flux
    python examples/regulation.py --model tiny-sd3                 # random-weight test pipeline (no toy models)
    python examples/regulation.py --model stabilityai/stable-diffusion-3.5-medium --device cuda \\
        --prompt "a cat and a dog playing chess" --targets cat dog

It generates the same seeds with and without ``AttentionRegulation`` and writes them side by side
(top row: baseline, bottom row: regulated), plus each target word's attention map of the regulated run
(an ``AttentionProbe`` runs in the same call). On the toy models it also scores both rows with the
shapes-world evaluator. See ``docs/regulation.md`` for the method and its settings.
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


def load(model: str, device: str):
    """A controlled pipeline (takes ``controls=``) and its call defaults."""
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    if model in ("tiny-sd3", "tiny-flux"):  # random weights: for a smoke run without the toy models
        from attnctl.testing import tiny_flux_pipeline, tiny_sd3_pipeline

        base = tiny_sd3_pipeline("sd35") if model == "tiny-sd3" else tiny_flux_pipeline()
        cls = AttnCtlSD3Pipeline if model == "tiny-sd3" else AttnCtlFluxPipeline
        pipe = cls(**base.components).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, dict(height=32, width=32, num_inference_steps=10, max_sequence_length=24)
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline

    pipe = load_pipeline(model, device=device)
    return pipe, default_call_kwargs(pipe)


def grid(rows: list[list[np.ndarray]], scale: int) -> Image.Image:
    img = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    pil = Image.fromarray(img)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, tiny-sd3, tiny-flux, a folder or hub id")
    ap.add_argument("--prompt", default="a red circle and a blue square and a green triangle")
    ap.add_argument("--targets", nargs="+", default=["circle", "square", "triangle"])
    ap.add_argument("--config", default="{}", help="more AttentionRegulation settings as JSON")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/regulation")
    args = ap.parse_args()

    pipe, call = load(args.model, args.device)
    call = {**call, "output_type": "np"}
    seeds = list(range(args.seeds))

    def run(controls):
        gens = [torch.Generator(args.device).manual_seed(s) for s in seeds]
        t = time.perf_counter()
        images = pipe([args.prompt] * len(seeds), generator=gens, controls=controls, **call).images
        return list(images), time.perf_counter() - t

    pipe(args.prompt, **{**call, "num_inference_steps": 1})  # warm-up, so the timings compare like with like
    base, t_base = run(None)
    reg = attnctl.AttentionRegulation(targets=args.targets, **json.loads(args.config))
    probe = attnctl.AttentionProbe(words=args.targets)
    regulated, t_reg = run([reg, probe])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // base[0].shape[0])
    grid([base, regulated], scale).save(out / "baseline_vs_regulated.png")
    side = base[0].shape[0] * scale
    for word in probe.word_maps():
        heat = probe.heatmap(word, (side, side)).cpu().numpy()
        Image.fromarray((heat * 255).astype(np.uint8)).save(out / f"map_{word}.png")

    print(f"{args.model}: {args.prompt!r}, targets {args.targets}, seeds {seeds}")
    print(f"  sites: {', '.join(s.name for s in reg.sites)}")
    steps = sorted({r.step for r in reg.records})
    print(f"  regulated {len(reg.records)} attention calls at steps {steps}")
    if reg.summary():
        print(f"  {reg.summary()}")
    if reg.records and reg.records[0].losses:
        first = reg.records[0]
        print(f"  inner loss at {first.site}, step {first.step}: {first.losses[0]:.4f} -> best {first.best_loss:.4f}")
    print(f"  time: baseline {t_base:.2f} s, regulated {t_reg:.2f} s ({100 * (t_reg / t_base - 1):+.0f}%)")
    from attnctl.cli import is_toy_pipeline

    if is_toy_pipeline(pipe) and args.model not in ("tiny-sd3", "tiny-flux"):  # trained toys: score both rows
        from attnctl.toyworld.evaluate import evaluate_set
        from attnctl.toyworld.world import parse_caption

        item = {"prompt": args.prompt, **parse_caption(args.prompt)}
        for name, images in (("baseline", base), ("regulated", regulated)):
            u8 = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
            m = evaluate_set(u8, [item] * len(images))
            print(f"  {name:9s} presence {m.get('presence', float('nan')):.3f}  "
                  f"colour binding {m.get('colour_binding', float('nan')):.3f}  "
                  f"object recall {m.get('object_recall', float('nan')):.3f}")
    print(f"  wrote {out / 'baseline_vs_regulated.png'} and one map_<word>.png per target")


if __name__ == "__main__":
    exit_on_error(main)
