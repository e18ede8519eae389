"""HeadHunter on the toy models: search (or reuse a search), then score on held-out prompts.

For each model: the searched heads against no perturbation guidance and against layer-level PAG (all heads
of one site, every site in turn; the fair rival is the layer the search prompts themselves pick, scored on
them first) at the same w, u, target and scope, on held-out prompt–seed pairs (the
built-in ``pair`` set, whose captions the search never saw, and the ``single`` set, all on seeds the search
never used; every held-out pair has its own initial noise, so the pairs are independent samples). The figure
is the search objective; differences are paired (same prompt, same noise).

    python bench/headhunt.py                       # both toy models, searches in out/headhunt/<model>
    python bench/headhunt.py --model toy-flux --search-root out/headhunt --json out/hh.json

The search runs as ``attnctl headhunt`` with the settings printed (resumable: re-running continues it).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import emit, positive_int

ROOT = Path(__file__).resolve().parent.parent
SEARCH_PROMPTS = ROOT / "examples" / "headhunt_prompts.json"
SEARCH = {"rounds": 4, "top_k": 1, "u": 1.0, "w": 2.0, "seeds": 2, "finalists": 0, "finalist_seeds": 0,
          "noise": "shared", "require_gain": True}
"""The search behind the shipped toy presets; other searches by flags, e.g. ``--noise per_prompt --finalists 6
--finalist-seeds 4 --search-root out/headhunt/per-prompt``."""


def search(model: str, folder: Path, cfg: dict) -> dict:
    cmd = [sys.executable, "-m", "attnctl", "headhunt", "--model", model, "--out", str(folder), "--prompts",
           str(SEARCH_PROMPTS), "--seeds", str(cfg["seeds"]), "--rounds", str(cfg["rounds"]), "--top-k",
           str(cfg["top_k"]), "--u", str(cfg["u"]), "--w", str(cfg["w"]), "--batch-images", "48",
           "--finalists", str(cfg["finalists"]), "--finalist-seeds", str(cfg["finalist_seeds"]),
           "--noise", cfg["noise"]]
    if cfg["require_gain"]:
        cmd.append("--require-gain")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((folder / "state.json").read_text())


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b and its standard error over the pairs."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
    return m, math.sqrt(var / len(d))


def held_out(model: str, state: dict, seeds: list[int], limit: int | None) -> dict:
    from attnctl.cli import load_pipeline
    from attnctl.headhunt import HeadHunt, make_settings, saved_settings
    from attnctl.sites import list_sites
    from attnctl.toyworld.world import prompt_set

    s = saved_settings(state)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    layers = {f"layer PAG {site.name}": [f"{site.name}/H{h}" for h in range(site.heads)]
              for site in list_sites(pipe.transformer)}
    # The fair layer-level rival: the layer the same search data picks (the search prompts and seeds).
    on_search = HeadHunt(pipe, make_settings(**s), None).score_sets(list(layers.values()))
    layer_scores = {name: sum(v) / len(v) for name, v in zip(layers, on_search, strict=True)}
    searched_layer = max(layer_scores, key=layer_scores.get)
    prompts = [it["prompt"] for name in ("pair", "single") for it in prompt_set(name)][:limit]
    # held out: every pair its own initial noise, so the pairs are independent samples
    s.update(prompts=prompts, seeds=seeds, rounds=1, noise="per_prompt", finalists=0, finalist_seeds=[])
    settings = make_settings(**s)
    hunt = HeadHunt(pipe, settings, None)
    sets = {"no guidance": [], "HeadHunter": list(state["selected"]), **layers}
    start = time.perf_counter()
    scores = dict(zip(sets, hunt.score_sets(list(sets.values())), strict=True))
    seconds = time.perf_counter() - start
    hh = scores["HeadHunter"]
    rows = {}
    for name, v in scores.items():
        d, se = paired(hh, v) if name != "HeadHunter" else (0.0, 0.0)
        rows[name] = {"objective": sum(v) / len(v), "headhunter_minus_this": d, "stderr": se,
                      "heads": len(sets[name])}
    return {"model": model, "objective": settings.objective, "w": settings.w, "u": settings.u,
            "target": settings.target, "scope": settings.scope, "pairs": len(prompts) * len(seeds),
            "prompts": len(prompts), "seeds": seeds, "selected": state["selected"],
            "search_seconds": sum(r.get("seconds", 0.0) for r in state["rounds"]),
            "search_rounds": [{"reference": r["reference"], "chosen": r["chosen"]} for r in state["rounds"]],
            "layers_on_search_set": layer_scores, "searched_layer": searched_layer,
            "heldout_seconds": seconds, "results": rows}


def print_table(res: dict) -> None:
    print(f"\n{res['model']}: {res['objective']} on {res['pairs']} held-out pairs ({res['prompts']} prompts × "
          f"{len(res['seeds'])} seeds), w={res['w']}, u={res['u']}, {res['target']}/{res['scope']}; search "
          f"{res['search_seconds'] / 60:.1f} min, selected {len(res['selected'])}: {', '.join(res['selected'])}")
    print(f"{'method':52s} {'heads':>5s} {'objective':>9s} {'HH − this':>10s} {'± s.e.':>7s}  search set")
    for name, r in res["results"].items():
        mark = " ← the layer the search set picks" if name == res["searched_layer"] else ""
        on_search = res["layers_on_search_set"].get(name)
        print(f"{name:52s} {r['heads']:5d} {r['objective']:9.4f} {r['headhunter_minus_this']:+10.4f} "
              f"{r['stderr']:7.4f}  {'' if on_search is None else f'{on_search:.4f}'}{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="toy-sd3 and/or toy-flux (default both)")
    ap.add_argument("--search-root", type=Path, default=ROOT / "out" / "headhunt",
                    help="searches live in <root>/<model> (default out/headhunt)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101], help="held-out seeds")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N held-out prompts")
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    for key, value in SEARCH.items():
        if key != "require_gain":
            ap.add_argument(f"--{key.replace('_', '-')}" if key != "seeds" else "--search-seeds", dest=f"search_{key}",
                            type=type(value), default=value, help=f"search setting (default {value})")
    ap.add_argument("--no-require-gain", dest="search_require_gain", action="store_false",
                    help="keep adding top-k heads each round even when the objective does not rise")
    args = ap.parse_args()
    cfg = {key: getattr(args, f"search_{key}") for key in SEARCH}
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for model in args.model or ["toy-sd3", "toy-flux"]:
        folder = args.search_root / model
        state = search(model, folder, cfg)  # resumes, or returns at once when that search is finished
        res = held_out(model, state, args.seeds, args.limit)
        print_table(res)
        results.append(res)
    print()
    emit(results, args.json)


if __name__ == "__main__":
    main()
