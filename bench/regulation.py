"""Time and extra peak memory of one regulated attention layer vs the stock one, at real layer shapes.

    python bench/regulation.py                 # SD3.5-large and FLUX.1-dev layers, 512² and 1024² token counts
    python bench/regulation.py --quick         # 512² only
    python bench/regulation.py --json out.json
    python bench/regulation.py --config '{"bias_scope": "text"}'   # any AttentionRegulation settings

Layers, inputs and the peak-memory method come from ``bench/layers.py`` (a fresh subprocess per measurement;
``/proc/self/clear_refs`` resets the peak-RSS mark, VmHWM after one call minus VmRSS before). Variants, timed
interleaved in one process on the whole processor call and on the attention core alone:

- ``stock``: the diffusers processor;
- ``attnctl``: the attnctl processor with no active control;
- ``regulation``: ``AttentionRegulation(targets=["circle", "square"])`` with the paper's defaults (20 inner
  iterations, text-normalised maps, start/end tokens restored) on a prompt whose target words take 2 CLIP +
  2 T5 tokens (SD3.5) or 2 T5 tokens (FLUX).

``inner_s`` is the time spent in the regulation's own callback (text log-sum-exp pass + 20 iterations; with
``bias_scope="text"`` the core's pass over the text keys runs outside it, in the layer time);
``nxn_map_bytes`` is one float32 ``N × N`` attention map over all heads, what a materialising implementation
would hold. Weights are random: time and memory do not depend on them.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (bench/layers.py: the layer builders and the peak-memory method)
from report import json_object  # noqa: E402

VARIANTS = ("stock", "attnctl", "regulation")
WORDS = ["a", "red", "circle", "and", "a", "blue", "square"]


def prompt_layout(spec: dict, n_text: int, side: int, prompt_words: list[str] = WORDS):
    """A layout whose prompt is ``prompt_words`` (default "a red circle and a blue square"), one token per word."""
    from attnctl.layout import TextSegment, TokenLayout

    def words(offset: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for i, w in enumerate(prompt_words):
            out.setdefault(w, []).append(offset + i)
        return {w: tuple(p) for w, p in out.items()}

    if spec["family"] == "sd3":  # CLIP: <bos> words <eos> ...; T5: words </s> ...
        segs = (TextSegment("clip", 0, 77, words(1)), TextSegment("t5", 77, n_text - 77, words(0)))
    else:
        segs = (TextSegment("t5", 0, n_text, words(0)),)
    return TokenLayout(spec["family"], n_text, (side, side), segs, " ".join(prompt_words))


def build(shape: str, res: int, variant: str, **config):
    """``layers.build`` plus, for ``regulation``, the control attached to the layer's controller."""
    from attnctl import AttentionRegulation

    layer = layers.build(shape, res, "stock" if variant == "stock" else "attnctl")
    reg = None
    if variant == "regulation":
        ctl = layer.controller
        reg = AttentionRegulation(targets=["circle", "square"], sites="all", steps=1.0, **config)
        ctl.controls.append(reg)
        reg.bind(ctl)
        side = res // 16
        ctl.begin_run(1, layout=prompt_layout(layers.SHAPES[shape], layer.n_text, side), roles=["cond"])
        inner = reg._bias

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            reg.inner_times.append(time.perf_counter() - t)
            return out

        reg.inner_times = []
        reg._bias = timed
    return layer, reg


def time_variants(shape: str, res: int, repeats: int, config: dict) -> dict:
    built = {v: build(shape, res, v, **config) for v in VARIANTS}
    lays = {v: b[0] for v, b in built.items()}
    reg = built["regulation"][1]
    timed = layers.time_interleaved(lays, repeats, after_warmup=reg.inner_times.clear)
    stock = lays["stock"]
    n = stock.n_img + stock.n_text
    heads = stock.attn.heads
    n_cols = len(reg.resolved_targets()[0].positions) + len(reg.resolved_targets()[0].special)
    rec = reg.records[-1]
    return dict(
        shape=shape, res=res, tokens=n, image_tokens=stock.n_img, text_tokens=stock.n_text, heads=heads,
        regulated_columns=n_cols,
        **timed,
        inner_s=round(statistics.median(reg.inner_times), 4),
        inner_loss_first_best=[round(rec.losses[0], 4), round(rec.best_loss, 4)],
        nxn_map_bytes=n * n * heads * 4,
        column_logits_bytes=stock.n_img * n_cols * heads * 4,
    )


def _peak_child(shape: str, res: int, variant: str, config: dict) -> int:
    """In a fresh process: extra peak RSS (bytes) of one layer call beyond its inputs and weights."""
    torch.set_num_threads(2)
    layer, _ = build(shape, res, variant, **config)
    with torch.no_grad():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux)
            f.write("5")
        before = layers._status_kb("VmRSS")
        layer.attn(**layer.kwargs)
        after = layers._status_kb("VmHWM")
    return max(0, after - before) * 1024


def main() -> None:
    ap = layers.bench_parser(__doc__)
    ap.add_argument("--config", type=json_object, default={},
                    help="AttentionRegulation settings (JSON) besides the defaults")
    args = ap.parse_args()
    config = args.config
    if layers.answer_peak_child(args, _peak_child, config):
        return
    torch.set_num_threads(2)
    rows = []
    for res in (512,) if args.quick else (512, 1024):
        for shape in args.shapes:
            r = time_variants(shape, res, args.repeats, config)
            r["extra_peak_bytes"] = layers.peak_memory(shape, res, __file__, VARIANTS,
                                                       ("--config", json.dumps(config)))
            r["control_extra_peak_bytes"] = r["extra_peak_bytes"]["regulation"] - r["extra_peak_bytes"]["stock"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    mb = 2**20
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="AttentionRegulation vs stock, one layer (ratios from the same run; 1.00 = stock)")
        for col in ("layer", "res", "tokens", "cols", "layer ×", "core ×", "inner s", "stock s",
                    "stock peak MB", "regulation peak MB", "control extra MB", "one N×N map MB"):
            t.add_column(col, justify="right")
        for r in rows:
            p = r["extra_peak_bytes"]
            t.add_row(r["shape"], str(r["res"]), str(r["tokens"]), str(r["regulated_columns"]),
                      f"{r['layer_ratio']['regulation']:.3f}", f"{r['core_ratio']['regulation']:.3f}",
                      f"{r['inner_s']:.3f}", f"{r['layer_s']['stock']:.3f}", f"{p['stock'] / mb:.0f}",
                      f"{p['regulation'] / mb:.0f}", f"{r['control_extra_peak_bytes'] / mb:.0f}",
                      f"{r['nxn_map_bytes'] / mb:.0f}")
        Console(width=200).print(t)
    except ImportError:
        pass
    result = {"bench": "regulation", "config": config, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "live_memory": layers.live_memory, "rows": rows}
    layers.emit(result, args.json)


if __name__ == "__main__":
    main()
