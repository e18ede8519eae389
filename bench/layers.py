"""Per-layer time and peak memory of attnctl processors vs the stock ones, at real layer shapes.

    python bench/layers.py                 # SD3.5-large and FLUX.1-dev layers, 512² and 1024² token counts
    python bench/layers.py --quick         # 512² only
    python bench/layers.py --json out.json

For every layer shape it times, in the same process and interleaved: the stock processor, the attnctl
processor with no active control, and the attnctl processor with an ``AttentionProbe`` on 4 text tokens
(each timed on the whole processor call — projections included — and on the attention core alone), and
measures the extra peak memory of one call of each in a fresh subprocess. The stock core is the stock processor's
own call: for SD3 ``F.scaled_dot_product_attention`` on contiguous ``(B, H, N, D)`` (``JointAttnProcessor2_0``), for
FLUX diffusers' ``dispatch_attention_fn`` on ``(B, N, H, D)``; attnctl's core is its processor's call on
``(B, N, H, D)``. ``--shapes`` picks the layers. Absolute times on a shared CPU
are noise; the ratios are the figures. Weights are random: time and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from report import emit, positive_int, resolution

# Real layer shapes: (heads, head_dim, text tokens). Image tokens = (res / 16)² for both families.
SHAPES = {
    "sd3.5-large": dict(family="sd3", heads=38, head_dim=64, text=77 + 256),
    "flux.1-dev-double": dict(family="flux", kind="double", heads=24, head_dim=128, text=512),
    "flux.1-dev-single": dict(family="flux", kind="single", heads=24, head_dim=128, text=512),
}
VARIANTS = ("stock", "attnctl", "probe4")


def attention_core(shape: str, res: int, batch: int, rotary: bool = False):
    """Random ``q, k, v`` of one attention call of the layer ``shape`` at ``res``² (``batch`` rows, seed 0), with the
    ``SiteCall`` and ``RunState`` a control sees there: ``(q, k, v, call, state, generator)``. ``rotary``: random RoPE
    tables in the call (FLUX), for controls that move keys between positions."""
    from attnctl.controls.base import RunState
    from attnctl.layout import TokenLayout
    from attnctl.processors.base import SiteCall
    from attnctl.sites import Site

    spec = SHAPES[shape]
    heads, d, n_text = spec["heads"], spec["head_dim"], spec["text"]
    side = res // 16
    n = side * side + n_text
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, d, generator=g) for _ in range(3))
    tables = None
    if rotary:
        theta = (torch.rand(n, d // 2, generator=g) * 6).repeat_interleave(2, 1)
        tables = theta.cos(), theta.sin()
    image_first = spec["family"] == "sd3"
    site = Site("transformer_blocks.0.attn", 0, "sd3_joint" if image_first else "flux_double", heads, d)
    call = SiteCall(site, batch, n, n_text, image_first, q.device, q.dtype, tables)
    state = RunState(step=1, num_steps=2, roles=["cond"] * batch,
                     layout=TokenLayout(spec["family"], n_text, (side, side)))
    return q, k, v, call, state, g


@dataclass
class Layer:
    attn: torch.nn.Module
    kwargs: dict
    controller: object
    stock: object
    n_img: int
    n_text: int


def build(shape: str, res: int, variant: str) -> Layer:
    """One attention module of the real width, its inputs, and the processor for ``variant``."""
    import attnctl
    from attnctl.layout import TokenLayout

    spec = SHAPES[shape]
    heads, hd, n_text = spec["heads"], spec["head_dim"], spec["text"]
    dim = heads * hd
    side = res // 16
    n_img = side * side
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if spec["family"] == "sd3":
            from diffusers import SD3Transformer2DModel

            tr = SD3Transformer2DModel(num_layers=1, num_attention_heads=heads, attention_head_dim=hd,
                                       joint_attention_dim=64, caption_projection_dim=dim, pooled_projection_dim=64,
                                       qk_norm="rms_norm", sample_size=side * 2, pos_embed_max_size=side * 2,
                                       in_channels=4, out_channels=4)
            attn = tr.transformer_blocks[0].attn
            kwargs = dict(hidden_states=torch.randn(1, n_img, dim, generator=g),
                          encoder_hidden_states=torch.randn(1, n_text, dim, generator=g))
        else:
            from diffusers import FluxTransformer2DModel

            double = spec["kind"] == "double"
            tr = FluxTransformer2DModel(num_layers=1 if double else 0, num_single_layers=0 if double else 1,
                                        num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                        joint_attention_dim=64, pooled_projection_dim=64,
                                        axes_dims_rope=(16, 56, 56))
            attn = (tr.transformer_blocks[0] if double else tr.single_transformer_blocks[0]).attn
            ids = torch.zeros(n_text + n_img, 3)
            ids[n_text:, 1] = torch.arange(side).repeat_interleave(side).float()
            ids[n_text:, 2] = torch.arange(side).repeat(side).float()
            rope = tr.pos_embed(ids)
            if double:
                kwargs = dict(hidden_states=torch.randn(1, n_img, dim, generator=g),
                              encoder_hidden_states=torch.randn(1, n_text, dim, generator=g), image_rotary_emb=rope)
            else:
                kwargs = dict(hidden_states=torch.randn(1, n_text + n_img, dim, generator=g), image_rotary_emb=rope)
    stock = attn.processor
    controller = None
    if variant != "stock":
        controls = [attnctl.AttentionProbe(tokens=[3, 4, 5, 6])] if variant == "probe4" else []
        controller = attnctl.Controller(tr, controls)
        controller.close()  # no hooks: we call the module directly and set the run state ourselves
        layout = TokenLayout(spec["family"], n_text, (side, side))
        controller.begin_run(1, layout=layout, roles=["cond"])
        site = next(s for s in controller.sites if s.name.endswith(".attn"))
        from attnctl.processors import processor_for

        attn.set_processor(processor_for(site, controller))
    return Layer(attn, kwargs, controller, stock, n_img, n_text)


def core_inputs(layer: Layer):
    """q, k, v of the layer in dispatcher layout, ``(B, N, H, D)`` (the attention core without projections)."""
    h = layer.attn.heads
    n = layer.n_img + layer.n_text
    d = layer.kwargs["hidden_states"].shape[-1] // h
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, n, h, d, generator=g) for _ in range(3)]


def stock_sd3(layer: Layer) -> bool:
    """Whether the layer runs diffusers' stock SD3 processor, ``JointAttnProcessor2_0``: it concatenates q, k, v as
    contiguous ``(B, H, N, D)`` and calls ``F.scaled_dot_product_attention`` itself, where FLUX's stock processors
    and attnctl's hand ``(B, N, H, D)`` to diffusers' ``dispatch_attention_fn``."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return layer.controller is None and isinstance(layer.attn.processor, JointAttnProcessor2_0)


def core_layout(layer: Layer, q, k, v) -> list:
    """``q, k, v`` from :func:`core_inputs` laid out as the layer's processor hands them to its attention call
    (a copy, made before the timing: the layout is what each processor's own concatenation gives)."""
    if stock_sd3(layer):
        return [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    return [q, k, v]


def run_core(layer: Layer, q, k, v):
    """The layer's attention core on ``q, k, v`` laid out by :func:`core_layout`; ``(B, N, H, D)`` out."""
    from attnctl.processors.attend import attend, fused_attention

    mask = layer.kwargs.get("attention_mask")  # the layer's own mask, if it is given one (FLUX's text padding)
    if stock_sd3(layer):  # the stock SD3 processor's own call (it takes no mask)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False).transpose(1, 2)
    if layer.controller is None:
        return fused_attention(q, k, v, attn_mask=mask)
    proc = layer.attn.processor
    from attnctl.processors.base import SiteCall

    call = SiteCall(proc.site, 1, q.shape[1], layer.n_text, proc.site.family == "sd3", q.device, q.dtype)
    contribs = layer.controller.contributions(call, q, k, v)
    return attend(q, k, v, contribs, attn_mask=mask) if contribs else fused_attention(q, k, v, attn_mask=mask)


def time_interleaved(layers: dict[str, Layer], repeats: int, after_warmup=None) -> dict:
    """Median seconds of each variant's whole layer call and of its attention core (``run_core`` on the same
    q, k, v), timed interleaved so load on the machine hits every variant alike, and the ratios to
    ``layers["stock"]``. ``after_warmup()`` runs between the warm-up and the timed calls."""
    core = core_inputs(layers["stock"])
    cores = {v: core_layout(layer, *core) for v, layer in layers.items()}
    times: dict[str, list[float]] = {v: [] for v in layers}
    core_times: dict[str, list[float]] = {v: [] for v in layers}
    with torch.no_grad():
        for layer in layers.values():  # warm-up
            layer.attn(**layer.kwargs)
        if after_warmup is not None:
            after_warmup()
        for _ in range(repeats):
            for v, layer in layers.items():
                t = time.perf_counter()
                layer.attn(**layer.kwargs)
                times[v].append(time.perf_counter() - t)
                t = time.perf_counter()
                run_core(layer, *cores[v])
                core_times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(t) for v, t in times.items()}
    cmed = {v: statistics.median(t) for v, t in core_times.items()}
    return dict(layer_s={v: round(m, 4) for v, m in med.items()},
                layer_ratio={v: round(m / med["stock"], 3) for v, m in med.items()},
                core_s={v: round(m, 4) for v, m in cmed.items()},
                core_ratio={v: round(m / cmed["stock"], 3) for v, m in cmed.items()})


def time_variants(shape: str, res: int, repeats: int) -> dict:
    layers = {v: build(shape, res, v) for v in VARIANTS}
    n = layers["stock"].n_img + layers["stock"].n_text
    return dict(shape=shape, res=res, tokens=n, heads=layers["stock"].attn.heads,
                **time_interleaved(layers, repeats), nxn_map_bytes=n * n * layers["stock"].attn.heads * 4)


def _peak_child(shape: str, res: int, variant: str) -> int:
    """In a fresh process: extra peak RSS (bytes) of one layer call beyond its inputs and weights."""
    torch.set_num_threads(2)
    layer = build(shape, res, variant)
    with torch.no_grad():
        return extra_peak_bytes(lambda: layer.attn(**layer.kwargs))


def extra_peak_bytes(fn) -> int:
    """Peak resident memory of ``fn()`` beyond what the process holds before it (Linux: VmHWM after a reset)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status; peak memory needs Linux")


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc settings of the ``--live-memory`` children: every block of 128 KiB or more is its own mapping, returned to
the system when freed. By default glibc raises that threshold after the first large free and keeps later freed
blocks in its heap, so a loop that allocates and frees chunk-sized temporaries (checkpointed chunks of query rows)
grows the resident set chunk by chunk although only one chunk is live: the default peak is what a CPU process
really holds, the live peak is what the algorithm needs (and what a caching GPU allocator sees)."""

live_memory = False
"""Run the peak children with :data:`LIVE_MEMORY_ENV` (set from ``--live-memory`` by :func:`answer_peak_child`)."""

peak_jobs = 1
"""How many peak children run at once (``--peak-jobs``, set by :func:`answer_peak_child`). Each child's peak is its
own process's, so running several at once changes no figure, only what the machine must hold: one at a time by
default, since a materialised variant at 1024² alone takes a good part of this machine's memory."""


def peak_memory(shape: str, res: int, script: str = __file__, variants: tuple[str, ...] = VARIANTS,
                extra: tuple[str, ...] = ()) -> dict:
    """Extra peak memory of one call of each variant, each in a fresh ``script --peak-child SHAPE RES VARIANT
    [extra…]``: what its child printed (bytes, or whatever JSON the script's child returns)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, **LIVE_MEMORY_ENV} if live_memory else None

    def child(v: str) -> Any:
        cmd = [sys.executable, script, "--peak-child", shape, str(res), v, *extra]
        run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(run.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=max(1, peak_jobs)) as pool:
        return dict(zip(variants, pool.map(child, variants), strict=True))


def variants_at(variants: tuple[str, ...], res: int, materialise_up_to: int) -> tuple[str, ...]:
    """The variants a benchmark runs at ``res``: its last, materialised one only up to ``materialise_up_to`` (its maps
    grow as N², and at 1024² some need more memory than this machine has)."""
    return variants if res <= materialise_up_to else variants[:-1]


def add_materialise_up_to(ap: argparse.ArgumentParser) -> None:
    """``--materialise-up-to RES`` for a benchmark whose last variant is a materialised reference."""
    ap.add_argument("--materialise-up-to", type=resolution, default=1024,
                    help="largest resolution of the materialised variant (its maps grow as N²)")


def bench_parser(doc: str, shapes: bool = True) -> argparse.ArgumentParser:
    """The options every layer benchmark takes: ``--quick``, ``--repeats``, ``--shapes``, ``--json``, ``--live-memory``
    and the hidden ``--peak-child SHAPE RES VARIANT`` that :func:`peak_memory` runs the script with."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512² token counts only")
    ap.add_argument("--repeats", type=positive_int, default=3)
    if shapes:
        ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--live-memory", action="store_true",
                    help="measure peak memory with glibc returning freed blocks at once (the live tensors' peak, "
                         "not glibc's heap retention; see layers.LIVE_MEMORY_ENV)")
    ap.add_argument("--peak-jobs", type=positive_int, default=1,
                    help="peak-memory children run at once (the figures do not change; small runs finish sooner)")
    ap.add_argument("--peak-child", nargs=3, help=argparse.SUPPRESS)
    return ap


def answer_peak_child(args: argparse.Namespace, child, *extra) -> bool:
    """When the script runs as a peak-memory child: print ``child(shape, res, variant, *extra)`` (JSON) and say so."""
    global live_memory, peak_jobs
    live_memory = bool(getattr(args, "live_memory", False))
    peak_jobs = int(getattr(args, "peak_jobs", 1))
    if not args.peak_child:
        return False
    shape, res, variant = args.peak_child
    print(json.dumps(child(shape, int(res), variant, *extra)))
    return True


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    if answer_peak_child(args, _peak_child):
        return
    torch.set_num_threads(2)
    rows = []
    for res in (512,) if args.quick else (512, 1024):
        for shape in args.shapes:
            r = time_variants(shape, res, args.repeats)
            r["extra_peak_bytes"] = peak_memory(shape, res)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="attnctl processor vs stock, per layer (ratios: same run; 1.00 = stock)")
        for col in ("layer", "res", "tokens", "no-control ×", "probe4 ×", "core no-ctl ×", "core probe4 ×",
                    "stock peak MB", "no-ctl peak MB", "probe4 peak MB", "one N×N map MB"):
            t.add_column(col, justify="right")
        for r in rows:
            mb = {k: f"{v / 2**20:.0f}" for k, v in r["extra_peak_bytes"].items()}
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), f"{r['layer_ratio']['attnctl']:.3f}",
                      f"{r['layer_ratio']['probe4']:.3f}", f"{r['core_ratio']['attnctl']:.3f}",
                      f"{r['core_ratio']['probe4']:.3f}", mb["stock"], mb["attnctl"], mb["probe4"],
                      f"{r['nxn_map_bytes'] / 2**20:.0f}")
        Console(width=200).print(t)
    except ImportError:
        pass
    result = {"bench": "layers", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "live_memory": live_memory, "rows": rows}
    emit(result, args.json)


if __name__ == "__main__":
    main()
