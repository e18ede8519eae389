"""The regulation benchmarks behind the docs' numbers run end to end, and the injected neglect does what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def from_diagnose(name: str):
    """A function of bench/regulation_diagnose.py (the bench folder is not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        import regulation_diagnose
    finally:
        sys.path.remove(str(BENCH))
    return getattr(regulation_diagnose, name)


PROMPT = "a red circle and a blue square"


def first_output(pipe, module: torch.nn.Module, controls=None):
    """What ``module`` returns at its first call in a one-step toy-sd3 generation of PROMPT (CFG: [uncond, cond])."""
    seen = []

    def keep(module, inputs, output):  # copies: the processor may reuse the buffers afterwards
        seen.append(tuple(t.detach().clone() for t in output) if isinstance(output, tuple)
                    else output.detach().clone())

    handle = module.register_forward_hook(keep)
    try:
        pipe(PROMPT, num_inference_steps=1, height=32, width=32, max_sequence_length=24, guidance_scale=4.5,
             generator=torch.Generator().manual_seed(0), output_type="np", controls=controls)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture
def run_bench(run_script):
    """``run_bench(script, *args, out=path)``: bench/script run on one thread, its JSON result."""

    def run(script: str, *args: str, out: Path) -> dict:
        done = run_script(BENCH / script, [*args, "--threads", "1", "--json", out])
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(out.read_text())

    return run


def test_regulation_eval_and_diagnose_run(tmp_path, run_bench):
    result = run_bench("regulation_eval.py", "--sets", "pair", "--limit", "1", "--seeds", "2", "--steps", "2",
                       "--targets", "phrases", "--configs", '{"iterations": 2}', out=tmp_path / "eval.json")
    rows = result["sets"]["pair"]["rows"]
    assert list(rows) == ["baseline", '{"iterations": 2}']
    reg = rows['{"iterations": 2}']
    assert reg["regulated_calls_per_image"] > 0 and reg["applied_map_loss"] < reg["plain_map_loss"]
    assert "plain_map_loss" not in rows["baseline"] and "paired" not in rows["baseline"]
    paired = reg["paired"]["presence"]  # config − baseline on the same prompt and seeds
    assert paired["n"] == 2 and paired["diff"] == round(reg["presence"] - rows["baseline"]["presence"], 4)
    assert all(0.0 <= row["presence"] <= 1.0 for row in rows.values())
    diag = run_bench("regulation_diagnose.py", "--limit", "1", "--seeds", "1", "--only", "steering", "neglect",
                     "--betas", "1", "--neglect-scales", "0.5", "--configs", '{"iterations": 2}',
                     out=tmp_path / "diag.json")
    assert list(diag["steering"]) == ["beta=0", "beta=1"] and "which_path" not in diag
    assert list(diag["neglect"]) == ["s=0.5 · no control", 's=0.5 · {"iterations": 2}']
    scoped = run_bench("regulation_diagnose.py", "--limit", "1", "--seeds", "1", "--only", "steering", "--betas", "3",
                       "--bias-scope", "text", out=tmp_path / "scoped.json")
    assert scoped["bias_scope"] == "text" and list(scoped["steering"]) == ["beta=0", "beta=3"]
    iso = run_bench("regulation_diagnose.py", "--limit", "1", "--seeds", "1", "--only", "text_isolation",
                    "--configs", '{"iterations": 2}', out=tmp_path / "iso.json")["text_isolation"]
    assert list(iso) == ["no regulation", '{"iterations": 2}', "isolated · no regulation",
                         'isolated · {"iterations": 2}']


def test_layout_eval_runs(tmp_path, run_bench):
    result = run_bench("layout_eval.py", "--sets", "pair", "--limit", "1", "--seeds", "2", "--steps", "4",
                       "--configs", '{"scale": 0.15}', out=tmp_path / "layout.json")
    rows = result["sets"]["pair"]["rows"]
    guided = rows['{"scale": 0.15}']
    assert set(rows) == {"baseline", '{"scale": 0.15}'} and result["words"] == "colours"
    assert 0.0 <= rows["baseline"]["box_iou"] <= 1.0 and guided["paired"]["box_iou"]["n"] == 2
    assert guided["loss_last_step"] < guided["loss_first_step"]  # the guided steps lower the layout loss


def test_object_token_isolation_cuts_only_text_to_text_links_between_objects():
    """In the first joint block (conditional rows): the objects' text tokens change, every other text token and
    every image token keeps its output — image queries and context tokens attend as before."""
    from attnctl.layout import layout_for_pipeline
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline("toy-sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    isolation = from_diagnose("_object_isolation")(["red circle", "blue square"])
    img, txt = first_output(pipe, attn)
    img_iso, txt_iso = first_output(pipe, attn, [isolation])
    where = layout_for_pipeline(pipe, PROMPT, txt.shape[1], (1, 1))
    words = ("red", "circle", "blue", "square")
    objects = [seg.start + p for seg in where.segments for w in words for p in seg.words[w]]
    others = [c for c in range(txt.shape[1]) if c not in objects]
    half = txt.shape[0] // 2  # [uncond, cond]
    torch.testing.assert_close(img_iso, img)
    torch.testing.assert_close(txt_iso[:half], txt[:half])
    torch.testing.assert_close(txt_iso[half:, others], txt[half:, others])
    assert (txt_iso[half:, objects] - txt[half:, objects]).abs().amax(dim=-1).min() > 1e-4


def test_injected_neglect_scales_the_named_words_keys_on_the_conditional_rows():
    from attnctl.layout import layout_for_pipeline
    from attnctl.toyworld.models import load_pipeline

    weakened_keys = from_diagnose("weakened_keys")
    pipe = load_pipeline("toy-sd3")
    probe = pipe.transformer.transformer_blocks[0].attn.add_k_proj
    plain = first_output(pipe, probe)
    with weakened_keys(pipe, PROMPT, ["blue", "square"], 0.5, sd3_cfg=True, n_text=24):
        weak = first_output(pipe, probe)
    assert not probe._forward_hooks  # the context removes its hooks
    where = layout_for_pipeline(pipe, PROMPT, plain.shape[1], (1, 1))
    cols = [seg.start + p for seg in where.segments for w in ("blue", "square") for p in seg.words[w]]
    assert len(cols) == 4  # CLIP and T5 position of each word
    half = plain.shape[0] // 2  # [uncond, cond]
    torch.testing.assert_close(weak[half:, cols], 0.5 * plain[half:, cols])
    others = [c for c in range(plain.shape[1]) if c not in cols]
    torch.testing.assert_close(weak[half:, others], plain[half:, others])
    torch.testing.assert_close(weak[:half], plain[:half])


def test_regulation_inner_loop_bench_runs(tmp_path, run_bench):
    result = run_bench("regulation_inner.py", "--shapes", "toy (8 images)", "--repeats", "1",
                       out=tmp_path / "inner.json")
    (row,) = result["rows"]
    assert row["tail_denormals"] > 0 and row["seconds"]["shipped"] > 0 and row["denormal_over_shipped"] > 0


def test_isolation_eval_runs_both_modes(tmp_path, run_bench):
    iso = run_bench("isolation_eval.py", "--sets", "pair", "--limit", "1", "--seeds", "2", "--steps", "3",
                    "--configs", '{"sites": "all"}', out=tmp_path / "iso.json")
    rows = iso["sets"]["pair"]["rows"]
    assert list(rows) == ["baseline", '{"sites": "all"}'] and 0 < rows['{"sites": "all"}']["mask_coverage"] < 1
    assert rows['{"sites": "all"}']["paired"]["presence"]["n"] == 2
    rep = run_bench("isolation_eval.py", "--mode", "reposition", "--limit", "2", "--seeds", "1", "--steps", "3",
                    out=tmp_path / "rep.json")
    assert rep["items"] == 2 and list(rep["rows"]) == ["baseline", "{}"]
    for row in rep["rows"].values():  # a subject found in both images is scored; none found: nothing to score
        assert 0.0 <= row["found"] <= 1.0
        assert (row["same_size"] is None) == (row["found"] == 0) and (row["same_size"] or 0.0) <= 1.0


def test_epipolar_eval_runs(tmp_path, run_bench):
    result = run_bench("epipolar_eval.py", "--limit", "1", "--seeds", "1", "--steps", "3", "--configs", "{}",
                       out=tmp_path / "epi.json")
    rows = result["sets"]["pair"]["rows"]
    assert list(rows) == ["independent", '{"falloff": "none"}', "{}"]
    assert all(0.0 <= row["shared_colours"] <= 1.0 for row in rows.values())


def test_epipolar_layer_bench_runs_and_the_adaptive_rule_equals_its_materialised_form(tmp_path, run_bench):
    """bench/epipolar.py at a small token count with AnimateAnywhere's rule: every variant timed and measured, and the
    control's output equal to the bench's own materialised reference (a mask from the whole softmax)."""
    result = run_bench("epipolar.py", "--res", "128", "--shapes", "flux.1-dev-double", "--repeats", "1",
                       "--falloff", "adaptive", "--peak-jobs", "2", out=tmp_path / "epipolar.json")
    (row,) = result["rows"]
    assert row["falloff"] == "adaptive" and row["image_tokens"] == 64 and row["views"] == 2
    assert result["live_memory"] is False  # the kind of peak the figures are: the default, the process's resident
    assert set(row["seconds"]) == set(row["extra_peak_bytes"]) == {"independent", "epipolar", "materialised"}
    assert row["max_abs_difference"] <= 1e-5


def test_inversion_eval_runs(tmp_path, run_bench):
    result = run_bench("inversion_eval.py", "--models", "toy-sd3", "--items", "1", "--solvers", "euler",
                       "midpoint/2", "--gammas", "0", "1", out=tmp_path / "inv.json")
    euler, pulled, mid, mid_pulled = result["inversion"]
    assert euler["model"] == mid["model"] == "toy-sd3" and euler["items"] == 1
    assert (euler["solver"], mid["solver"], pulled["solver"]) == ("euler", "midpoint", "euler")
    assert euler["model_calls"] == mid["model_calls"] == 2 * mid["steps"] == euler["steps"]
    for row in (euler, mid):
        assert row["gamma"] == 0.0
        assert row["inverted_mae"] < row["fresh_noise_mae"] and 0.0 <= row["inverted_over_fresh"] < 0.2
    for row in (pulled, mid_pulled):  # gamma 1 ends on a Gaussian sample: white noise, and the image is gone
        assert row["gamma"] == 1.0 and abs(row["noise_std"] - 1.0) < 0.1 and abs(row["noise_neighbour_corr"]) < 0.1
        assert row["inverted_over_fresh"] > 0.5 and row["noise_neighbour_corr"] < euler["noise_neighbour_corr"]


def test_edit_eval_runs(tmp_path, run_bench):
    result = run_bench("edit_eval.py", "--models", "toy-sd3", "--items", "1", "--methods", "inversion", "unifyedit",
                       "rf-inversion", "value-sharing", "--solver", "midpoint", "--rf", '{"gamma": 0.3}',
                       "--share", '{"tokens": "image"}', out=tmp_path / "edit.json")
    rows = result["edit"]
    assert [r["method"] for r in rows] == ["inversion", "unifyedit", "rf-inversion", "value-sharing"]
    assert all(r["edits"] == 1 and r["solver"] == "midpoint" for r in rows)
    assert rows[0]["rf"] is None and rows[2]["rf"]["gamma"] == 0.3 and result["rf"]["gamma"] == 0.3
    assert rows[0]["share"] is None and rows[3]["share"]["tokens"] == "image" and result["share"]["tokens"] == "image"
    for r in rows:
        assert 0.0 <= r["edited"] <= 1.0 and 0.0 <= r["kept"] <= 1.0 and r["outside_mae"] >= 0.0


def test_edit_layer_bench_runs_and_its_two_forms_agree(tmp_path, run_bench):
    """bench/edit.py at a small token count: every variant timed and measured, both UnifyEdit terms on, the chunked
    form (in 4 checkpointed chunks of 64 query rows) and the materialised one equal on the same layer."""
    rows_of_64 = 64 * 2 * 24 * 256  # logits of 64 query rows of both rows' 24 heads over 256 image keys
    result = run_bench("edit.py", "--res", "256", "--shapes", "flux.1-dev-single", "--repeats", "1",
                       "--live-memory", "--peak-jobs", "2", "--chunk-elems", str(rows_of_64),
                       out=tmp_path / "edit_layer.json")
    assert result["live_memory"] is True
    (row,) = result["rows"]
    assert set(row["seconds"]) == set(row["extra_peak_bytes"]) == {"stock", "stock_grad", "unify_site", "unify",
                                                                   "share", "unify_materialised"}
    assert row["share_over_stock"] > 0 and row["site_over_stock_grad"] > 0
    assert row["image_tokens"] == 256 and row["unify_chunks"] == 4 and row["max_rel_diff"] <= 1e-5
    assert row["losses"]["sa"] > 0 and 0 < row["losses"]["ca"] <= 1


CHUNK_LOOP = """
import sys, torch
sys.path.insert(0, {bench!r})
import layers
torch.set_num_threads(1)
q, k = torch.randn(53, 38, 64), torch.randn(4096, 38, 64)
def loop():  # a chunk's logits (33 MB) made and freed 24 times, as the checkpointed chunks of UnifyEdit's gap are
    for _ in range(24):
        torch.einsum("nhd,mhd->hnm", q, k).sum()
print(layers.extra_peak_bytes(loop))
"""


def test_live_memory_children_peak_at_the_live_tensors_not_at_the_heap_glibc_keeps():
    """``--live-memory`` runs the peak children with layers.LIVE_MEMORY_ENV: a loop of freed chunk-sized temporaries
    then peaks near one temporary, as the live tensors do."""
    import os

    code = CHUNK_LOOP.format(bench=str(BENCH))
    sys.path.insert(0, str(BENCH))
    try:
        import layers
    finally:
        sys.path.remove(str(BENCH))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **layers.LIVE_MEMORY_ENV})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 4 * (33 << 20)  # about one chunk's logits at a time, not 24


def test_compile_bench_runs_and_compiles_nothing_after_its_warm_up(tmp_path, run_bench):
    result = run_bench("compile.py", "--models", "toy-sd3", "--backend", "eager", "--steps", "1", "--repeats", "1",
                       "--controls", "probe", out=tmp_path / "compile.json")
    (res,) = result["results"]
    assert res["graphs_made_after_warm_up"] == 0
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["stock", "probe", "stock after controls"]
    assert rows["stock"]["graphs_run_per_step"] == 1.0  # the whole model in one graph
    assert rows["probe"]["graphs_run_per_step"] > 1.0  # split at the probed sites
    for r in rows.values():  # dynamo's eager backend runs the same operations: the same images
        assert r["max_image_difference"] == 0.0 and r["compiled_over_eager"] > 0


BAD_ARGS = [  # (script, arguments, what the one-line error says)
    ("layout.py", ["--repeats", "0"], "--repeats: 0 is not at least 1"),
    ("toy_speed.py", ["--threads", "0"], "--threads: 0 is not at least 1"),
    ("toy_baselines.py", ["--seeds", "0"], "--seeds: 0 is not at least 1"),
    ("batch.py", ["--processes", "1,x"], "--processes: 'x': 'x' is not a whole number"),
    ("epipolar.py", ["--res", "100"], "--res: 100 is not a multiple of 16"),
    ("edit.py", ["--res", "0"], "--res: 0 is not at least 1"),
    ("regulation.py", ["--config", "notjson"], "--config: 'notjson' is not JSON"),
    ("guidance.py", ["--shapes", "sd3"], "--shapes: invalid choice: 'sd3'"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_ARGS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_ARGS])
def test_bad_bench_arguments_are_refused_by_argparse_before_any_work(tmp_path, run_script, script, args, message):
    """A bad value exits 2 with argparse's one-line error naming the option, before a model or layer is built."""
    done = run_script(BENCH / script, args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and last.startswith(f"{script}: error: ") and message in last, last
