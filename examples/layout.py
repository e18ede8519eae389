"""Layout guidance: each named word goes into its box.

    python examples/layout.py                                      # toy-sd3, a few seconds on a CPU
    python examples/layout.py --model toy-flux --config '{"loss": "csg"}'
    python examples/layout.py --model stabilityai/stable-diffusion-3.5-medium --device cuda \\
        --prompt "a cat and a dog on a lawn" --box cat=0.05,0.3,0.45,0.9 --box dog=0.55,0.3,0.95,0.9

It generates the same seeds with and without ``LayoutGuidance`` and writes them side by side (top row: baseline,
bottom row: guided), the requested boxes drawn on both. On the toy models it also scores both rows with the
shapes-world evaluator (box IoU with the requested layout, presence). The toy models' colour words carry the
location (their shape words hardly do), so the default boxes are keyed by colour; on a real model key them by
the nouns. See ``docs/layout.md`` for the method and its settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import attnctl
from attnctl.errors import exit_on_error
from attnctl.toyworld.models import default_call_kwargs, load_pipeline

BOX_COLOURS = [(230, 60, 60), (60, 90, 230), (40, 170, 70), (200, 150, 20)]


def parse_box(text: str) -> tuple[str, list[float]]:
    """``word=x0,y0,x1,y1`` (fractions of the image from the top left)."""
    word, _, coords = text.partition("=")
    values = [float(x) for x in coords.split(",")] if coords else []
    if not word.strip() or len(values) != 4:
        raise SystemExit(f"--box {text!r}: write WORD=x0,y0,x1,y1, e.g. --box red=0.05,0.05,0.45,0.45")
    return word.strip(), values


def sheet(rows: list[list[np.ndarray]], boxes: dict[str, list[float]], scale: int) -> Image.Image:
    """The images in rows, enlarged, with the boxes outlined."""
    tiles = []
    for row in rows:
        line = []
        for im in row:
            pil = Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
            pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
            draw = ImageDraw.Draw(pil)
            for i, (x0, y0, x1, y1) in enumerate(boxes.values()):
                draw.rectangle([x0 * pil.width, y0 * pil.height, x1 * pil.width - 1, y1 * pil.height - 1],
                               outline=BOX_COLOURS[i % len(BOX_COLOURS)], width=max(1, scale // 4))
            line.append(np.asarray(pil))
        tiles.append(np.concatenate(line, axis=1))
    return Image.fromarray(np.concatenate(tiles, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3", help="toy-sd3, toy-flux, toy-flux-dev, a folder or hub id")
    ap.add_argument("--prompt", default="a red circle and a blue square")
    ap.add_argument("--box", action="append", type=parse_box, default=None,
                    help="WORD=x0,y0,x1,y1, repeated (default: red top left, blue bottom right)")
    ap.add_argument("--config", default="{}", help="more LayoutGuidance settings as JSON")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/layout")
    args = ap.parse_args()
    boxes = dict(args.box) if args.box else {"red": [0.05, 0.05, 0.5, 0.5], "blue": [0.5, 0.5, 0.95, 0.95]}
    settings = json.loads(args.config)
    if not isinstance(settings, dict) or "boxes" in settings:
        ap.error("--config takes more LayoutGuidance settings as a JSON object; give the boxes with --box")
    ctl = attnctl.LayoutGuidance(boxes=boxes, **settings)  # checked before the model loads

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    call = {**default_call_kwargs(pipe), "output_type": "np"}
    seeds = list(range(args.seeds))

    def run(controls):
        gens = [torch.Generator(args.device).manual_seed(s) for s in seeds]
        t = time.perf_counter()
        images = pipe([args.prompt] * len(seeds), generator=gens, controls=controls, **call).images
        return list(images), time.perf_counter() - t

    pipe(args.prompt, **{**call, "num_inference_steps": 1})  # warm-up, so the timings compare like with like
    base, t_base = run(None)
    guided, t_guided = run([ctl])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // base[0].shape[0])
    sheet([base, guided], boxes, scale).save(out / "baseline_vs_guided.png")

    print(f"{args.model}: {args.prompt!r}, boxes {boxes}, seeds {seeds}")
    print(f"  sites: {len(ctl.sites)} joint sites, guided steps {sorted({s for s, _ in ctl.history})}")
    if ctl.summary():
        print(f"  {ctl.summary()}")
    print(f"  time: baseline {t_base:.2f} s, guided {t_guided:.2f} s ({100 * (t_guided / t_base - 1):+.0f}%)")
    from attnctl.cli import is_toy_pipeline

    if is_toy_pipeline(pipe):  # shapes-world prompts: score both rows against the requested layout
        from attnctl.toyworld.evaluate import evaluate_set
        from attnctl.toyworld.world import parse_caption

        item = {"prompt": args.prompt, **parse_caption(args.prompt)}
        colours = [o["colour"] for o in item["objects"]]
        if sorted(boxes) == sorted(colours):  # boxes keyed by the objects' colours: a layout to score
            item["boxes"] = [boxes[c] for c in colours]
        for name, images in (("baseline", base), ("guided", guided)):
            u8 = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
            m = evaluate_set(u8, [item] * len(images))
            iou = f"box IoU {m['box_iou']:.3f}  " if "box_iou" in m else ""
            print(f"  {name:8s} {iou}presence {m.get('presence', float('nan')):.3f}  "
                  f"object recall {m.get('object_recall', float('nan')):.3f}")
    print(f"  wrote {out / 'baseline_vs_guided.png'}")


if __name__ == "__main__":
    exit_on_error(main)
