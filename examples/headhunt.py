"""HeadHunter from Python: search heads for SoftPAG with your own objective, then use the preset.

    python examples/headhunt.py                         # toy-sd3, a small search (about a minute on a CPU)
    python examples/headhunt.py --model toy-flux --rounds 2
    python examples/headhunt.py --model stabilityai/stable-diffusion-3-medium-diffusers --device cuda \\
        --prompts prompts.txt --objective my_scores.py:pickscore --rounds 1 --top-k 24 --u 0.25 --w 3

The command-line form of the same search is ``attnctl headhunt`` (resumable, ``--processes N`` or
``accelerate launch``); see docs/softpag.md. Re-running with the same --out folder resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
from attnctl.cli import call_defaults, load_pipeline
from attnctl.errors import exit_on_error
from attnctl.headhunt import REFERENCE, HeadHunt, make_settings, read_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3")
    ap.add_argument("--prompts", default=str(Path(__file__).with_name("headhunt_prompts.json")),
                    help="a .txt/.json file or a toy set (default: headhunt_prompts.json beside this script)")
    ap.add_argument("--limit", type=int, default=4, help="only the first N prompts (a quick look)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--objective", default="toy_combined", help="built-in name or 'module:function'")
    ap.add_argument("--candidates", nargs="+", default=["all"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--u", type=float, default=1.0)
    ap.add_argument("--w", type=float, default=2.0)
    ap.add_argument("--finalists", type=int, default=0, help="re-score each round's best F on more seeds")
    ap.add_argument("--finalist-seeds", type=int, default=2, help="how many more seeds the finalists get")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("out/headhunt-example"))
    args = ap.parse_args()

    pipe = load_pipeline(args.model, device=args.device)  # an attnctl pipeline
    pipe.set_progress_bar_config(disable=True)
    d = call_defaults(pipe)
    settings = make_settings(model=args.model, prompts=read_prompts(args.prompts, args.limit),
                             seeds=list(range(args.seeds)), candidates=args.candidates, objective=args.objective,
                             rounds=args.rounds, top_k=args.top_k, u=args.u, w=args.w, require_gain=True,
                             finalists=args.finalists,
                             finalist_seeds=list(range(args.seeds, args.seeds + args.finalist_seeds))
                             if args.finalists else [],
                             steps=d["steps"], guidance=d["guidance"], height=d["height"], width=d["width"],
                             max_sequence_length=d["max_sequence_length"])
    # Any f(images, prompts) -> scores works as the objective, e.g. objective=my_scorer here.
    state = HeadHunt(pipe, settings, args.out, note=print).run()
    for r in state.rounds:
        means = r.final or r.scores  # the finalists' means over all their seeds, when there were finalists
        best = max(v for c, v in means.items() if c != REFERENCE)
        print(f"round {r.index + 1}: current set {r.reference:.4f}, best candidate {best:.4f}, added {r.chosen}")
    if not state.selected:
        print("no head improved the objective; nothing to compare")
        return

    # The preset loads like any head selection; compare on one prompt, same seed.
    preset = args.out / "heads.json"
    prompt = settings.prompts[-1]
    row = []
    for controls in ([], [attnctl.SoftPAG(heads=str(preset), u=args.u, scale=args.w)]):
        image = pipe(prompt, num_inference_steps=d["steps"], guidance_scale=d["guidance"], height=d["height"],
                     width=d["width"], max_sequence_length=d["max_sequence_length"],
                     generator=torch.Generator().manual_seed(0), controls=controls).images[0]
        row.append(np.asarray(image.convert("RGB")))
    out = args.out / "compare.png"
    Image.fromarray(np.concatenate(row, axis=1)).resize((row[0].shape[1] * 2 * 4, row[0].shape[0] * 4),
                                                        Image.NEAREST).save(out)
    print(f"preset {preset} ({len(state.selected)} heads); '{prompt}': no guidance | HeadHunter heads → {out}")


if __name__ == "__main__":
    exit_on_error(main)
