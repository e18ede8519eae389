"""What EpipolarAttention costs at the attention core of real layer shapes, against independent views and against
the same extended attention written with a materialised mask.

    python bench/epipolar.py                 # SD3.5-large and FLUX.1-dev layer shapes, 512² and 1024², 2 views
    python bench/epipolar.py --quick         # 512² only
    python bench/epipolar.py --views 3 --json out.json
    python bench/epipolar.py --quick --falloff adaptive   # AnimateAnywhere's rule (or soft) instead of the hard band
    python bench/epipolar.py --res 1024 --falloff adaptive --materialise-up-to 512   # 1024² without the mask form
    python bench/epipolar.py --res 128 --shapes flux.1-dev-double --repeats 1 --falloff adaptive  # the test's run

Two (or ``--views``) views of one prompt, random q, k, v of the layer's width (``bench/layers.py``'s shapes), a
rolled stereo rig (views 0.3 apart, each further one rolled by 30° more). Variants, timed interleaved:

- ``independent``: the stock fused attention of each view over its own keys (no coupling);
- ``epipolar``: ``attend`` with the control's contributions (the hard band of one token by default: the other
  views' keys read block by block), as the processor runs it;
- ``materialised``: the same result the plain way — each view's queries against ``[own keys, the other views' image
  keys]`` through SDPA with a dense float mask holding the band (``−inf`` off it; for ``--falloff adaptive`` the
  mask is made from the whole softmax of the unconstrained logits); its output is checked against ``epipolar``.

The extra peak memory of one call of each is measured in a fresh subprocess (VmHWM after a reset minus VmRSS
before); ``nxn_map_bytes`` is one float32 map of the coupled logits over all heads (``views · heads · N · (N +
(views − 1)·N_img)``).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (the layer shapes and the peak-memory method)
from report import emit, positive_int, resolution  # noqa: E402

VARIANTS = ("independent", "epipolar", "materialised")


def setup(shape: str, res: int, views: int, falloff: str = "hard"):
    from attnctl import Camera, EpipolarAttention

    q, k, v, call, state, _ = layers.attention_core(shape, res, views)
    state.step = 0
    cams = []
    for i in range(views):
        a = math.radians(30 * i)
        cams.append(Camera.look_at([0.3 * i, 0, 0], [0.3 * i, 0, 1], size=(res, res),
                                   up=[math.sin(a), -math.cos(a), 0]))
    return q, k, v, EpipolarAttention(cameras=cams, falloff=falloff), call, state


def run(variant: str, q, k, v, ctl, call, state) -> torch.Tensor:
    from attnctl.processors.attend import attend, fused_attention

    if variant == "independent":
        return fused_attention(q, k, v)
    if variant == "epipolar":
        return attend(q, k, v, ctl.contribute(call, q, k, v, state))
    img = call.image_slice()
    n_img, n = call.n_image, q.shape[1]
    geo = ctl.geometry(state.layout.grid, q.device)
    outs = []
    for i in range(call.batch):
        others = [j for j in range(call.batch) if j != i]
        keys = torch.cat([k[i], *[k[j, img] for j in others]])  # (N + (V−1)·N_img, H, d)
        vals = torch.cat([v[i], *[v[j, img] for j in others]])
        mask = torch.full((n, keys.shape[0]), float("-inf"))
        mask[:, :n] = 0
        adaptive = ctl.config.falloff == "adaptive"
        if adaptive:  # the unconstrained extended attention: every image query reads every other view's keys
            mask[img, n:] = 0
            logits = torch.einsum("shd,thd->hst", q[i], keys) / math.sqrt(q.shape[-1]) + mask
            weak = (torch.softmax(logits, -1) < ctl.config.strong / keys.shape[0])[:, img, n:]  # (heads, N_img, …)
            mask = mask.expand(q.shape[2], -1, -1).clone()
        for m, j in enumerate(others):
            cols = slice(n + m * n_img, n + (m + 1) * n_img)
            if adaptive:
                off = geo[(i, j)].distances(0, n_img) > ctl.config.band
                mask[:, img, cols] = torch.zeros(()).masked_fill(off & weak[..., cols.start - n:cols.stop - n],
                                                                 float("-inf"))
            else:
                mask[img, cols] = ctl.bias(geo[(i, j)].distances(0, n_img), 0.0)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[i].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask)
        outs.append(o.transpose(0, 1))
    return torch.stack(outs)


def time_variants(shape: str, res: int, views: int, repeats: int, falloff: str,
                  variants: tuple[str, ...] = VARIANTS) -> dict:
    args = setup(shape, res, views, falloff)
    q, k, v, ctl, call, state = args
    with torch.no_grad():
        out = {var: run(var, *args) for var in variants}  # warm-up and the check
        times: dict[str, list[float]] = {var: [] for var in variants}
        for _ in range(repeats):
            for var in variants:
                t = time.perf_counter()
                run(var, *args)
                times[var].append(time.perf_counter() - t)
    med = {var: statistics.median(t) for var, t in times.items()}
    n, n_img, heads = q.shape[1], call.n_image, q.shape[2]
    row = dict(shape=shape, res=res, views=views, falloff=falloff, tokens=n, image_tokens=n_img, heads=heads,
               seconds={var: round(m, 4) for var, m in med.items()},
               ratio_to_independent={var: round(m / med["independent"], 3) for var, m in med.items()},
               nxn_map_bytes=views * heads * n * (n + (views - 1) * n_img) * 4)
    if "materialised" in out:
        row["epipolar_over_materialised"] = round(med["epipolar"] / med["materialised"], 3)
        row["max_abs_difference"] = float((out["epipolar"] - out["materialised"]).abs().max())
    return row


def _peak_child(shape: str, res: int, variant: str, views: int, falloff: str) -> int:
    torch.set_num_threads(2)
    args = setup(shape, res, views, falloff)
    with torch.no_grad():
        return layers.extra_peak_bytes(lambda: run(variant, *args))


def main() -> None:
    ap = layers.bench_parser(__doc__)
    ap.add_argument("--views", type=positive_int, default=2)
    ap.add_argument("--falloff", choices=["hard", "soft", "adaptive", "none"], default="hard")
    ap.add_argument("--res", type=resolution, nargs="+", help="resolutions (default: 512 1024; --quick: 512)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (the peak children use 2)")
    layers.add_materialise_up_to(ap)  # at 1024² the adaptive rule's reference holds several N² maps at once
    args = ap.parse_args()
    if args.views < 2:
        ap.error(f"--views {args.views}: epipolar attention couples at least 2 views")
    if layers.answer_peak_child(args, _peak_child, args.views, args.falloff):
        return
    torch.set_num_threads(args.threads)
    rows = []
    for res in args.res or ((512,) if args.quick else (512, 1024)):
        for shape in args.shapes:
            variants = layers.variants_at(VARIANTS, res, args.materialise_up_to)
            r = time_variants(shape, res, args.views, args.repeats, args.falloff, variants)
            r["extra_peak_bytes"] = layers.peak_memory(shape, res, __file__, variants,
                                                       ("--views", str(args.views), "--falloff", args.falloff))
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"EpipolarAttention ({args.falloff}) at one attention core, {args.views} views (ratios: same "
                        "run)")
        for col in ("layer", "res", "tokens", "epipolar / independent", "materialised / independent",
                    "epipolar / materialised", "peak MB independent / epipolar / materialised", "N×N map MB",
                    "max |Δ|"):
            t.add_column(col, justify="right")
        for r in rows:
            mb = " / ".join(f"{r['extra_peak_bytes'][v] / 2**20:.0f}" if v in r["extra_peak_bytes"] else "—"
                            for v in VARIANTS)
            mat = "materialised" in r["seconds"]
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), f"{r['ratio_to_independent']['epipolar']:.2f}",
                      f"{r['ratio_to_independent']['materialised']:.2f}" if mat else "—",
                      f"{r['epipolar_over_materialised']:.2f}" if mat else "—",
                      mb, f"{r['nxn_map_bytes'] / 2**20:.0f}", f"{r['max_abs_difference']:.1e}" if mat else "—")
        Console(width=200).print(t)
    except ImportError:
        pass
    emit({"bench": "epipolar", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "live_memory": layers.live_memory, "rows": rows},
         args.json)


if __name__ == "__main__":
    main()
