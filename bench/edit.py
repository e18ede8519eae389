"""What UnifyEdit's gradient pass costs at one attention layer of real shape, against the stock layer.

    python bench/edit.py                   # SD3.5-large and FLUX.1-dev layers, 512² and 1024² token counts
    python bench/edit.py --quick           # 512² only
    python bench/edit.py --res 256 --shapes flux.1-dev-single --repeats 1 --chunk-elems 786432
                                           # a smoke run (the test's): the unify variant in 4 chunks of 64 rows
    python bench/edit.py --json out.json
    python bench/edit.py --res 1024 --live-memory   # peak memory of the live tensors (see layers.LIVE_MEMORY_ENV)

An edit's gradient pass runs two rows, the source ``z^s_t`` and the target ``z_t``, through the sites the losses
read; at each such site UnifyEdit takes the self-attention gap between the two rows' image→image maps and the edit
words' maps of the target row. Layers and inputs come from ``bench/layers.py`` with a batch of two rows; the source
prompt is "a red circle and a blue square", the target "a green circle and a blue square" (one token per word, as
``bench/regulation.py`` lays them out). Variants, timed interleaved in the same run:

- ``stock``: the stock processor's forward of the two rows, no gradients (what the step's own forward costs here);
- ``stock_grad``: the stock layer's forward and the backward of a scalar of its outputs (image and, where the layer
  has one, text stream) to the layer's input, the cost any latent-gradient method pays for a layer its gradient
  passes through;
- ``unify_site``: the gradient pass at a site the losses read: the attnctl processor's forward with UnifyEdit's
  defaults (both terms, the edit mask by Otsu on the source's map of "red"), then one backward per term to the
  layer's input, as ``attnctl.edit`` runs them, each of the term plus the same scalar of the outputs. Every such
  site but the deepest pays this: each term's backward carries the gradient the later sites' maps send back through
  the layer's output (V, ``to_out``, ``to_add_out``) besides the maps' own. The image×image maps go in
  checkpointed chunks of query rows;
- ``unify``: the terms alone, what the deepest site the losses read pays (no later site reads its output);
- ``share``: RF-Solver-Edit's value sharing at a site it acts at: the attnctl processor's forward of the two rows
  with the target row reading the source row's values (``ValueSharing``; no gradients) — against ``stock`` it is
  the cost of the swap itself, since the extra forward of the source rows is the ``stock`` row's second row;
- ``unify_materialised``: the same with the whole ``heads × N_img × N_img`` maps at once, the plain way to write the
  loss. At 1024² one SD3.5-large map is 2.4 GB a row and this variant alone needs about 10 GB; ``--materialise-up-to
  512`` leaves it out above 512².

The losses and gradients of ``unify`` and ``unify_materialised`` are compared (``max_rel_diff``). The extra peak
memory of one call of each variant is measured in a fresh subprocess (``bench/layers.py``'s method: VmHWM after a
reset minus VmRSS before); ``map_bytes`` is one float32 ``heads · N_img · N_img`` map of one row, what the chunks
avoid holding. Weights are random.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (the layer builders and the peak-memory method)
from layout import output_scalar  # noqa: E402
from regulation import WORDS, prompt_layout  # noqa: E402
from report import emit, positive_int, resolution  # noqa: E402

VARIANTS = ("stock", "stock_grad", "unify_site", "unify", "share", "unify_materialised")
TARGET_WORDS = [("green" if w == "red" else w) for w in WORDS]


def two_rows(kwargs: dict) -> dict:
    """The layer's inputs with a second row: a different latent for the target (the RoPE tables are shared)."""
    out = dict(kwargs)
    for name in ("hidden_states", "encoder_hidden_states"):
        if name in kwargs:
            x = kwargs[name]
            other = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            out[name] = torch.cat([x, other if name == "hidden_states" else x])
    return out


def build(shape: str, res: int, variant: str):
    """The layer with two input rows, and for ``unify*`` the control bound to its controller in a gradient pass."""
    from attnctl import UnifyEdit, ValueSharing

    guided = variant.startswith("unify")
    layer = layers.build(shape, res, "attnctl" if guided or variant == "share" else "stock")
    layer.kwargs = two_rows(layer.kwargs)
    control = None
    if guided:
        ctl = layer.controller
        control = UnifyEdit(sites="all")
        ctl.controls.append(control)
        control.bind(ctl)
        ctl._latent_control = control  # a bare layer has no pipeline to check: declare the gradient pass's control
        spec, side = layers.SHAPES[shape], res // 16
        source = prompt_layout(spec, layer.n_text, side)
        target = prompt_layout(spec, layer.n_text, side, TARGET_WORDS)
        ctl.begin_run(1, layout=target, roles=["cond", "cond"])
        ctl._stop_site = None  # a lone layer: the gradient pass ends with it anyway, so nothing is stopped after it
        ctl.state.row_layouts = [source, target]
        ctl.state.gradient_pass = True
    if variant == "share":
        ctl = layer.controller
        ctl.controls.append(UnifyEdit(sites="all"))  # value sharing belongs to an edit (its bind checks)
        control = ValueSharing(weight=1.0, sites="all")
        ctl.controls.append(control)
        control.bind(ctl)
        ctl.begin_run(1, roles=["cond", "cond"], layout=prompt_layout(layers.SHAPES[shape], layer.n_text, res // 16))
    return layer, control


CHUNK_ELEMS: int | None = None
"""``--chunk-elems``: the logits per checkpointed chunk of the ``unify`` variant (default: attnctl's own)."""


@contextlib.contextmanager
def materialised(on: bool):
    """UnifyEdit's self-attention gap in one chunk (the whole maps, no checkpointing) while ``on``; else in chunks
    of ``CHUNK_ELEMS`` logits when that is set."""
    from attnctl.controls import unify_edit

    chunked = unify_edit.self_attention_gap
    if on:
        unify_edit.self_attention_gap = functools.partial(chunked, max_elems=1 << 62)
    elif CHUNK_ELEMS is not None:
        unify_edit.self_attention_gap = functools.partial(chunked, max_elems=CHUNK_ELEMS)
    try:
        yield
    finally:
        unify_edit.self_attention_gap = chunked


def one_call(layer, control, variant: str) -> tuple[dict, torch.Tensor] | None:
    """One call of ``variant``; for ``unify*`` its losses and the summed gradients of the two terms."""
    if variant == "stock":
        with torch.no_grad():
            layer.attn(**layer.kwargs)
        return None
    if variant == "share":
        with torch.no_grad(), control.pairing([1], [0], 1.0, 0):
            layer.attn(**layer.kwargs)
        assert control.shared_steps == [0]
        return None
    x = layer.kwargs["hidden_states"].detach().requires_grad_(True)
    with torch.enable_grad(), materialised(variant == "unify_materialised"):
        out = layer.attn(**{**layer.kwargs, "hidden_states": x})
        if control is None:
            (grad,) = torch.autograd.grad(output_scalar(out), x)
            return None
        losses = control.edit_losses()
        terms = [n for n, loss in losses.items() if loss is not None]
        assert terms == ["sa", "ca"], f"both terms should be on, got {terms}"
        through_output = output_scalar(out) if variant == "unify_site" else 0.0  # not at the deepest site
        grads = [torch.autograd.grad(losses[n] + through_output, x, retain_graph=i + 1 < len(terms))[0]
                 for i, n in enumerate(terms)]
    grad = torch.stack(grads)
    assert torch.isfinite(grad).all()
    return {n: float(losses[n].detach()) for n in terms}, grad


def max_rel_diff(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> float:
    """The largest relative difference between two calls' losses and gradients."""
    diffs = [abs(a[0][n] - b[0][n]) / max(abs(b[0][n]), 1e-12) for n in a[0]]
    diffs.append(float((a[1] - b[1]).abs().max() / b[1].abs().max().clamp_min(1e-30)))
    return max(diffs)


def time_variants(shape: str, res: int, repeats: int, materialise_up_to: int) -> dict:
    names = layers.variants_at(VARIANTS, res, materialise_up_to)
    built = {v: build(shape, res, v) for v in names if v != "unify_materialised"}
    if "unify_materialised" in names:
        built["unify_materialised"] = built["unify"]  # the same weights and inputs: the two forms must agree
    results = {v: one_call(*built[v], v) for v in names}  # warm-up, and the values compared below
    times: dict[str, list[float]] = {v: [] for v in names}
    for _ in range(repeats):
        for v in names:
            t = time.perf_counter()
            one_call(*built[v], v)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(t) for v, t in times.items()}
    stock = built["stock"][0]
    heads = stock.attn.heads
    row = dict(shape=shape, res=res, tokens=stock.n_img + stock.n_text, image_tokens=stock.n_img,
               text_tokens=stock.n_text, heads=heads, seconds={v: round(m, 4) for v, m in med.items()},
               ratio_to_stock={v: round(m / med["stock"], 3) for v, m in med.items()},
               site_over_stock_grad=round(med["unify_site"] / med["stock_grad"], 3),
               unify_over_stock_grad=round(med["unify"] / med["stock_grad"], 3),
               share_over_stock=round(med["share"] / med["stock"], 3),
               losses=results["unify"][0], map_bytes=heads * stock.n_img * stock.n_img * 4)
    from attnctl.controls.layout_guidance import MAP_CHUNK_ELEMS

    per_chunk = max(1, (CHUNK_ELEMS or MAP_CHUNK_ELEMS) // (2 * heads * stock.n_img))  # query rows (as attnctl)
    row["unify_chunks"] = -(-stock.n_img // per_chunk)
    if "unify_materialised" in med:
        row["chunked_over_materialised"] = round(med["unify"] / med["unify_materialised"], 3)
        row["max_rel_diff"] = max_rel_diff(results["unify"], results["unify_materialised"])
    return row


def _peak_child(shape: str, res: int, variant: str) -> int:
    torch.set_num_threads(2)
    layer, control = build(shape, res, variant)
    return layers.extra_peak_bytes(lambda: one_call(layer, control, variant))


def main() -> None:
    ap = layers.bench_parser(__doc__)
    ap.add_argument("--res", type=resolution, nargs="+", help="resolutions (default: 512 1024; --quick: 512)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (the peak children use 2)")
    layers.add_materialise_up_to(ap)  # at 1024² the materialised variant needs about 10 GB
    ap.add_argument("--chunk-elems", type=positive_int,
                    help="logits per checkpointed chunk of the unify variants in the timed run (default: attnctl's; "
                         "a small value splits a small layer into several chunks, checked against the materialised "
                         "maps); the peak-memory children keep attnctl's")
    args = ap.parse_args()
    global CHUNK_ELEMS
    CHUNK_ELEMS = args.chunk_elems
    if layers.answer_peak_child(args, _peak_child):
        return
    torch.set_num_threads(args.threads)
    rows = []
    for res in args.res or ((512,) if args.quick else (512, 1024)):
        for shape in args.shapes:
            r = time_variants(shape, res, args.repeats, args.materialise_up_to)
            r["extra_peak_bytes"] = layers.peak_memory(shape, res, __file__,
                                                       layers.variants_at(VARIANTS, res, args.materialise_up_to))
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="UnifyEdit's gradient pass at one layer, two rows (ratios: same run; 1.00 = stock forward)")
        for col in ("layer", "res", "tokens", "stock fwd+bwd ×", "loss site ×", "loss site / stock fwd+bwd",
                    "deepest site (terms only) / stock fwd+bwd", "share ×", "chunked / materialised time",
                    "max rel diff", "peak MB stock / fwd+bwd / site / deepest / share / materialised",
                    "peak unify / materialised",
                    "one row's N_img² map MB"):
            t.add_column(col, justify="right")
        for r in rows:
            peak = r["extra_peak_bytes"]
            mb = " / ".join(f"{peak[v] / 2**20:.0f}" if v in peak else "–" for v in VARIANTS)
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), f"{r['ratio_to_stock']['stock_grad']:.2f}",
                      f"{r['ratio_to_stock']['unify_site']:.2f}", f"{r['site_over_stock_grad']:.2f}",
                      f"{r['unify_over_stock_grad']:.2f}",
                      f"{r['share_over_stock']:.2f}",
                      f"{r['chunked_over_materialised']:.2f}" if "chunked_over_materialised" in r else "–",
                      f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "–", mb,
                      f"{peak['unify'] / peak['unify_materialised']:.2f}" if "unify_materialised" in peak else "–",
                      f"{r['map_bytes'] / 2**20:.0f}")
        Console(width=200).print(t)
    except ImportError:
        pass
    emit({"bench": "edit", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "live_memory": layers.live_memory, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
