"""What IsolationAttention costs at the attention core of real layer shapes, against the plain call and against the
same attention written with a materialised mask.

    python bench/isolation.py                # SD3.5-large and FLUX.1-dev layer shapes, 512² and 1024²
    python bench/isolation.py --quick        # 512² only

One set ``[reference_1, reference_2, scene]`` (three batch rows), random q, k, v of the layer's width
(``bench/layers.py``'s shapes) and fixed subject masks: the references' subjects a disc of a quarter of the image
side, the scene's two subjects side by side, a third of the side each. Variants, timed interleaved:

- ``plain``: the stock fused attention of the three rows;
- ``isolation``: ``attend`` with the control's contributions, ``reposition=0`` (a bias on the scene's own keys);
- ``reposition``: the defaults (isolation and both references' relocated keys);
- ``materialised``: the ``reposition`` result the plain way — the scene's queries against ``[own keys, the
  relocated keys]`` through SDPA with the control's whole bias as one dense float mask; its output is checked
  against ``reposition``.

The extra peak memory of one call of each is measured in a fresh subprocess; ``nxn_map_bytes`` is one float32 map
of the scene's logits over all heads (``heads · N · (N + 2·N_img)``). Where that map exceeds ``--max-map-gb``
(default 4: the mask form then needs several times it, more than this machine's 24 GiB at 1024²) the materialised
variant is left out of that row (its output check then rests on the 512² rows and ``tests/test_isolation.py``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (the layer shapes and the peak-memory method)
from report import emit  # noqa: E402

VARIANTS = ("plain", "isolation", "reposition", "materialised")


def disc(side: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return (((y + 0.5) / side - cy) ** 2 + ((x + 0.5) / side - cx) ** 2 <= r * r).flatten()


def setup(shape: str, res: int, variant: str):
    from attnctl import IsolationAttention

    flux = layers.SHAPES[shape]["family"] == "flux"
    q, k, v, call, state, g = layers.attention_core(shape, res, 3, rotary=flux)  # RoPE tables for the relocation
    side = res // 16
    masks = torch.zeros(3, 2, side * side, dtype=torch.bool)
    masks[0, 0] = disc(side, 0.5, 0.5, 0.125)
    masks[1, 1] = disc(side, 0.5, 0.5, 0.125)
    masks[2, 0] = disc(side, 0.5, 0.25, 1 / 6)
    masks[2, 1] = disc(side, 0.5, 0.75, 1 / 6)
    ctl = IsolationAttention(subjects=["a", "b"], references=True,
                             reposition=0.0 if variant == "isolation" else 0.9)
    ctl._sets, ctl._masks = [([0, 1], 2)], masks
    ctl._keep = torch.rand(masks.shape, generator=g) >= 0.5
    return q, k, v, ctl, call, state, (side, side)


def run(variant: str, q, k, v, ctl, call, state, grid) -> torch.Tensor:
    from attnctl.processors.attend import attend, fused_attention
    from attnctl.processors.contributions import DenseBias, ExtraKV

    if variant == "plain":
        return fused_attention(q, k, v)
    contributions = ctl._steer(call, k, v, state, grid)
    if variant != "materialised":
        return attend(q, k, v, contributions)
    extra = next(c for c in contributions if isinstance(c, ExtraKV))
    bias = next(c for c in contributions if isinstance(c, DenseBias)).fn(0, q.shape[1])[0, :, 0]  # (N, keys)
    img = call.image_slice()
    keys = torch.cat([k[2], extra.key[0]])
    vals = torch.cat([v[2], extra.value[0]])
    mask = bias.clone()
    text_rows = torch.ones(q.shape[1], dtype=torch.bool)
    text_rows[img] = False
    mask[text_rows, k.shape[1]:] = float("-inf")  # the relocated keys are for image queries only
    o = torch.nn.functional.scaled_dot_product_attention(
        q[2].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask)
    return torch.cat([fused_attention(q[:2], k[:2], v[:2]), o.transpose(0, 1)[None]])


def time_variants(shape: str, res: int, repeats: int, max_map_gb: float) -> dict:
    args = {var: setup(shape, res, var) for var in VARIANTS}
    q = args["plain"][0]
    n, heads, n_img = q.shape[1], q.shape[2], args["plain"][4].n_image
    map_bytes = heads * n * (n + 2 * n_img) * 4
    variants = [v for v in VARIANTS if v != "materialised" or map_bytes <= max_map_gb * 2**30]
    with torch.no_grad():
        out = {var: run(var, *args[var]) for var in variants}  # warm-up and the check
        err = float((out["reposition"] - out["materialised"]).abs().max()) if "materialised" in out else None
        del out
        times: dict[str, list[float]] = {var: [] for var in variants}
        for _ in range(repeats):
            for var in variants:
                t = time.perf_counter()
                run(var, *args[var])
                times[var].append(time.perf_counter() - t)
    med = {var: statistics.median(t) for var, t in times.items()}
    return dict(shape=shape, res=res, tokens=n, image_tokens=n_img, heads=heads, variants=variants,
                seconds={var: round(m, 4) for var, m in med.items()},
                ratio_to_plain={var: round(m / med["plain"], 3) for var, m in med.items()},
                reposition_over_materialised=round(med["reposition"] / med["materialised"], 3)
                if "materialised" in med else None,
                max_abs_difference=err, nxn_map_bytes=map_bytes)


def _peak_child(shape: str, res: int, variant: str) -> int:
    torch.set_num_threads(2)
    args = setup(shape, res, variant)
    with torch.no_grad():
        return layers.extra_peak_bytes(lambda: run(variant, *args))


def main() -> None:
    ap = layers.bench_parser(__doc__)
    ap.add_argument("--max-map-gb", type=float, default=4.0,
                    help="leave out the materialised variant where one N×N map exceeds this")
    args = ap.parse_args()
    if layers.answer_peak_child(args, _peak_child):
        return
    torch.set_num_threads(2)
    rows = []
    for res in (512,) if args.quick else (512, 1024):
        for shape in args.shapes:
            r = time_variants(shape, res, args.repeats, args.max_map_gb)
            r["extra_peak_bytes"] = layers.peak_memory(shape, res, __file__, tuple(r["variants"]))
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="IsolationAttention at one attention core, [reference, reference, scene] (ratios: same run)")
        for col in ("layer", "res", "tokens", "isolation / plain", "reposition / plain", "materialised / plain",
                    "reposition / materialised", "peak MB plain / isolation / reposition / materialised",
                    "N×N map MB", "max |Δ|"):
            t.add_column(col, justify="right")
        for r in rows:
            def cell(x, fmt):
                return "—" if x is None else format(x, fmt)

            mb = " / ".join(cell(r["extra_peak_bytes"].get(v) and r["extra_peak_bytes"][v] / 2**20, ".0f")
                            for v in VARIANTS)
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), *(cell(r["ratio_to_plain"].get(v), ".2f")
                                                                     for v in VARIANTS[1:]),
                      cell(r["reposition_over_materialised"], ".2f"), mb, f"{r['nxn_map_bytes'] / 2**20:.0f}",
                      cell(r["max_abs_difference"], ".1e"))
        Console(width=220).print(t)
    except ImportError:
        pass
    emit({"bench": "isolation", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "live_memory": layers.live_memory, "rows": rows},
         args.json)


if __name__ == "__main__":
    main()
