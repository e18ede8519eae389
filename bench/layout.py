"""What LayoutGuidance's gradient pass costs at one attention layer of real shape, against the stock layer.

    python bench/layout.py                 # SD3.5-large and FLUX.1-dev layers, 512² and 1024² token counts
    python bench/layout.py --quick         # 512² only
    python bench/layout.py --json out.json
    python bench/layout.py --quick --shapes flux.1-dev-single --repeats 1   # the smallest run

Layers and inputs come from ``bench/layers.py``; the prompt is "a red circle and a blue square" (one token per
word, as ``bench/regulation.py`` lays it out), with boxes on "circle" and "square". Variants, timed interleaved:

- ``stock``: the stock processor's forward, no gradients (what the step's own forward costs at this layer);
- ``stock_grad``: the stock layer's forward and the backward of a scalar of its outputs (image and, where the layer
  has one, text stream) to the layer's input, the cost any latent-gradient method pays for a layer its gradient
  passes through;
- ``layout_site``: the gradient pass at a site whose maps enter the loss: the attnctl processor's forward with the
  word maps recorded, and the backward of the layout loss plus the same scalar of the outputs to the layer's input.
  Every loss site but the deepest pays this: the maps' gradient, and the gradient the later sites' maps send back
  through the layer's output (V, ``to_out``, ``to_add_out``);
- ``layout``: the map loss alone, what the deepest loss site pays (no later site reads its output): the backward
  never passes through V or the output projections;
- ``layout_self_site``: ``layout_site`` with CSG's self-attention constraint on (``self_weight=1``): the
  image×image logits too, in checkpointed chunks of query rows.

The extra peak memory of one call of each is measured in a fresh subprocess (``bench/layers.py``'s method:
VmHWM after a reset minus VmRSS before); ``saved_maps_bytes`` is the ``heads · N_img · T`` float32 softmax the
backward keeps, ``nxn_map_bytes`` one float32 ``N × N`` map over all heads. Weights are random.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (the layer builders and the peak-memory method)
from regulation import prompt_layout  # noqa: E402
from report import emit, resolution  # noqa: E402

VARIANTS = ("stock", "stock_grad", "layout_site", "layout", "layout_self_site")
BOXES = {"circle": [0.05, 0.05, 0.5, 0.5], "square": [0.5, 0.5, 0.95, 0.95]}


def build(shape: str, res: int, variant: str):
    """The layer, and for ``layout`` the control bound to its controller in a gradient pass."""
    from attnctl import LayoutGuidance

    guided = variant.startswith("layout")
    layer = layers.build(shape, res, "attnctl" if guided else "stock")
    control = None
    if guided:
        ctl = layer.controller
        control = LayoutGuidance(boxes=BOXES, self_weight=1.0 if variant == "layout_self_site" else 0.0)
        ctl.controls.append(control)
        control.bind(ctl)
        ctl._latent_control = control  # a bare layer has no pipeline to check: declare the gradient pass's control
        ctl.begin_run(1, layout=prompt_layout(layers.SHAPES[shape], layer.n_text, res // 16), roles=["cond"])
        ctl._stop_site = None  # a lone layer: the gradient pass ends with it anyway, so nothing is stopped after it
        ctl.state.gradient_pass = True
    return layer, control


def output_scalar(out) -> torch.Tensor:
    """A scalar of every output of the layer (image and text stream): its backward is the gradient later layers
    send back through this one."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().pow(2).mean() for o in outs)


def one_call(layer, control, variant: str) -> None:
    if variant == "stock":
        with torch.no_grad():
            layer.attn(**layer.kwargs)
        return
    x = layer.kwargs["hidden_states"].detach().requires_grad_(True)
    with torch.enable_grad():
        out = layer.attn(**{**layer.kwargs, "hidden_states": x})
        if control is None:
            loss = output_scalar(out)
        elif variant == "layout":  # the deepest loss site: the maps alone
            loss = control.latent_loss().sum()
        else:
            loss = control.latent_loss().sum() + output_scalar(out)
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


def time_variants(shape: str, res: int, repeats: int) -> dict:
    built = {v: build(shape, res, v) for v in VARIANTS}
    for v, (layer, control) in built.items():  # warm-up
        one_call(layer, control, v)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v, (layer, control) in built.items():
            t = time.perf_counter()
            one_call(layer, control, v)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(t) for v, t in times.items()}
    stock = built["stock"][0]
    heads = stock.attn.heads
    n = stock.n_img + stock.n_text
    return dict(shape=shape, res=res, tokens=n, image_tokens=stock.n_img, text_tokens=stock.n_text, heads=heads,
                seconds={v: round(m, 4) for v, m in med.items()},
                ratio_to_stock={v: round(m / med["stock"], 3) for v, m in med.items()},
                site_over_stock_grad=round(med["layout_site"] / med["stock_grad"], 3),
                deepest_over_stock_grad=round(med["layout"] / med["stock_grad"], 3),
                self_site_over_stock_grad=round(med["layout_self_site"] / med["stock_grad"], 3),
                saved_maps_bytes=heads * stock.n_img * stock.n_text * 4, nxn_map_bytes=n * n * heads * 4)


def _peak_child(shape: str, res: int, variant: str) -> int:
    torch.set_num_threads(2)
    layer, control = build(shape, res, variant)
    return layers.extra_peak_bytes(lambda: one_call(layer, control, variant))


def main() -> None:
    ap = layers.bench_parser(__doc__)
    ap.add_argument("--res", type=resolution, nargs="+", help="resolutions (default: 512 1024; --quick: 512)")
    args = ap.parse_args()
    if layers.answer_peak_child(args, _peak_child):
        return
    torch.set_num_threads(2)
    rows = []
    for res in args.res or ((512,) if args.quick else (512, 1024)):
        for shape in args.shapes:
            r = time_variants(shape, res, args.repeats)
            r["extra_peak_bytes"] = layers.peak_memory(shape, res, __file__, VARIANTS)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="LayoutGuidance's gradient pass at one layer (ratios: same run; 1.00 = stock forward)")
        for col in ("layer", "res", "tokens", "stock fwd+bwd ×", "loss site ×", "loss site / stock fwd+bwd",
                    "deepest site (maps only) / stock fwd+bwd", "site + self / stock fwd+bwd",
                    "peak MB stock / fwd+bwd / site / deepest / site + self", "saved maps MB", "one N×N map MB"):
            t.add_column(col, justify="right")
        for r in rows:
            mb = " / ".join(f"{r['extra_peak_bytes'][v] / 2**20:.0f}" for v in VARIANTS)
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), f"{r['ratio_to_stock']['stock_grad']:.2f}",
                      f"{r['ratio_to_stock']['layout_site']:.2f}", f"{r['site_over_stock_grad']:.2f}",
                      f"{r['deepest_over_stock_grad']:.2f}", f"{r['self_site_over_stock_grad']:.2f}", mb,
                      f"{r['saved_maps_bytes'] / 2**20:.0f}", f"{r['nxn_map_bytes'] / 2**20:.0f}")
        Console(width=200).print(t)
    except ImportError:
        pass
    emit({"bench": "layout", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "live_memory": layers.live_memory, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
