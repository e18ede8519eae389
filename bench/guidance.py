"""SoftPAG cost per layer, and one batched 3-way guidance forward vs three separate passes.

    python bench/guidance.py              # SD3.5-large and FLUX.1-dev layers at 512² and 1024² token counts
    python bench/guidance.py --quick      # 512² only
    python bench/guidance.py --quick --shapes flux.1-dev-single --repeats 1 --no-real-blocks   # the smallest run
    python bench/guidance.py --json out.json

(a) Per layer shape (builders of ``bench/layers.py``), timed interleaved in one process, batch = one
    ``"perturbed"`` row (the worst case for the ratio: no unperturbed rows share the stock cost):
    the stock processor; the attnctl processor with ``SoftPAG`` on a quarter of the heads — fused closed forms
    for ``joint`` identity, ``image`` identity (diffusers' PAG), ``joint`` mean-query and ``image`` uniform —
    and the *materialised* reference (the N×N map of the selected heads, mixed, @ V). Each on the whole
    processor call (projections included) and on the attention core alone. In fresh subprocesses: the extra
    peak RSS of one call (``/proc/self/clear_refs`` + ``VmHWM``, as bench/layers.py) and the largest single
    tensor allocation of the call (torch profiler), next to the size of one N×N map of the selected heads.
(b) The guidance forward: a transformer with ``[uncond, cond, perturbed]`` rows in one call vs three calls of
    one row (SoftPAG, ¼ of the heads), at the toy models' shapes and at one real block (SD3.5-large joint block;
    FLUX.1-dev double + single block) at 512². Outputs agree to float32 rounding.

Absolute times on a shared CPU are noise; the ratios (same run, interleaved) are the figures.
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
from layers import (  # noqa: E402
    SHAPES,
    Layer,
    answer_peak_child,
    bench_parser,
    build,
    core_inputs,
    extra_peak_bytes,
    peak_memory,
    run_core,
    time_interleaved,
)
from report import emit, positive_int  # noqa: E402

VARIANTS = ("stock", "joint", "image", "joint-meanq", "image-uniform", "materialised")
SOFTPAG = {
    "joint": dict(target="identity", scope="joint"),
    "image": dict(target="identity", scope="image"),
    "joint-meanq": dict(target="mean_query", scope="joint"),
    "image-uniform": dict(target="uniform", scope="image"),
}
U = 0.5  # an interior u: both the fused output and the target are used


def quarter(heads: int) -> list[int]:
    """Every fourth head (a quarter of them, spread over the head index)."""
    return list(range(0, heads, 4))


def _materialised_control():
    import attnctl

    class MaterialisedSoftPAG(attnctl.SoftPAG):
        """The reference: the full softmax map of the selected heads, mixed with the identity, @ V."""

        kind = "bench-materialised-softpag"

        def contribute(self, call, q, k, v, state):
            from attnctl.controls.softpag import _on_heads

            out = super().contribute(call, q, k, v, state)
            for c in out:  # the same selection; the selected heads' map materialised
                c.fn = _on_heads(lambda o, q_, k_, v_, u: _materialised_joint_identity(q_, k_, v_, u),
                                 self._head_spec(call.site), U)
            return out

    return MaterialisedSoftPAG


def _materialised_joint_identity(q, k, v, u):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # N×N per selected head
    a = torch.softmax(s, -1) * (1 - u)
    a.diagonal(dim1=-2, dim2=-1).add_(u)
    return torch.einsum("bhqk,bkhd->bqhd", a, v)


def build_softpag(shape: str, res: int, variant: str) -> Layer:
    """A layer from bench/layers.py with the attnctl processor and the variant's SoftPAG on ¼ of the heads."""
    import attnctl
    from attnctl.layout import TokenLayout
    from attnctl.processors import processor_for

    if variant == "stock":
        return build(shape, res, "stock")
    layer = build(shape, res, "attnctl")
    tr = layer.controller.transformer
    site = next(s for s in layer.controller.sites if s.name.endswith(".attn"))
    pairs = [(site.name, h) for h in quarter(site.heads)]
    if variant == "materialised":
        control = _materialised_control().from_pairs(pairs, u=U)
    else:
        control = attnctl.SoftPAG.from_pairs(pairs, u=U, **SOFTPAG[variant])
    ctl = attnctl.Controller(tr, [control])
    ctl.close()
    ctl.begin_run(1, layout=TokenLayout(site.family, layer.n_text, (res // 16, res // 16)), roles=["perturbed"])
    layer.attn.set_processor(processor_for(site, ctl))
    return Layer(layer.attn, layer.kwargs, ctl, layer.stock, layer.n_img, layer.n_text)


def time_layer(shape: str, res: int, repeats: int) -> dict:
    layers = {v: build_softpag(shape, res, v) for v in VARIANTS}
    core = core_inputs(layers["stock"])
    with torch.no_grad():
        ref = run_core(layers["materialised"], *core)
        errors = {"joint": float((run_core(layers["joint"], *core) - ref).abs().max())}
    heads = layers["stock"].attn.heads
    n = layers["stock"].n_img + layers["stock"].n_text
    return dict(shape=shape, res=res, tokens=n, heads=heads, softpag_heads=len(quarter(heads)),
                **time_interleaved(layers, repeats), max_abs_err_vs_materialised=errors,
                nxn_map_bytes_selected_heads=n * n * len(quarter(heads)) * 4,
                nxn_map_bytes_one_head=n * n * 4)


MASKED_VARIANTS = ("stock", "joint", "image", "joint-meanq", "image-uniform")


def time_masked(shape: str, res: int, repeats: int, padded: float = 0.25) -> dict:
    """A FLUX layer given a text padding mask (its ``attention_mask``: the last ``padded`` share of the text
    removed): each SoftPAG form applies the mask; ratios to the stock layer under the same mask."""
    layers = {}
    for v in MASKED_VARIANTS:
        layer = build_softpag(shape, res, v)
        keep = torch.ones(1, layer.n_text + layer.n_img, dtype=torch.bool)  # FLUX: text first
        keep[0, round(layer.n_text * (1 - padded)) : layer.n_text] = False
        layers[v] = Layer(layer.attn, {**layer.kwargs, "attention_mask": keep}, layer.controller, layer.stock,
                          layer.n_img, layer.n_text)
    n = layers["stock"].n_img + layers["stock"].n_text
    return dict(shape=shape, res=res, tokens=n, padded_text=padded, **time_interleaved(layers, repeats))


# ------------------------------------------------------------------------------------------ memory


def _peak_child(shape: str, res: int, variant: str) -> dict:
    """In a fresh process: extra peak RSS of one call, and the largest tensor allocated during a second call."""
    torch.set_num_threads(2)
    layer = build_softpag(shape, res, variant)
    with torch.no_grad():
        extra = extra_peak_bytes(lambda: layer.attn(**layer.kwargs))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            layer.attn(**layer.kwargs)
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)  # net bytes one op allocated
    return {"extra_peak_bytes": extra, "largest_alloc_bytes": int(largest)}


MEMORY_VARIANTS = ("stock", "joint", "image", "materialised")  # mean-query / uniform allocate like these


# ------------------------------------------------------------------------------------------ 3-way forward

TOY = {  # the shipped toy models' transformers (attnctl.toyworld.train.PRESETS), 32×32 px → 8×8 tokens
    "toy-sd3": dict(family="sd3", layers=6, single=0, heads=4, head_dim=32, text=48, side=8),
    "toy-flux": dict(family="flux", layers=2, single=4, heads=4, head_dim=32, text=24, side=8),
}
REAL = {  # one real block at 512²: SD3.5-large joint block; FLUX.1-dev one double + one single block
    "sd3.5-large-block": dict(family="sd3", layers=1, single=0, heads=38, head_dim=64, text=333, side=32),
    "flux.1-dev-blocks": dict(family="flux", layers=1, single=1, heads=24, head_dim=128, text=512, side=32),
}


def _transformer(spec: dict):
    dim = spec["heads"] * spec["head_dim"]
    if spec["family"] == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(num_layers=spec["layers"], num_attention_heads=spec["heads"],
                                     attention_head_dim=spec["head_dim"], joint_attention_dim=64,
                                     caption_projection_dim=dim, pooled_projection_dim=64, qk_norm="rms_norm",
                                     sample_size=spec["side"] * 2, pos_embed_max_size=spec["side"] * 2,
                                     in_channels=16, out_channels=16).eval()
    from diffusers import FluxTransformer2DModel

    rope = (8, 12, 12) if spec["head_dim"] == 32 else (16, 56, 56)
    return FluxTransformer2DModel(num_layers=spec["layers"], num_single_layers=spec["single"],
                                  num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"],
                                  in_channels=64, joint_attention_dim=64, pooled_projection_dim=64,
                                  axes_dims_rope=rope).eval()


def _inputs(spec: dict, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    side, text = spec["side"], spec["text"]
    if spec["family"] == "sd3":
        return dict(hidden_states=torch.randn(batch, 16, side * 2, side * 2, generator=g),
                    encoder_hidden_states=torch.randn(batch, text, 64, generator=g),
                    pooled_projections=torch.randn(batch, 64, generator=g),
                    timestep=torch.full((batch,), 500.0), return_dict=False)
    ids = torch.zeros(side * side, 3)
    ids[:, 1] = torch.arange(side).repeat_interleave(side).float()
    ids[:, 2] = torch.arange(side).repeat(side).float()
    return dict(hidden_states=torch.randn(batch, side * side, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=ids, txt_ids=torch.zeros(text, 3), return_dict=False)


def time_three_way(name: str, spec: dict, repeats: int) -> dict:
    import attnctl
    from attnctl.layout import TokenLayout

    tr = _transformer(spec)
    sites = attnctl.list_sites(tr)
    pag = attnctl.SoftPAG.from_pairs([(s.name, h) for s in sites for h in quarter(s.heads)], u=U)
    ctl = attnctl.Controller(tr, [pag])
    tr.set_attn_processor(ctl.processors())
    ctl.close()
    ctl.begin_run(1, layout=TokenLayout(spec["family"], spec["text"], (spec["side"], spec["side"])))
    three = _inputs(spec, 3)
    three["encoder_hidden_states"][2] = three["encoder_hidden_states"][1]  # perturbed = cond
    three["pooled_projections"][2] = three["pooled_projections"][1]
    one = [{k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 3 else v)
            for k, v in three.items()} for i in range(3)]
    roles = ["uncond", "cond", "perturbed"]

    def batched():
        ctl.state.roles = roles
        return tr(**three)[0]

    def separate():
        outs = []
        for r, kw in zip(roles, one, strict=True):
            ctl.state.roles = [r]
            outs.append(tr(**kw)[0])
        return torch.cat(outs)

    t_b, t_s = [], []
    with torch.no_grad():
        err = float((batched() - separate()).abs().max())  # also the warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            batched()
            t_b.append(time.perf_counter() - t)
            t = time.perf_counter()
            separate()
            t_s.append(time.perf_counter() - t)
    b, s = statistics.median(t_b), statistics.median(t_s)
    return dict(model=name, tokens=spec["side"] ** 2 + spec["text"], heads=spec["heads"],
                blocks=spec["layers"] + spec["single"], batched_s=round(b, 4), separate_s=round(s, 4),
                batched_over_separate=round(b / s, 3), max_abs_diff=err)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--no-real-blocks", action="store_true", help="(b) at toy shapes only")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    if answer_peak_child(args, _peak_child):
        return
    torch.set_num_threads(args.threads)
    layer_rows = []
    for res in (512,) if args.quick else (512, 1024):
        for shape in args.shapes:
            r = time_layer(shape, res, args.repeats)
            r["memory"] = peak_memory(shape, res, __file__, MEMORY_VARIANTS)
            layer_rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    masked_rows = []
    for shape in (s for s in args.shapes if SHAPES[s]["family"] == "flux"):
        r = time_masked(shape, 512, args.repeats)
        masked_rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    fwd_rows = []
    families = {SHAPES[s]["family"] for s in args.shapes}  # (b)'s real blocks of the families asked for
    real = {} if args.no_real_blocks else {k: v for k, v in REAL.items() if v["family"] in families}
    specs = {**TOY, **real}
    for name, spec in specs.items():
        r = time_three_way(name, spec, args.repeats if name in TOY else max(1, args.repeats - 1))
        fwd_rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    _print_tables(layer_rows, masked_rows, fwd_rows)
    result = {"bench": "guidance", "torch": torch.__version__, "threads": torch.get_num_threads(), "u": U,
              "layers": layer_rows, "masked": masked_rows, "three_way": fwd_rows}
    emit(result, args.json)


def _print_tables(layer_rows: list[dict], masked_rows: list[dict], fwd_rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    mb = 2**20
    t = Table(title=f"SoftPAG on ¼ of the heads (u={U}) vs the stock layer; ratios from the same run (1.00 = stock)")
    for col in ("layer", "res", "tokens", *[f"{v} ×" for v in VARIANTS[1:]], "core joint ×", "core image ×",
                "core materialised ×", "peak MB stock/joint/image/mat.", "largest alloc MB joint/image/mat.",
                "N×N map MB (¼ heads)"):
        t.add_column(col, justify="right")
    for r in layer_rows:
        m = r["memory"]
        t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), *[f"{r['layer_ratio'][v]:.3f}" for v in VARIANTS[1:]],
                  f"{r['core_ratio']['joint']:.3f}", f"{r['core_ratio']['image']:.3f}",
                  f"{r['core_ratio']['materialised']:.3f}",
                  "/".join(f"{m[v]['extra_peak_bytes'] / mb:.0f}" for v in ("stock", "joint", "image", "materialised")),
                  "/".join(f"{m[v]['largest_alloc_bytes'] / mb:.0f}" for v in ("joint", "image", "materialised")),
                  f"{r['nxn_map_bytes_selected_heads'] / mb:.0f}")
    Console(width=240).print(t)
    t = Table(title=f"under FLUX's text padding mask: SoftPAG on ¼ of the heads (u={U}) vs the stock layer with the "
                    "same mask")
    for col in ("layer", "res", "tokens", "padded text", *[f"{v} ×" for v in MASKED_VARIANTS[1:]],
                *[f"core {v} ×" for v in MASKED_VARIANTS[1:]]):
        t.add_column(col, justify="right")
    for r in masked_rows:
        t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), f"{r['padded_text']:.0%}",
                  *[f"{r['layer_ratio'][v]:.3f}" for v in MASKED_VARIANTS[1:]],
                  *[f"{r['core_ratio'][v]:.3f}" for v in MASKED_VARIANTS[1:]])
    Console(width=240).print(t)
    t = Table(title=r"one batched \[uncond, cond, perturbed] forward vs three one-row forwards (SoftPAG on ¼ heads)")
    for col in ("model", "blocks", "tokens", "heads", "batched s", "3 separate s", "batched / separate", "max |diff|"):
        t.add_column(col, justify="right")
    for r in fwd_rows:
        t.add_row(r["model"], str(r["blocks"]), str(r["tokens"]), str(r["heads"]), f"{r['batched_s']:.4f}",
                  f"{r['separate_s']:.4f}", f"{r['batched_over_separate']:.3f}", f"{r['max_abs_diff']:.1e}")
    Console(width=240).print(t)


if __name__ == "__main__":
    main()
