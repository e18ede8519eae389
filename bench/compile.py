"""torch.compile with attnctl controls: compiled vs eager speed of the toy models, with and without controls, in one
run.

    python bench/compile.py                          # toy-sd3 and toy-flux, inductor, 8 steps, 3 repeats
    python bench/compile.py --backend aot_eager --models toy-flux --json out.json
    python bench/compile.py --size 128 --models toy-flux   # 16× the image tokens (toy-sd3 is limited to 32²)

For every model it times, interleaved over the repeats (after a warm-up that compiles): the stock pipeline eager and
compiled, then each control (an AttentionProbe, SoftPAG, AttentionRegulation) eager and compiled, and last the stock
pipeline compiled again after the controlled runs. The transformer is compiled once, ``torch.compile(transformer)``;
attnctl's per-step state stays out of the graph (attnctl.compiling), so the timed repeats must compile nothing new:
the bench counts the graphs dynamo makes during them (0 expected) and how many compiled graphs a step runs (a graph
break at every controlled site splits the model). Absolute times on a shared CPU are noise; the figures are the
compiled/eager ratios, each from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from report import emit, positive_int

import attnctl
from attnctl.toyworld.models import default_call_kwargs, load_pipeline

PROMPT = "a red circle and a blue square"
CONTROLS: dict[str, Callable[[], list]] = {
    "probe": lambda: [attnctl.AttentionProbe(words=["circle", "square"])],
    "softpag": lambda: [attnctl.SoftPAG(heads="all", scale=2.0)],
    "regulation": lambda: [attnctl.AttentionRegulation(targets=["circle", "square"])],
}


class CountingBackend:
    """A dynamo backend that compiles with ``backend`` and counts the runs of the graphs it made."""

    def __init__(self, backend: str) -> None:
        self.inner = torch._dynamo.lookup_backend(backend)
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        compiled = self.inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def bench_model(name: str, backend: str, steps: int, repeats: int, size: int | None = None,
                controls: list[str] | None = None) -> dict:
    torch._dynamo.reset()
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    kw = {**default_call_kwargs(pipe), "num_inference_steps": steps, "output_type": "pt"}
    if size is not None:  # more image tokens: the model's compute grows against the Python around it
        kw.update(height=size, width=size)
    eager_tf = pipe.transformer
    counting = CountingBackend(backend)
    compiled_tf = torch.compile(eager_tf, backend=counting)

    # three phases, each warmed up then timed with its variants interleaved: the stock model alone (one graph per
    # step when nothing breaks it), the controls, and the stock model again on the same compiled code
    phases: list[list[tuple[str, str, Callable[[], list]]]] = [[("stock", "eager", list), ("stock", "compiled", list)]]
    chosen = {c: CONTROLS[c] for c in (controls or CONTROLS)}
    phases.append([(c, mode, make) for c, make in chosen.items() for mode in ("eager", "compiled")])
    phases.append([("stock after controls", "compiled", list)])

    def run(mode: str, make: Callable[[], list], seed: int) -> tuple[float, int, torch.Tensor]:
        pipe.transformer = compiled_tf if mode == "compiled" else eager_tf
        counting.runs = 0
        t = time.perf_counter()
        out = pipe(PROMPT, controls=make(), generator=torch.Generator().manual_seed(seed), **kw).images
        return time.perf_counter() - t, counting.runs, out

    warm: dict[tuple[str, str], dict] = {}
    times: dict[tuple[str, str], list[float]] = {}
    graph_runs: dict[tuple[str, str], int] = {}
    new_graphs = 0
    for variants in phases:
        for label, mode, make in variants:  # warm-up: compiles what the phase needs
            t, _, out = run(mode, make, 0)
            warm[label, mode] = {"first_call_s": t, "image": out}
        graphs_before = unique_graphs()
        for _ in range(repeats):
            for label, mode, make in variants:
                t, n, _ = run(mode, make, 0)
                times.setdefault((label, mode), []).append(t)
                graph_runs[label, mode] = n
        new_graphs += unique_graphs() - graphs_before
    pipe.transformer = eager_tf
    variants = [v for phase in phases for v in phase]

    rows = []
    for label in dict.fromkeys(label for label, _, _ in variants):
        eager = times.get((label, "eager")) or times["stock", "eager"]
        compiled = times[label, "compiled"]
        reference = warm.get((label, "eager"), warm["stock", "eager"])["image"]  # the stock rows: stock eager
        image_diff = float((warm[label, "compiled"]["image"] - reference).abs().max())
        rows.append({
            "variant": label,
            "eager_s": statistics.median(eager),
            "compiled_s": statistics.median(compiled),
            "compiled_over_eager": statistics.median(compiled) / statistics.median(eager),
            "first_compiled_call_s": warm[label, "compiled"]["first_call_s"],
            "graphs_run_per_step": graph_runs[label, "compiled"] / steps,
            "max_image_difference": image_diff,
        })
    return {"model": name, "backend": backend, "steps": steps, "repeats": repeats, "size": kw["height"],
            "graphs_made_after_warm_up": new_graphs, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["toy-sd3", "toy-flux"])
    ap.add_argument("--backend", default="inductor", help="a torch.compile backend (inductor, aot_eager, eager)")
    ap.add_argument("--steps", type=positive_int, default=8)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--size", type=positive_int, default=None,
                    help="image side in pixels (default: the toy's own, 32; toy-sd3 allows no more)")
    ap.add_argument("--controls", nargs="+", choices=list(CONTROLS), default=None, help="default: all of them")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_model(m, args.backend, args.steps, args.repeats, args.size, args.controls) for m in args.models]
    for res in results:
        print(f"\n{res['model']} ({res['backend']}, {res['size']}², {res['steps']} steps, median of {res['repeats']}); "
              f"graphs made "
              f"after the warm-up: {res['graphs_made_after_warm_up']}")
        print(f"{'variant':<22}{'eager s':>9}{'compiled s':>12}{'ratio':>8}{'graphs/step':>13}{'max |Δ|':>10}")
        for row in res["rows"]:
            print(f"{row['variant']:<22}{row['eager_s']:>9.3f}{row['compiled_s']:>12.3f}"
                  f"{row['compiled_over_eager']:>8.2f}{row['graphs_run_per_step']:>13.1f}"
                  f"{row['max_image_difference']:>10.1e}")
    emit({"results": results}, args.json)


if __name__ == "__main__":
    main()
