"""The ``attnctl`` command line, on tiny pipeline folders (2-step, 32×32 generations)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnctl.cli import app, call_defaults
from attnctl.controls.unify_edit import UnifyEdit
from attnctl.controls.value_sharing import ValueSharing
from attnctl.editing import edit as edit_image
from attnctl.errors import AttnCtlError
from attnctl.imageio import read_image, read_metadata, save_png
from attnctl.rf_inversion import RFInversion
from attnctl.testing import save_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_pipeline(tiny_sd3_pipeline("sd3"), tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_pipeline(tiny_flux_pipeline(), tmp_path_factory.mktemp("models") / "tiny-flux")


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"


# ------------------------------------------------------------------------------------------- generate


def test_generate_writes_png_with_metadata_and_from_regenerates_identical_pixels(sd3_dir, tmp_path):
    probe = '{"kind": "probe", "words": ["circle"], "sites": "L1"}'
    first = tmp_path / "out" / "a.png"
    result = run("generate", "--model", sd3_dir, "--prompt", "a red circle on the left", "--seed", "3",
                 "--steps", "2", "--guidance", "4.5", "--control", probe, "--out", first)
    ok(result)
    assert str(first) in result.stdout
    # the probe's map is written beside the image (no temp file left behind), coloured over it as the UI shows it
    assert sorted(p.name for p in first.parent.iterdir()) == ["a.attention-circle.png", "a.png"]
    assert "attention probe of 'circle': maps over 2 attention calls at 2 steps" in result.stderr
    heat = read_image(first.parent / "a.attention-circle.png")
    assert heat.shape[0] == heat.shape[1] >= 32 * 8 and heat.std() > 0
    assert read_metadata(first.parent / "a.attention-circle.png")["attention_map_of"] == "a.png"

    meta = read_metadata(first)
    assert meta["format"] == "attnctl.image/1"
    assert meta["prompt"] == "a red circle on the left"
    assert (meta["seed"], meta["steps"], meta["guidance"]) == (3, 2, 4.5)
    assert (meta["height"], meta["width"]) == (32, 32)
    assert meta["model"] == str(sd3_dir.resolve())
    assert meta["dtype"] == "fp32"
    assert meta["controls"] == [{"kind": "probe", "words": ["circle"], "tokens": None, "segments": None,
                                 "sites": "L1", "heads": None, "roles": ["cond"],
                                 "weight": {"kind": "constant", "value": 1.0}}]
    with Image.open(first) as img:
        assert img.size == (32, 32)
        params = img.text["parameters"]
    assert params.startswith("a red circle on the left\n")
    assert "Seed: 3" in params and "Steps: 2" in params and '"kind":"probe"' in params

    again = tmp_path / "b.png"
    ok(run("generate", "--from", first, "--out", again))
    assert np.array_equal(read_image(first), read_image(again))
    meta_again = read_metadata(again)
    assert meta_again.pop("regenerated_from") == str(first)
    assert _normalised(meta_again) == _normalised(meta)

    # options given with --from override the recorded ones
    other = tmp_path / "c.png"
    ok(run("generate", "--from", first, "--seed", "4", "--out", other))
    assert read_metadata(other)["seed"] == 4
    assert not np.array_equal(read_image(first), read_image(other))


def _normalised(meta: dict) -> dict:
    """``meta`` with its controls passed through one more JSON round trip (defaults spelled out)."""
    from attnctl.controls import control_from_json

    return {**meta, "controls": [control_from_json(c).to_json() for c in meta["controls"]]}


def test_a_toy_model_is_recorded_by_name_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    # `--out toy-sd3/a.png` makes a folder named like the toy: the second run recorded that folder as the model,
    # and `--from` then failed on it (no model_index.json).
    monkeypatch.chdir(tmp_path)
    args = ("generate", "--model", "toy-sd3", "--prompt", "a red circle", "--steps", "2")
    ok(run(*args, "--out", "toy-sd3/a.png"))
    ok(run(*args, "--out", "toy-sd3/b.png"))
    assert read_metadata(tmp_path / "toy-sd3" / "b.png")["model"] == "toy-sd3"
    ok(run("generate", "--from", "toy-sd3/b.png", "--out", "again.png"))
    assert np.array_equal(read_image(tmp_path / "again.png"), read_image(tmp_path / "toy-sd3" / "b.png"))


def test_generate_from_on_flux(flux_dir, tmp_path):
    first, again = tmp_path / "f1.png", tmp_path / "f2.png"
    ok(run("generate", "-m", flux_dir, "-p", "two blue squares", "--steps", "2", "-o", first))
    meta = read_metadata(first)
    assert (meta["family"], meta["height"], meta["width"], meta["max_sequence_length"]) == ("flux", 32, 32, 24)
    ok(run("generate", "--from", first, "-o", again))
    assert np.array_equal(read_image(first), read_image(again))


def test_generate_with_regulation_says_what_the_control_did(flux_dir, tmp_path):
    reg = '{"kind": "regulation", "targets": ["circle", "square"], "sites": "all", "iterations": 3}'
    result = run("generate", "-m", flux_dir, "-p", "a red circle and a blue square", "--steps", "2",
                 "--control", reg, "-o", tmp_path / "r.png")
    ok(result)
    assert re.search(r"regulation of 'circle', 'square': 3 attention calls at 1 step; the loss's map terms "
                     r"[\d.e+-]+ \(plain\) → [\d.e+-]+ \(regulated\)", result.stderr)


def test_generate_views_of_an_epipolar_control_and_regenerate_them(flux_dir, tmp_path):
    from attnctl import Camera

    cams = [Camera.look_at([x, 0, -4], [0, 0, 0], size=(32, 32)).model_dump(mode="json") for x in (-1.0, 1.0)]
    epi = json.dumps({"kind": "epipolar", "cameras": cams, "band": 0.5})
    result = run("generate", "-m", flux_dir, "-p", "a red circle", "--steps", "2", "--control", epi,
                 "--images", "2", "-o", tmp_path / "v.png")
    ok(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-0.png", "v-1.png"]
    meta = read_metadata(tmp_path / "v-1.png")
    assert (meta["images"], meta["image_index"], meta["controls"][0]["kind"]) == (2, 1, "epipolar")
    assert "epipolar attention across 2 views" in result.stderr
    ok(run("generate", "--from", tmp_path / "v-1.png", "-o", tmp_path / "again" / "w.png"))
    for i in (0, 1):
        assert np.array_equal(read_image(tmp_path / f"v-{i}.png"), read_image(tmp_path / "again" / f"w-{i}.png"))
    # without --images the views are the control's cameras; a rig makes them for the run's size
    rig = json.dumps({"kind": "epipolar", "rig": {"kind": "orbit", "views": 3, "degrees": 15}})
    ok(run("generate", "-m", flux_dir, "-p", "a red circle", "--steps", "2", "--control", rig, "-o",
           tmp_path / "orbit" / "o.png"))
    assert sorted(p.name for p in (tmp_path / "orbit").iterdir()) == ["o-0.png", "o-1.png", "o-2.png"]
    assert read_metadata(tmp_path / "orbit" / "o-2.png")["controls"][0]["rig"]["views"] == 3
    ok(run("generate", "--from", tmp_path / "v-1.png", "--steps", "1", "--control", rig,
           "-o", tmp_path / "r" / "o.png"))
    assert len(list((tmp_path / "r").iterdir())) == 3  # new controls: their views, not the recorded count
    bad = run("generate", "-m", flux_dir, "-p", "a red circle", "--steps", "2", "--control", epi,
              "--images", "3", "-o", tmp_path / "one.png")
    assert bad.exit_code == 2 and "--images 3 with an epipolar control of 2 cameras" in bad.output
    assert "multiple of 2" in " ".join(bad.output.split()) and not (tmp_path / "one-0.png").exists()


# ------------------------------------------------------------------------------------------- --compile


@pytest.fixture
def dynamo():
    """dynamo's caches and counters cleared around a test that compiles (``--compile`` runs in this process)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_generate_compile_eager_writes_the_uncompiled_pixels_and_records_the_backend(sd3_dir, tmp_path, dynamo):
    pag = '{"kind": "softpag", "heads": "all", "scale": 2.0}'  # a forward wrapper and processors in the graph
    args = ("generate", "--model", sd3_dir, "--prompt", "a red circle on the left", "--steps", "2", "--control", pag)
    plain, compiled, again = tmp_path / "plain.png", tmp_path / "compiled.png", tmp_path / "again.png"
    ok(run(*args, "--out", plain))
    assert not dynamo["stats"]["unique_graphs"]
    ok(run(*args, "--compile", "eager", "--out", compiled))
    assert dynamo["stats"]["unique_graphs"] > 0  # the transformer ran compiled
    assert np.array_equal(read_image(compiled), read_image(plain))
    meta, plain_meta = read_metadata(compiled), read_metadata(plain)
    assert (meta["compile"], plain_meta["compile"]) == ("eager", None)
    assert {**meta, "compile": None} == plain_meta  # nothing else in the record changes

    # --from regenerates the image without compiling (the backend is not a setting of the image)
    ok(run("generate", "--from", compiled, "--out", again))
    assert np.array_equal(read_image(again), read_image(plain))
    assert read_metadata(again)["compile"] is None


def test_edit_compile_eager_writes_the_uncompiled_edit(tmp_path, scene, dynamo):
    src, plain, compiled = tmp_path / "scene.png", tmp_path / "plain.png", tmp_path / "compiled.png"
    Image.fromarray(scene).save(src)
    args = ("edit", src, "--source", "a red circle and a blue square", "--target", "a green circle and a blue square",
            "--model", "toy-sd3", "--steps", "4", "--control", '{"sites": "mid"}', "--share")
    ok(run(*args, "--out", plain))
    ok(run(*args, "--compile", "eager", "--out", compiled))
    assert dynamo["stats"]["unique_graphs"] > 0
    assert np.array_equal(read_image(compiled), read_image(plain))  # gradient pass, both branches, value sharing
    assert read_metadata(compiled)["compile"] == "eager" and "compile" not in read_metadata(plain)


def test_an_unknown_compile_backend_is_one_clear_line_before_any_model_loads(sd3_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the backend was checked")

    monkeypatch.setattr("attnctl.cli.load_pipeline", no_loading)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "scene.png")
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "items": [{"prompt": "a red circle"}]}))
    bad = ("--compile", "nosuchbackend")
    for args in (["generate", "--model", sd3_dir, "--prompt", "a red circle", "--out", tmp_path / "x.png", *bad],
                 ["edit", tmp_path / "scene.png", "--source", "a red circle", "--target", "a blue circle",
                  "--out", tmp_path / "x.png", *bad],
                 ["batch", tmp_path / "b.json", "--out", tmp_path / "batch", "--model", sd3_dir, *bad],
                 ["batch", tmp_path / "b.json", "--out", tmp_path / "batch", "--processes", "2", *bad],
                 ["eval", "--model", sd3_dir, "--prompts", "single", *bad]):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and "Traceback" not in result.output, (args, result.stderr)
        assert error_lines[0].startswith("error: unknown torch.compile backend 'nosuchbackend'. Fix: use one of "
                                         "torch._dynamo.list_backends(): inductor, eager, aot_eager"), error_lines[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "batch").exists()


def test_a_backend_that_fails_to_compile_is_one_clear_line_and_a_failed_batch_item(sd3_dir, tmp_path, dynamo):
    import torch._dynamo

    def no_cpp_compiler(graph, example_inputs):
        raise RuntimeError("Compiler: cc is not found")  # as inductor fails on a machine without a C++ compiler

    torch._dynamo.register_backend(no_cpp_compiler, name="attnctl_test_failing")
    bad = run("generate", "--model", sd3_dir, "--prompt", "a red circle", "--steps", "1", "--compile",
              "attnctl_test_failing", "--out", tmp_path / "x.png")
    assert bad.exit_code == 2 and "Traceback" not in bad.output, (bad.output, bad.exception)
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert "torch.compile's 'attnctl_test_failing' backend failed to compile the transformer (RuntimeError: " \
           "Compiler: cc is not found)" in line and "run without --compile" in line, line
    assert not (tmp_path / "x.png").exists()

    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "items": [{"prompt": "a red circle", "steps": 1}]}))
    result = run("batch", tmp_path / "b.json", "--out", tmp_path / "batch", "--model", sd3_dir, "--compile",
                 "attnctl_test_failing")
    assert result.exit_code == 1 and "Traceback" not in result.output, (result.output, result.exception)
    (record,) = [json.loads(x) for x in (tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()]
    assert record["status"] == "failed" and record["error"].startswith(
        "torch.compile's 'attnctl_test_failing' backend failed to compile the transformer"), record


# ------------------------------------------------------------------------------------------- eval


def test_eval_prints_metrics_json(sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([
        {"prompt": "a red circle"},
        {"prompt": "a blue square on the left",
         "objects": [{"shape": "square", "colour": "blue", "position": "left"}],
         "boxes": [[0.05, 0.3, 0.4, 0.65]]},
    ]))
    result = run("eval", "--model", sd3_dir, "--prompts", prompts, "--seeds", "1", "--steps", "2", "--json")
    ok(result)
    out = json.loads(result.stdout)
    assert (out["items"], out["seeds"], out["steps"], out["method"]) == (2, 1, 2, None)
    metrics = out["metrics"]
    assert metrics["n_images"] == 2
    for key in ("presence", "object_recall", "count_accuracy", "colour_accuracy", "shape_accuracy",
                "background_clean", "sharpness", "position_accuracy", "box_iou"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_position_accuracy"] == 1 and metrics["n_box_iou"] == 1


def test_eval_with_method_and_table_output(sd3_dir, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red circle", "a green circle"]))
    result = run("eval", "--model", sd3_dir, "--prompts", prompts, "--seeds", "2", "--steps", "1",
                 "--method", "probe", "--config", '{"words": ["circle"]}')
    ok(result)
    assert "presence" in result.stdout and "sharpness" in result.stdout and "probe" in result.stdout


def test_eval_words_from_gives_each_item_its_own_words(sd3_dir, tmp_path, monkeypatch):
    import attnctl.cli as cli

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red circle and a blue square", "a green triangle"]))
    seen = []
    real = cli.run_pipeline

    def spy(pipe, kwargs, controls):
        if controls:
            seen.append((kwargs["prompt"][0], controls[0].config.targets))
        return real(pipe, kwargs, controls)

    monkeypatch.setattr(cli, "run_pipeline", spy)
    common = ("eval", "--model", sd3_dir, "--prompts", prompts, "--seeds", "2", "--steps", "2", "--json")
    result = run(*common, "--method", "regulation", "--words-from", "phrases", "--config", '{"sites": "all"}')
    ok(result)
    out = json.loads(result.stdout)
    assert out["words_from"] == "phrases" and out["config"]["kind"] == "regulation"
    assert seen == [("a red circle and a blue square", ["red circle", "blue square"]),
                    ("a green triangle", ["green triangle"])]
    seen.clear()
    # With zero iterations the control is the plain attention: the same images, so the same metrics.
    off = run(*common, "--method", "regulation", "--words-from", "shapes", "--config", '{"iterations": 0}')
    plain = run(*common)
    ok(off), ok(plain)
    assert json.loads(off.stdout)["metrics"] == json.loads(plain.stdout)["metrics"]


def test_eval_boxes_from_gives_each_item_its_own_layout(sd3_dir, monkeypatch):
    import attnctl.cli as cli
    from attnctl.toyworld.world import prompt_set

    seen = []
    real = cli.run_pipeline

    def spy(pipe, kwargs, controls):
        seen.append((kwargs["prompt"][0], controls[0].config.boxes if controls else None))
        return real(pipe, kwargs, controls)

    monkeypatch.setattr(cli, "run_pipeline", spy)
    result = run("eval", "--model", sd3_dir, "--prompts", "pair", "--limit", "2", "--seeds", "1", "--steps", "2",
                 "--json", "--method", "layout", "--boxes-from", "phrases")
    ok(result)
    out = json.loads(result.stdout)
    assert out["boxes_from"] == "phrases" and out["config"]["kind"] == "layout" and "box_iou" in out["metrics"]
    for item, (prompt, boxes) in zip(prompt_set("pair")[:2], seen, strict=True):
        want = {f"{o['colour']} {o['shape']}": b for o, b in zip(item["objects"], item["boxes"], strict=True)}
        assert prompt == item["prompt"] and boxes == want


def test_eval_noise_designs(sd3_dir, tmp_path, monkeypatch):
    """--noise shared gives every item seeds 0..N-1; per_prompt gives item i seed s + 1000003·i (the benches' and
    headhunt's design), recorded in the JSON; an unknown design is refused before the model loads."""
    import attnctl.cli as cli

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red circle", "a green triangle"]))
    seeds_seen = []
    real = cli.run_pipeline

    def spy(pipe, kwargs, controls):
        seeds_seen.extend(g.initial_seed() for g in kwargs["generator"])
        return real(pipe, kwargs, controls)

    monkeypatch.setattr(cli, "run_pipeline", spy)
    common = ("eval", "--model", sd3_dir, "--prompts", prompts, "--seeds", "2", "--steps", "1", "--json")
    shared = run(*common)
    ok(shared)
    assert sorted(seeds_seen) == [0, 0, 1, 1] and json.loads(shared.stdout)["noise"] == "shared"
    seeds_seen.clear()
    own = run(*common, "--noise", "per_prompt")
    ok(own)
    assert sorted(seeds_seen) == [0, 1, 1000003, 1000004] and json.loads(own.stdout)["noise"] == "per_prompt"
    bad = run(*common, "--noise", "fresh")
    assert bad.exit_code == 2 and "--noise 'fresh' is not a noise design" in bad.stderr


# ------------------------------------------------------------------------------------------- inspect


def test_inspect_tiny_model(sd3_dir):
    result = run("inspect", "--model", sd3_dir, "--json")
    ok(result)
    out = json.loads(result.stdout)
    assert out["family"] == "sd3"
    assert [(s["index"], s["name"], s["kind"], s["heads"], s["head_dim"]) for s in out["sites"]] == [
        (0, "transformer_blocks.0.attn", "sd3_joint", 4, 8),
        (1, "transformer_blocks.1.attn", "sd3_joint", 4, 8),
    ]
    assert out["totals"] == {"sites": 2, "heads": 8, "by_kind": {"sd3_joint": 2}}
    table = run("inspect", "--model", sd3_dir)
    ok(table)
    assert "transformer_blocks.1.attn" in table.stdout and "2 sites" in table.stdout


def test_inspect_full_size_configs_on_meta_device():
    flux = run("inspect", "--config", "flux.1-dev", "--json")
    ok(flux)
    out = json.loads(flux.stdout)
    assert out["totals"]["sites"] == 57
    assert out["totals"]["by_kind"] == {"flux_double": 19, "flux_single": 38}
    assert {(s["heads"], s["head_dim"]) for s in out["sites"]} == {(24, 128)}
    assert out["sites"][19]["name"] == "single_transformer_blocks.0.attn"

    sd35 = run("inspect", "--config", "sd3.5-large", "--json")
    ok(sd35)
    out = json.loads(sd35.stdout)
    assert out["totals"]["sites"] == 38
    assert {(s["heads"], s["head_dim"], s["kind"]) for s in out["sites"]} == {(38, 64, "sd3_joint")}


# ------------------------------------------------------------------------------------------- errors


def _bad_input_cases(sd3: str, tmp: str) -> list[tuple[list[str], str]]:
    gen = ["generate", "--model", sd3, "--prompt", "a red circle", "--steps", "1", "--out", f"{tmp}/x.png"]
    cases = [
        (["generate", "--model", "toy-sd9", "--prompt", "a red circle"], "unknown model 'toy-sd9'"),
        (["generate", "--model", f"{tmp}/missing-folder", "--prompt", "a red circle"], "missing-folder"),
        ([*gen, "--attention-backend", "warp-drive"], "unknown attention backend 'warp-drive'"),
        (["generate", "--model", sd3, "--prompt", "a red dog beside a cat", "--out", f"{tmp}/x.png"],
         "'dog', 'beside', 'cat'"),
        ([*gen, "--control", '{"kind": "probe", "words": ['], "--control is not valid JSON"),
        ([*gen, "--control", '{"kind": "probe", "wrods": ["circle"]}'], "wrods"),
        ([*gen, "--control", '{"kind": "no-such-control"}'], "unknown control kind 'no-such-control'"),
        ([*gen, "--control", '{"kind": "probe", "words": ["square"]}'], "'square' is not in the prompt"),
        ([*gen, "--device", "cuda:7"], "cuda:7"),
        (["generate", "--from", f"{tmp}/plain.png"], "has no attnctl metadata"),
        (["eval", "--model", sd3, "--prompts", "no-such-set", "--seeds", "1"], "no-such-set"),
        (["eval", "--model", sd3, "--prompts", f"{tmp}/bad-items.json", "--seeds", "1"],
         "prompt item 1: field 'prompt'"),
        (["eval", "--model", sd3, "--prompts", "single", "--method", "probe", "--config", '{"sites": 5}'], "sites"),
        (["eval", "--model", sd3, "--prompts", "single", "--words-from", "shapes"], "--words-from needs --method"),
        (["eval", "--model", sd3, "--prompts", "single", "--method", "regulation", "--words-from", "nouns"],
         "'nouns' is not a word kind"),
        (["eval", "--model", sd3, "--prompts", "single", "--method", "softpag", "--config", '{"heads": ["L0H0"]}',
          "--words-from", "shapes"], "names no prompt words"),
        (["eval", "--model", sd3, "--prompts", "pair", "--method", "layout", "--boxes-from", "sizes"],
         "'sizes' is not a box key"),
        (["eval", "--model", sd3, "--prompts", "count", "--method", "layout", "--boxes-from", "colours"],
         "several instances of an object"),
        (["eval", "--model", sd3, "--prompts", "pair", "--method", "probe", "--boxes-from", "colours"],
         "takes no boxes"),
        (["eval", "--model", sd3, "--prompts", "pair", "--boxes-from", "colours"], "--boxes-from needs --method"),
        (["inspect", "--config", "sd4-huge"], "unknown transformer config 'sd4-huge'"),
        (["headhunt", "--model", sd3, "--prompts", "pair", "--finalists", "2", "--out", f"{tmp}/hh"],
         "only one of them is given (--finalists 2, --finalist-seeds 0)"),
        ([*gen, "--guidance", "nan"], "--guidance nan is not a guidance scale"),
        ([*gen, "--height", "256"], "--height 256 is past this model's largest side, 128 px"),
        ([*gen, "--width", "30"], "--width 30 is not a multiple of 4 px"),
        (["eval", "--model", sd3, "--prompts", f"{tmp}/nope.json", "--seeds", "1"],
         "write a JSON list of prompt items, e.g."),
        ([*gen, "--guidance", "-5"], "--guidance -5.0 is not a guidance scale"),
        ([*gen, "--true-cfg", "1"], "does not turn true CFG on"),
        ([*gen, "--true-cfg", "4"], "--true-cfg is for FLUX models"),
        ([*gen, "--negative-prompt", "a blue square", "--guidance", "1"], "acts through CFG, which --guidance 1.0"),
        ([*gen, "--control", '{"kind": "unify_edit"}'], "edits an existing image; generate makes new ones"),
        ([*gen, "--control", '{"kind": "probe"}'], "a file per token"),
        (["eval", "--model", sd3, "--prompts", "pair", "--method", "regulation"], "pass --words-from"),
        (["edit", f"{tmp}/bad-items.json", "--source", "a red circle", "--target", "a blue circle", "--model", sd3],
         "is not an image file PIL can read"),
        (["edit", f"{tmp}/big.png", "--source", "a red circle", "--target", "a blue circle", "--model", sd3,
          "--steps", "1"], "this model's largest side is 128 px"),
        (["batch", f"{tmp}/one.json", "--model", sd3, "--out", f"{tmp}/plain.png"], "File exists"),
        (["generate", "--from", f"{tmp}/edited-seed.png"], "records seed = \"x\", which is not int"),
        (["toy", "train", "--model", "toy-unet", "--out", tmp], "unknown toy model 'toy-unet'"),
        (["toy", "train", "--model", "toy-flux-dev", "--out", f"{tmp}/dev", "--steps", "1"],
         "'toy-flux-dev' takes a guidance value, which it learns only from a teacher"),
    ]
    if importlib.util.find_spec("xformers") is None:
        cases.append(([*gen, "--attention-backend", "xformers"], "attention backend 'xformers' is not available"))
    return cases


def test_bad_inputs_exit_2_with_one_clear_line(sd3_dir, tmp_path):
    Image.new("RGB", (8, 8), "white").save(tmp_path / "plain.png")
    Image.new("RGB", (512, 512), "white").save(tmp_path / "big.png")  # past the tiny model's position table
    save_png(tmp_path / "edited-seed.png", Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": "x"})
    (tmp_path / "bad-items.json").write_text(json.dumps([{"prompt": "a red circle"}, {"objects": []}]))
    (tmp_path / "one.json").write_text(json.dumps({"version": 1, "items": [{"prompt": "a red circle"}]}))
    (tmp_path / "nope.json").write_text("nope")
    for args, expected in _bad_input_cases(str(sd3_dir), str(tmp_path)):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, (args, result.stderr)
        assert expected in error_lines[0], (args, error_lines[0])
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_option_values_the_run_would_ignore_or_overflow_are_refused(sd3_dir, flux_dir, tmp_path):
    """FLUX's true CFG runs against the empty prompt unless a negative one is given (diffusers runs it only against a
    negative prompt); a FLUX negative prompt without true CFG, and a seed past 64 bits, are refused."""
    base = ["generate", "-m", flux_dir, "-p", "a red circle", "--steps", "2"]
    ok(run(*base, "-o", tmp_path / "plain.png"))
    ok(run(*base, "--true-cfg", "5", "-o", tmp_path / "cfg.png"))
    assert read_metadata(tmp_path / "cfg.png")["true_cfg"] == 5.0
    assert not np.array_equal(read_image(tmp_path / "plain.png"), read_image(tmp_path / "cfg.png"))
    ok(run("generate", "--from", tmp_path / "cfg.png", "-o", tmp_path / "again.png"))
    assert np.array_equal(read_image(tmp_path / "cfg.png"), read_image(tmp_path / "again.png"))
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "defaults": {"steps": 2}, "items": [
        {"id": "cfg", "prompt": "a red circle", "true_cfg": 5}]}))
    ok(run("batch", tmp_path / "b.json", "--model", flux_dir, "--out", tmp_path / "b", "--threads", "1"))
    assert np.array_equal(read_image(tmp_path / "cfg.png"), read_image(tmp_path / "b" / "cfg_s0.png"))
    result = run(*base, "-n", "a blue square", "-o", tmp_path / "neg.png")
    assert result.exit_code == 2 and "acts only through true CFG" in result.stderr and "--true-cfg 4" in result.stderr
    result = run(*base, "-g", "5", "-o", tmp_path / "g.png")  # no guidance embedding: diffusers ignores the value
    assert result.exit_code == 2 and "--guidance does nothing on this FLUX model" in result.stderr
    Image.new("RGB", (32, 32), "white").save(tmp_path / "white.png")
    result = run("edit", tmp_path / "white.png", "--source", "a red circle", "--target", "a blue circle", "--model",
                 flux_dir, "--steps", "2", "--guidance", "7", "-o", tmp_path / "e.png")  # the same for an edit
    assert result.exit_code == 2 and "--guidance does nothing on this FLUX model" in result.stderr
    assert "--true-cfg" not in result.stderr and not (tmp_path / "e.png").exists()
    result = run("generate", "-m", sd3_dir, "-p", "a red circle", "--seed", str(2**64), "-o", tmp_path / "s.png")
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output
    result = run(*base, "--height", "30", "-o", tmp_path / "h.png")  # diffusers would make a 28 px image
    assert result.exit_code == 2 and "--height 30 is not a multiple of 4 px" in result.stderr
    assert "give --height 28 or 32" in result.stderr and not (tmp_path / "h.png").exists()


def test_a_backend_without_backward_here_is_one_clear_line_for_a_control_that_takes_gradients(sd3_dir, tmp_path):
    # FlexAttention runs forward on CPU but not backward: layout guidance's gradient pass failed mid-run with a
    # 43-frame traceback. The backend check now proves a backward when a control needs one.
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    gen = ["generate", "--model", sd3_dir, "--prompt", "a red circle", "--steps", "1", "--attention-backend", "flex"]
    layout = '{"kind": "layout", "boxes": {"circle": [0, 0, 0.5, 0.5]}}'
    try:
        result = run(*gen, "--control", layout, "--out", tmp_path / "layout.png")
        assert result.exit_code == 2, (result.output, result.exception)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and "Traceback" not in result.output, result.stderr
        assert "attention backend 'flex' runs on cpu in fp32 but cannot take the gradients that layout needs" in \
            error_lines[0], error_lines[0]
        assert "Fix: use --attention-backend native" in error_lines[0], error_lines[0]
        assert not (tmp_path / "layout.png").exists()
        ok(run(*gen, "--out", tmp_path / "plain.png"))  # forward only: flex runs on CPU
        assert read_metadata(tmp_path / "plain.png")["attention_backend"] == "flex"
    finally:
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # diffusers sets it globally too


def test_debug_flag_shows_the_traceback():
    result = run("--debug", "generate", "--model", "toy-sd9", "--prompt", "a red circle")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "unknown model 'toy-sd9'" in result.stderr


def _hub_failure(cause: BaseException):
    """A stand-in for DiffusionPipeline.load_config that fails as diffusers does for a hub id it cannot fetch:
    OSError "does not appear to have a file named model_index.json", raised while handling huggingface_hub's
    LocalEntryNotFoundError, itself raised from ``cause``."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def load_config(*args, **kwargs):
        try:
            try:
                raise cause
            except Exception as e:
                raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                              "cannot find the requested files in the local cache.") from e
        except LocalEntryNotFoundError:
            raise OSError("owner/model does not appear to have a file named model_index.json.") from None

    return load_config


@pytest.mark.parametrize("cause", ["gaierror", "requests", "errno", "connection-error"])
def test_a_hub_id_without_network_says_the_hub_could_not_be_reached(cause, tmp_path, monkeypatch):
    import errno
    import socket

    import diffusers
    import requests

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    causes = {"gaierror": socket.gaierror(-2, "Name or service not known"),
              "requests": requests.exceptions.ConnectionError("Max retries exceeded with url: /owner/model"),
              "errno": OSError(errno.ENETUNREACH, "Network is unreachable"),
              "connection-error": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")}
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", _hub_failure(causes[cause]))
    result = run("generate", "--model", "owner/model", "--prompt", "a red circle", "--out", tmp_path / "x.png")
    assert result.exit_code == 2, (result.output, result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "could not reach the Hugging Face hub (no network?)" in error_lines[0], error_lines[0]
    assert "the hub answered" not in error_lines[0] and "HF_HUB_OFFLINE=1" in error_lines[0], error_lines[0]


def test_a_hub_id_the_hub_refuses_or_offline_mode_lacks_keeps_its_own_message(tmp_path, monkeypatch):
    import diffusers
    from huggingface_hub.errors import OfflineModeIsEnabled

    def answered(*args, **kwargs):  # the hub answered: no such file in the repository
        raise OSError("owner/model does not appear to have a file named model_index.json.")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", answered)
    args = ("generate", "--model", "owner/model", "--prompt", "a red circle", "--out", tmp_path / "x.png")
    result = run(*args)
    assert result.exit_code == 2 and "the hub answered: OSError" in result.stderr, result.output
    assert "could not reach" not in result.stderr
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config",
                        _hub_failure(OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is "
                                                          "enabled. To disable it, please unset HF_HUB_OFFLINE.")))
    result = run(*args)
    assert result.exit_code == 2 and "offline mode is on (HF_HUB_OFFLINE)" in result.stderr, result.output
    assert "not in the local cache" in result.stderr and "could not reach" not in result.stderr


# ------------------------------------------------------------------------------------------- pieces


def test_png_metadata_round_trip_is_atomic_and_unicode_safe(tmp_path):
    meta = {"prompt": "un cercle rouge — ☀", "seed": 1, "controls": [{"kind": "probe", "weight": 0.5}]}
    path = save_png(tmp_path / "sub" / "x.png", np.zeros((4, 4, 3), np.uint8), meta)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
    assert read_metadata(path) == {"format": "attnctl.image/1", **meta}
    with pytest.raises(AttnCtlError, match="does not end in .png"):
        save_png(tmp_path / "x.jpg", np.zeros((4, 4, 3), np.uint8), meta)


def test_toy_train_passes_options_through(tmp_path, monkeypatch):
    from attnctl.toyworld import train as training

    seen = {}

    def fake_train(model, out_dir, **kwargs):
        seen.update(model=model, out_dir=out_dir, **kwargs)
        return out_dir / "pipeline"

    monkeypatch.setattr(training, "train", fake_train)
    result = run("toy", "train", "--model", "toy-flux", "--out", tmp_path, "--steps", "5", "--minutes", "0.5")
    ok(result)
    assert seen == {"model": "toy-flux", "out_dir": tmp_path, "steps": 5, "minutes": 0.5, "resume": False,
                    "progress": True}
    assert str(tmp_path / "pipeline") in result.stdout
    seen.clear()
    ok(run("toy", "train", "--model", "toy-sd3", "--out", tmp_path, "--init-from", "toy-sd3", "--omit-named", "0.3",
           "--warmup", "100"))  # the shipped recipes' warm-up (docs/toyworld.md)
    assert seen["init_from"] == "toy-sd3" and seen["omit_named"] == 0.3 and seen["warmup"] == 100
    seen.clear()
    ok(run("toy", "train", "--model", "toy-flux-dev", "--out", tmp_path, "--distill-from", "toy-flux"))
    assert seen["model"] == "toy-flux-dev" and seen["distill_from"] == "toy-flux"
    assert run("toy", "train", "--model", "toy-sd3", "--out", tmp_path, "--omit-named", "1.5").exit_code == 2
    resumed = run("toy", "train", "--model", "toy-flux", "--out", tmp_path / "empty", "--resume")
    assert resumed.exit_code == 2 and "no checkpoint" in resumed.stderr


def test_toy_train_never_overwrites_a_run_and_resumes_it_as_it_was_set_up(tmp_path, monkeypatch):
    """Re-running the command without --resume used to start over in the folder (a 100-minute run lost); a resume
    with other fixed settings used to ignore them silently. Both are refused; more --steps extends the run."""
    import torch

    from attnctl.toyworld import train as training

    torch.save({"hparams": {"model": "toy-sd3", "batch": 4, "lr": 3e-4, "seed": 0, "init_from": None,
                            "omit_named": 0.0, "distill_from": None}, "step": 12}, tmp_path / training.CHECKPOINT_NAME)
    seen = {}
    monkeypatch.setattr(training, "train", lambda model, out, **kw: seen.update(kw) or out / "pipeline")
    again = run("toy", "train", "--model", "toy-sd3", "--out", tmp_path, "--steps", "40")
    assert again.exit_code == 2 and "already holds a training run of toy-sd3" in again.stderr
    assert "--resume" in again.stderr and not seen
    changed = run("toy", "train", "--model", "toy-flux", "--out", tmp_path, "--resume", "--batch", "16")
    assert changed.exit_code == 2 and "--model toy-flux (the run's: toy-sd3)" in " ".join(changed.stderr.split())
    assert "--batch 16 (the run's: 4)" in " ".join(changed.stderr.split())
    ok(run("toy", "train", "--model", "toy-sd3", "--out", tmp_path, "--resume", "--steps", "40", "--batch", "4"))
    assert seen["resume"] is True and seen["steps"] == 40


def test_eval_refuses_a_model_that_is_not_a_toy(sd3_dir, monkeypatch):
    """eval scores with the shapes world's detector: on a real model it returned zeros that mean nothing."""
    import attnctl.cli

    monkeypatch.setattr(attnctl.cli, "is_toy_pipeline", lambda pipe: False)  # as a real model's tokenizer makes it
    result = run("eval", "--model", sd3_dir, "--prompts", "single", "--seeds", "1", "--limit", "1")
    assert result.exit_code == 2 and "is not a toy model" in " ".join(result.stderr.split())


def test_python_dash_m_attnctl():
    result = subprocess.run([sys.executable, "-m", "attnctl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("generate", "eval", "inspect", "toy"):
        assert command in result.stdout


# ------------------------------------------------------------------------------------------- edit


def test_edit_writes_the_edited_png_with_its_settings_and_refuses_bad_input(tmp_path):
    from attnctl.toyworld.world import parse_caption, render, scene_from_item

    source, target = "a red circle and a blue square", "a green circle and a blue square"
    item = {"prompt": source, **parse_caption(source), "boxes": [[0.1, 0.1, 0.45, 0.45], [0.55, 0.5, 0.9, 0.85]]}
    src = tmp_path / "scene.png"
    Image.fromarray(render(scene_from_item(item), 32)).save(src)
    out = tmp_path / "out" / "edited.png"
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "6",
                 "--control", '{"scale": "window(0.2, 0, 0.5)", "sites": "mid"}', "--out", out)
    ok(result)
    assert str(out) in result.stdout and "UnifyEdit over 3 guided steps" in result.stderr
    meta = read_metadata(out)
    assert (meta["source_prompt"], meta["prompt"], meta["edited_from"]) == (source, target, str(src))
    assert meta["steps"] == 6 and meta["guidance"] == 4.5  # the toy's CFG
    assert meta["controls"][0]["kind"] == "unify_edit" and meta["controls"][0]["sites"] == "mid"
    assert read_image(out).shape == (32, 32, 3)

    missing = run("edit", tmp_path / "nope.png", "--source", source, "--target", target, "-o", out)
    assert missing.exit_code == 2 and "no image file" in missing.output
    wrong = run("edit", src, "--source", source, "--target", target, "-c", '{"kind": "probe"}', "-o", out)
    assert wrong.exit_code == 2 and "UnifyEdit control" in wrong.output
    same = run("edit", src, "--source", source, "--target", source, "-m", "toy-sd3", "-o", out)
    assert same.exit_code == 2 and "nothing to edit" in same.output
    solver = run("edit", src, "--source", source, "--target", target, "--solver", "heun", "-o", out)
    assert solver.exit_code == 2 and "pass euler or midpoint" in solver.output

    mid = tmp_path / "out" / "midpoint.png"  # RF-Solver's step: two calls a step, the guided ones the first of each
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "6",
                 "--solver", "midpoint", "--control", '{"scale": "window(0.2, 0, 0.5)", "sites": "mid"}', "--out", mid)
    ok(result)
    assert "UnifyEdit over 3 guided steps" in result.stderr
    meta = read_metadata(mid)
    assert (meta["scheduler"], meta["solver"]) == ("FlowMatchMidpointScheduler", "midpoint")
    assert read_metadata(out)["solver"] == "euler"
    assert not np.array_equal(read_image(mid), read_image(out))

    rf = tmp_path / "out" / "rf.png"  # RF-Inversion's controllers, the paper's settings and some of one's own
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "6",
                 "--control", '{"scale": "window(0.2, 0, 0.5)", "sites": "mid"}', "--rf", "--out", rf)
    ok(result)
    assert read_metadata(rf)["rf_inversion"] == RFInversion().to_json() and "rf_inversion" not in meta
    assert "value_sharing" not in read_metadata(rf)  # recorded only when the edit shares values
    assert not np.array_equal(read_image(rf), read_image(out))
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "6",
                 "--control", '{"scale": "window(0.2, 0, 0.5)", "sites": "mid"}', "--rf-settings",
                 '{"gamma": 0.2, "eta": 0.5, "seed": 3}', "--out", rf)
    ok(result)
    assert read_metadata(rf)["rf_inversion"] == RFInversion(gamma=0.2, eta=0.5, seed=3).to_json()
    bad = run("edit", src, "--source", source, "--target", target, "--rf-settings", '{"gamma": 2}', "-o", rf)
    assert bad.exit_code == 2 and "gamma: Input should be less than or equal to 1" in bad.output
    bad = run("edit", src, "--source", source, "--target", target, "--rf-settings", "[1]", "-o", rf)
    assert bad.exit_code == 2 and "RF-Inversion settings are a JSON object" in bad.output
    bad = run("edit", src, "--source", source, "--target", target, "--rf-settings", "", "-o", rf)
    assert bad.exit_code == 2 and "--rf-settings is not valid JSON" in bad.output and '"gamma": 0.5' in bad.output


def test_edit_share_makes_what_the_api_makes_with_value_sharing_and_records_it(tmp_path, toy_sd3, scene):
    source, target = "a red circle and a blue square", "a green circle and a blue square"
    src = tmp_path / "scene.png"
    Image.fromarray(scene).save(src)
    settings = {"scale": "window(0.2, 0, 0.5)", "sites": "mid"}
    defaults = call_defaults(toy_sd3)

    def api(share: ValueSharing | None) -> np.ndarray:
        result = edit_image(toy_sd3, scene, source, target, 4, control=UnifyEdit(**settings),
                            guidance_scale=defaults["guidance"], max_sequence_length=defaults["max_sequence_length"],
                            share=share)
        return np.asarray(result.edited)

    out = tmp_path / "out" / "shared.png"  # --share: the defaults (the first 15% of the steps: step 0 of 4)
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "4",
                 "--control", json.dumps(settings), "--share", "--out", out)
    ok(result)
    assert "ValueSharing at" in result.stderr and "over 1 denoising steps" in result.stderr
    assert read_metadata(out)["value_sharing"] == ValueSharing().to_json()
    assert not np.array_equal(read_image(out), api(None))  # the edit without sharing
    own = {"weight": "window(0.5, 0, 0.5)", "tokens": "image"}  # --share-settings: one's own (implies --share)
    result = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "4",
                 "--control", json.dumps(settings), "--share-settings", json.dumps(own), "--out", out)
    ok(result)
    assert read_metadata(out)["value_sharing"] == ValueSharing(**own).to_json()
    assert np.array_equal(read_image(out), api(ValueSharing(**own)))
    idle = run("edit", src, "--source", source, "--target", target, "--model", "toy-sd3", "--steps", "4",
               "--control", json.dumps(settings), "--share-settings", '{"weight": 0}', "--out", out)
    ok(idle)  # it runs, and says in one line (no source location) that nothing was shared
    assert "warning: value sharing shares nothing in this edit" in idle.stderr and "cli.py" not in idle.stderr

    for bad, says in [('{"tokens": "text"}', "tokens: Input should be 'all' or 'image'"),
                      ('{"weight": 2}', "weight"),
                      ('{"kind": "rf_inversion"}', "value-sharing settings have the kind 'rf_inversion'"),
                      ("[1]", "value-sharing settings are a JSON object"),
                      ("", "--share-settings is not valid JSON")]:
        wrong = run("edit", src, "--source", source, "--target", target, "--share-settings", bad, "-o", out)
        assert wrong.exit_code == 2 and says in wrong.output, (bad, wrong.output)
    assert '"tokens": "image"' in wrong.output  # the hint of the last: a value-sharing example


def test_generate_repositions_after_reference_prompts_made_in_the_same_call(sd3_dir, tmp_path):
    import torch

    from attnctl import IsolationAttention
    from attnctl.cli import load_pipeline

    subjects, refs = ["red circle", "blue square"], ["a small red circle", "a large blue square"]
    scene = "a red circle and a blue square"
    iso = {"kind": "isolation", "subjects": subjects, "references": True, "sites": "all"}
    out = tmp_path / "scene.png"
    result = run("generate", "--model", sd3_dir, "--prompt", scene, "-r", refs[0], "-r", refs[1], "--seed", "2",
                 "--steps", "3", "--control", json.dumps(iso), "--out", out)
    ok(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene-ref1.png", "scene-ref2.png", "scene.png"]
    meta = read_metadata(out)
    assert meta["reference_prompts"] == refs and "reference_index" not in meta
    assert read_metadata(tmp_path / "scene-ref2.png")["reference_index"] == 2

    # the scene is the Python API's [reference_1, reference_2, scene] call, and --from makes it again
    pipe = load_pipeline(str(sd3_dir))
    images = pipe([*refs, scene], num_inference_steps=3, guidance_scale=meta["guidance"], height=32, width=32,
                  max_sequence_length=meta["max_sequence_length"], generator=torch.Generator("cpu").manual_seed(2),
                  controls=[IsolationAttention(**{k: v for k, v in iso.items() if k != "kind"})]).images
    assert np.array_equal(read_image(out), np.asarray(images[2]))
    assert np.array_equal(read_image(tmp_path / "scene-ref1.png"), np.asarray(images[0]))
    again = tmp_path / "again" / "x.png"
    ok(run("generate", "--from", out, "--out", again))
    assert np.array_equal(read_image(again), read_image(out)) and (again.parent / "x-ref2.png").is_file()

    # without the control the same set is made plainly, from the same noise: the baseline of the scene
    plain = tmp_path / "plain" / "scene.png"
    ok(run("generate", "--model", sd3_dir, "--prompt", scene, "-r", refs[0], "-r", refs[1], "--seed", "2",
           "--steps", "3", "--out", plain))
    stock = pipe([*refs, scene], num_inference_steps=3, guidance_scale=meta["guidance"], height=32, width=32,
                 max_sequence_length=meta["max_sequence_length"],
                 generator=torch.Generator("cpu").manual_seed(2)).images
    assert np.array_equal(read_image(plain), np.asarray(stock[2])) and (plain.parent / "scene-ref2.png").is_file()

    # bad combinations say what to do
    for args, text in [
        (["--control", json.dumps(iso)], "no reference prompts are given"),
        (["-r", refs[0], "--control", json.dumps(iso)], "1 reference prompts for 2 subjects"),
        (["-r", refs[0], "-r", refs[1], "--control", json.dumps(iso), "--images", "2"], "make one image per call"),
        (["-r", refs[0], "-r", refs[1], "--control", json.dumps(iso), "--control",
          json.dumps({"kind": "epipolar", "rig": {"kind": "stereo"}})], "make the views and the reposition"),
    ]:
        bad = run("generate", "--model", sd3_dir, "--prompt", scene, "--steps", "2", *args, "--out", tmp_path / "b.png")
        assert bad.exit_code == 2 and text in " ".join(bad.output.split()), bad.output


def test_eval_refuses_settings_it_would_not_use(sd3_dir):
    """--config's own words were replaced by --words-from's (yet recorded in the JSON), and --guidance on a FLUX
    model without a guidance embedding changed nothing (yet was recorded)."""
    result = run("eval", "--model", sd3_dir, "--prompts", "pair", "--limit", "1", "--method", "regulation",
                 "--config", '{"targets": ["zzz"]}', "--words-from", "shapes")
    assert result.exit_code == 2 and "--config gives 'targets' and --words-from fills it" in \
        " ".join(result.stderr.split())
    result = run("eval", "--model", "toy-flux", "--prompts", "single", "--limit", "1", "--guidance", "7")
    assert result.exit_code == 2 and "--guidance does nothing on this FLUX model" in " ".join(result.stderr.split())


def test_inspect_refuses_a_config_without_heads(tmp_path):
    """num_attention_heads 0 ended in a ZeroDivisionError traceback."""
    config = tmp_path / "zero.json"
    config.write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 32,
                                  "caption_projection_dim": 128, "in_channels": 12, "joint_attention_dim": 64,
                                  "num_attention_heads": 0, "num_layers": 2, "out_channels": 12, "patch_size": 2,
                                  "pooled_projection_dim": 64, "pos_embed_max_size": 8, "sample_size": 16}))
    result = run("inspect", "--config", config)
    assert result.exit_code == 2 and "has 0 attention heads" in " ".join(result.stderr.split())
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_attention_heads": 2, "patch_size": 0}))
    result = run("inspect", "--config", config)  # diffusers divides by the patch size: a ZeroDivisionError
    assert result.exit_code == 2 and "cannot build SD3Transformer2DModel from this config: ZeroDivisionError" in \
        " ".join(result.stderr.split()) and "Traceback" not in result.output


def test_eval_checks_its_prompt_items_values(sd3_dir, tmp_path):
    """Objects of unknown colours or shapes scored as failures, a count "two" failed after every image, and an
    inverted box silently scored an IoU of 0."""
    for item, message in (({"objects": [{"shape": "circle", "colour": "Red"}]}, "colour 'Red', which the evaluator"),
                          ({"objects": [{"shape": "circles", "colour": "red"}]}, "shape 'circles'"),
                          ({"objects": [{"shape": "circle", "colour": "red", "count": "two"}]}, "count 'two'"),
                          ({"boxes": [[0.9, 0.9, 0.1, 0.1]]}, "x0 < x1 and y0 < y1")):
        path = tmp_path / "items.json"
        path.write_text(json.dumps([{"prompt": "a red circle", **item}]))
        result = run("eval", "--model", sd3_dir, "--prompts", path)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (item, result.stderr)


def test_library_calls_keep_the_callers_logging(monkeypatch):
    """cli.load_pipeline (used by run_batch and headhunt.main from Python) set diffusers' and transformers' logging
    to errors and turned their progress bars off for the whole process; only the command line does that now."""
    from diffusers.utils import logging as dlog

    from attnctl import cli

    monkeypatch.setitem(cli._STATE, "app", False)  # as in a script: the command line never ran
    dlog.set_verbosity_info()
    dlog.enable_progress_bar()
    try:
        cli.load_pipeline("toy-sd3")
        assert dlog.get_verbosity() == dlog.INFO and dlog.is_progress_bar_enabled()
    finally:
        dlog.set_verbosity_warning()


def test_eval_refuses_prompt_item_fields_the_scorer_cannot_read(sd3_dir, tmp_path, monkeypatch):
    """An unknown position or relation, or a relation between objects the item does not have, passed the item check
    and failed the scorer with a KeyError or IndexError after every image had been made."""
    import attnctl.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    pair = "a red circle and a blue square"
    for item, message in (
        ({"prompt": "a red circle", "objects": [{"shape": "circle", "colour": "red", "position": "middle"}]},
         "objects[0] has position 'middle', which the evaluator does not know"),
        ({"prompt": pair, "relation": {"subject": 0, "relation": "leftwards", "object": 1}},
         "names the relation 'leftwards'"),
        ({"prompt": pair, "relation": {"subject": 0, "relation": "left", "object": 2}},
         "joins objects 0 and 2, and the item has 2 object(s)"),
        ({"prompt": pair, "relation": {"subject": 1, "relation": "left", "object": 1}}, "joins objects 1 and 1"),
        ({"prompt": pair, "relation": "left"}, "names the relation 'left'"),
    ):
        path = tmp_path / "items.json"
        path.write_text(json.dumps([item]))
        result = run("eval", "--model", sd3_dir, "--prompts", path)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (item, result.output)


def test_eval_records_no_guidance_on_a_model_it_does_nothing_on(flux_dir, sd3_dir):
    """toy-flux (no guidance embedding, no CFG in eval) was recorded and printed as run at diffusers' guidance 3.5."""
    common = ("eval", "--prompts", "single", "--limit", "1", "--steps", "1")
    result = run(*common, "--model", flux_dir, "--json")
    ok(result)
    assert json.loads(result.stdout)["guidance"] is None
    result = run(*common, "--model", flux_dir)
    ok(result)
    assert "1 steps, no guidance," in result.stdout
    result = run(*common, "--model", sd3_dir, "--json")  # where it acts, it is recorded
    ok(result)
    assert isinstance(json.loads(result.stdout)["guidance"], float)


def test_eval_refuses_methods_it_cannot_run_before_the_model_loads(sd3_dir, monkeypatch):
    """Edits, views and repositioning failed after the model loaded with fixes that did not apply; a --config "kind"
    was silently replaced by --method; a misspelt --method with --words-from was said to name no prompt words."""
    import attnctl.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    common = ("eval", "--model", sd3_dir, "--prompts", "single", "--limit", "1", "--steps", "1")
    for args, message in (
        (["--method", "unify_edit"], "--method unify_edit edits an existing image"),
        (["--method", "value_sharing"], "--method value_sharing edits an existing image"),
        (["--method", "epipolar", "--config", '{"rig": {"kind": "stereo"}}'], "makes a set of views of each prompt"),
        (["--method", "isolation", "--config", '{"subjects": ["circle"], "references": true}'],
         "with references=true repositions each subject"),
        (["--method", "probe", "--config", '{"kind": "softpag", "words": ["circle"]}'],
         "--config says kind 'softpag' and --method says 'probe'"),
        (["--method", "regulaton", "--words-from", "shapes"], "--method 'regulaton' is not a control kind"),
    ):
        result = run(*common, *args)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (args, result.output)
    monkeypatch.undo()
    ok(run(*common, "--method", "probe", "--config", '{"kind": "probe"}', "--words-from", "shapes"))  # the same kind


def test_json_argument_files_that_are_not_utf8_are_one_clear_line(sd3_dir, tmp_path):
    """An image saved under a .json name ended in a UnicodeDecodeError traceback."""
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    for args in (["generate", "--model", sd3_dir, "-p", "a red circle", "-c", f"@{binary}"],
                 ["eval", "--model", sd3_dir, "--prompts", binary],
                 ["headhunt", "--model", sd3_dir, "--prompts", binary, "--out", tmp_path / "hh"]):
        result = run(*args)
        assert result.exit_code == 2 and "is not a UTF-8 JSON text file" in " ".join(result.stderr.split()), \
            (args, result.output, result.exception)


def test_inspect_a_folder_whose_transformer_config_is_not_a_json_object(tmp_path):
    """A corrupt transformer/config.json ended in a JSONDecodeError traceback, a list in an AttributeError."""
    folder = tmp_path / "pipe"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    for text, message in (("{broken", "cannot read the transformer config"), ("[1, 2]", "is not a JSON object")):
        (folder / "transformer" / "config.json").write_text(text)
        result = run("inspect", "--model", folder)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output


def test_toy_train_refuses_zero_minutes(tmp_path):
    result = run("toy", "train", "--model", "toy-sd3", "--out", tmp_path / "m0", "--minutes", "0")
    assert result.exit_code == 2 and "leaves no time to train" in " ".join(result.stderr.split())
    assert not (tmp_path / "m0").exists()


def test_eval_names_punctuation_as_the_unknown_word(sd3_dir, tmp_path):
    """"a red circle." was refused for the word 'circle.' (generate named '.')."""
    path = tmp_path / "dot.json"
    path.write_text(json.dumps(["a red circle."]))
    result = run("eval", "--model", sd3_dir, "--prompts", path)
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "'.'" in text and "'circle.'" not in text, result.output
