"""``attnctl batch``: schema, outputs, resume after kill / Ctrl-C, multi-process, metadata round trip.

Every run uses a tiny SD3 pipeline folder (random weights, 32×32, 2 steps) so the whole file stays short.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnctl.batch import (
    MANIFEST_NAME,
    SCHEMA_PATH,
    BatchFileError,
    ManifestWriter,
    _settings_hash,
    check_against_model,
    consolidate_manifest,
    iter_records,
    load_batch,
    model_problems,
    plan_batch,
    read_manifest,
    safe_stem,
    schema_text,
    share_out,
)
from attnctl.cli import app
from attnctl.controls.value_sharing import ValueSharing
from attnctl.imageio import read_image, read_metadata
from attnctl.layout import phrases_apart
from attnctl.rf_inversion import RFInversion
from attnctl.testing import save_pipeline, tiny_sd3_pipeline

runner = CliRunner()
PYTHON = sys.executable


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_pipeline(tiny_sd3_pipeline("sd3"), tmp_path_factory.mktemp("models") / "tiny-sd3")


def write_batch(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def run(*args) -> object:
    args = [str(a) for a in args]
    if args[0] == "batch":  # one torch thread: what the subprocesses use, and fast on a busy machine
        args += ["--threads", "1"]
    return runner.invoke(app, args)


_FAILING = """
import os
if os.environ.get("ATTNCTL_TEST_FAILING_PROMPT"):  # a test's stand-in for an item that fails when it runs
    import attnctl.batch as batch
    real = batch._Generator.generate
    def generate(self, job, source):
        if job.settings["prompt"] == os.environ.get("ATTNCTL_TEST_FAILING_PROMPT"):
            raise RuntimeError("not enough memory for this item")
        return real(self, job, source)
    batch._Generator.generate = generate
"""


@pytest.fixture
def failing_prompt(tmp_path, monkeypatch):
    """Items with this prompt fail when they run (as an out-of-memory error would), here and in worker processes
    (a ``sitecustomize`` on their path): every other problem is found before the first image. Clear the returned
    set to let them run."""
    import attnctl.batch

    prompt, failing = "a purple circle", {"a purple circle"}
    real = attnctl.batch._Generator.generate

    def generate(self, job, source):
        if job.settings["prompt"] in failing:
            raise RuntimeError("not enough memory for this item")
        return real(self, job, source)

    monkeypatch.setattr(attnctl.batch._Generator, "generate", generate)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_FAILING)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ATTNCTL_TEST_FAILING_PROMPT", prompt)
    return failing


def pngs(folder: Path) -> dict[str, str]:
    """Visible PNG files → hash of their pixels."""
    return {p.name: hashlib.sha256(read_image(p).tobytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def raw_records(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("manifest*.jsonl")) for r in iter_records(p)]


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def start(batch: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "attnctl", "batch", str(batch), "--out", str(out), "--model",
                             str(model), *extra], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_done(out: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Poll the manifest until one image is recorded done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["status"] == "done" for r in raw_records(out)) if out.is_dir() else False:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the batch ended before the first image: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no image was done in time")


# ---------------------------------------------------------------------------------------------- schema


def test_shipped_json_schema_is_current():
    assert SCHEMA_PATH.read_text() == schema_text(), "regenerate: python -c 'import attnctl.batch as b; " \
                                                     "b.write_schema()'"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["properties"]["version"]["const"] == 1
    assert "GenerateItem" in schema["$defs"]


@pytest.mark.parametrize("change", [
    {}, {"id": "a"}, {"id": 7}, {"id": ""}, {"id": "x" * 201}, {"boxes": {"circle": []}},
    {"boxes": {"circle": [0, 0, 0.5, 0.5]}}, {"boxes": {"circle": [[0, 0, 0.5, 0.5]]}}, {"top": {"schema_": "x"}},
    {"top": {"$schema": "x"}}])
def test_the_shipped_schema_and_the_loader_agree(change):
    """A batch file the shipped JSON Schema accepts, the loader accepts, and one it refuses, the loader refuses, for
    the checks the schema can say (id lengths, box lists, the header's "$schema" as written)."""
    import jsonschema

    from attnctl.errors import AttnCtlError

    change = dict(change)
    data = {"version": 1, **change.pop("top", {}), "items": [{"prompt": "a red circle", **change}]}
    schema_ok = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).is_valid(data)
    try:
        load_batch(data)
        loader_ok = True
    except AttnCtlError:
        loader_ok = False
    assert schema_ok == loader_ok, (schema_ok, loader_ok)


def test_schema_errors_one_clear_message_per_problem(tmp_path):
    data = {
        "version": 1,
        "defaults": {"steps": 2, "controls": [{"kind": "softpag", "heads": "L0H1", "scale": "linear(nan, 0)"}]},
        "items": [
            {"id": "ok", "prompt": "a red circle"},
            {"id": "noprompt", "seed": 1},                                                      # 1 missing prompt
            {"prompt": "a red circle", "seed": "3", "steps": 2.5},                              # 2 wrong types
            {"prompt": "a red circle", "controls": [{"kind": "nosuch"}]},                       # 3 unknown control
            {"prompt": "a red circle", "controls": [{"kind": "probe", "weight": float("nan")}]},  # 4 NaN schedule
            {"prompt": "a red circle", "boxes": {"circle": [0.2, 0.1, 1.5, 0.6], "square": [[0.6, 0.1, 0.2, 0.5]]}},
            {"prompt": "a red circle", "seeed": 4},                                             # 6 typo
            {"type": "reference", "prompt": "a red circle"},                                    # 7 reserved type
            {"prompt": "a red circle", "guidance": float("nan")},                               # 8 NaN guidance
            {"prompt": "a red circle", "controls": [{"kind": ["probe"]}]},                      # 9 kind not a name
        ],
    }
    with pytest.raises(BatchFileError) as err:
        load_batch(write_batch(tmp_path / "bad.json", data))
    problems = err.value.problems
    expected = [
        ("defaults: field 'controls[0]'", "nan"),
        ("item 1 (id 'noprompt'): field 'prompt' is required", ""),
        ("item 2: field 'seed': Input should be a valid integer", '"3"'),
        ("item 2: field 'steps': Input should be a valid integer", "2.5"),
        ("item 3: field 'controls[0]': unknown control kind 'nosuch'", "known kinds"),
        ("item 4: field 'controls[0]': invalid probe control config", "nan"),
        ("item 5: field 'boxes.circle[0][2]': Input should be less than or equal to 1", "1.5"),
        ("item 5: field 'boxes.square[0]': x0 (0.6) must be less than x1 (0.2)", ""),
        ("item 5: field 'boxes.square'", "does not occur in the prompt"),
        ("item 6: unknown field 'seeed'", "did you mean 'seed'?"),
        ("item 7: field 'type': item type 'reference' is not supported yet", ""),
        ("item 8: field 'guidance': Input should be a finite number", "NaN"),
        ("item 9: field 'controls[0]': unknown control kind ['probe']", "known kinds"),
    ]
    for start_text, also in expected:
        hits = [p for p in problems if p.startswith(start_text) and also in p]
        assert len(hits) == 1, f"{start_text!r} + {also!r} not reported exactly once in:\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)
    assert not any(p.startswith("item 0") for p in problems)

    # the command prints every problem on its own line, exit code 2, and makes nothing
    result = run("batch", tmp_path / "bad.json", "--out", tmp_path / "out")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "13 problems" in text and "item 6: unknown field 'seeed' (did you mean 'seed'?)" in text
    assert not (tmp_path / "out").exists()


def test_file_level_errors_and_defaults(tmp_path):
    with pytest.raises(BatchFileError) as err:
        load_batch({"version": 2, "itmes": [], "defaults": {"sed": 1}})
    text = "\n".join(err.value.problems)
    assert "field 'version': 2 is not supported" in text
    assert "unknown field 'itmes' (did you mean 'items'?)" in text
    assert "defaults: unknown field 'sed' (did you mean 'seed'?)" in text
    assert "field 'items' is required" in text

    plan = load_batch({
        "version": 1,
        "defaults": {"prompt": "a red circle", "seeds": [0, 1], "steps": 3,
                     "controls": [{"kind": "probe", "words": ["circle"]}]},
        "items": [{}, {"id": 7, "seed": 9, "controls": []}, {"id": "sq", "prompt": "a blue circle", "steps": 5}],
    })
    assert [(j.id, j.seed, j.file) for j in plan.jobs] == [
        ("0", 0, "0_s0.png"), ("0", 1, "0_s1.png"), ("7", 9, "7_s9.png"), ("sq", 0, "sq_s0.png"),
        ("sq", 1, "sq_s1.png")]
    by_file = {j.file: j for j in plan.jobs}
    assert by_file["7_s9.png"].settings["controls"] == [] and by_file["0_s0.png"].settings["controls"][0]["kind"] \
        == "probe"
    assert by_file["sq_s1.png"].settings["steps"] == 5 and by_file["0_s1.png"].settings["steps"] == 3
    assert len({j.hash for j in plan.jobs}) == len(plan.jobs)

    with pytest.raises(BatchFileError) as err:
        load_batch({"version": 1, "items": [{"prompt": "a"}, {"id": "0", "prompt": "b"}, {"id": "A", "prompt": "c"},
                                            {"id": "a", "prompt": "d"}]})
    text = "\n".join(err.value.problems)
    assert "item 1 (id '0'): field 'id': '0' is already the id of item 0" in text
    assert "item 3 (id 'a'): field 'id': its image 'a_s0.png' would overwrite 'A_s0.png' of item 2" in text


def test_hostile_ids_become_safe_distinct_names():
    names = {i: safe_stem(i) for i in ["../../etc/x", "/abs/path", "a/b", "a_b", "..", ".hidden", "CON", "ok-1.v2"]}
    assert names["a_b"] == "a_b" and names["ok-1.v2"] == "ok-1.v2"
    assert len(set(names.values())) == len(names)
    for stem in names.values():
        assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and stem not in ("", "..")


def test_manifest_tolerates_a_torn_last_line(tmp_path):
    shard = tmp_path / MANIFEST_NAME
    w = ManifestWriter(shard)
    w.append({"file": "a_s0.png", "status": "done", "hash": "h", "time": 1.0})
    w.close()
    with open(shard, "ab") as f:
        f.write(b'{"file": "b_s0.png", "stat')  # a writer killed mid-line
    assert list(read_manifest(tmp_path)) == ["a_s0.png"]
    w = ManifestWriter(shard)  # the next writer starts a fresh line
    w.append({"file": "b_s0.png", "status": "failed", "hash": "h", "time": 2.0})
    w.close()
    assert {k: v["status"] for k, v in read_manifest(tmp_path).items()} == {"a_s0.png": "done", "b_s0.png": "failed"}

    # rank shards merge into manifest.jsonl: history kept in time order, a record already merged kept once
    w = ManifestWriter(tmp_path / "manifest.rank1.jsonl")
    w.append({"file": "b_s0.png", "status": "done", "hash": "h", "time": 3.0, "rank": 1})
    w.append({"file": "a_s0.png", "status": "done", "hash": "h", "time": 1.0})  # merged before a crash
    w.close()
    assert read_manifest(tmp_path)["b_s0.png"]["status"] == "done"
    consolidate_manifest(tmp_path)
    assert [p.name for p in tmp_path.glob("manifest*.jsonl")] == [MANIFEST_NAME]
    assert [(r["file"], r["status"]) for r in iter_records(tmp_path / MANIFEST_NAME)] == \
        [("a_s0.png", "done"), ("b_s0.png", "failed"), ("b_s0.png", "done")]


# ---------------------------------------------------------------------------------------------- runs


def test_run_failures_resume_hostile_id_and_regeneration_from_png(model_dir, tmp_path, failing_prompt):
    batch = write_batch(tmp_path / "b.json", {
        "version": 1,
        "defaults": {"steps": 2},
        "items": [
            {"id": "red", "prompt": "a red circle on the left", "seeds": [0, 1],
             "controls": [{"kind": "probe", "words": ["circle"], "sites": "L1"}]},
            {"id": "../../etc/x", "prompt": "a blue square", "seed": 3},
            {"id": "bad", "prompt": "a purple circle"},  # fails when it runs: the rest goes on, a re-run retries it
        ],
    })
    out = tmp_path / "deep" / "out"
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 1, result.output
    assert "1 of 4 images failed" in " ".join(result.output.split())
    files = {name: digest for name, digest in pngs(out).items() if ".attention-" not in name}
    assert set(files) == {"red_s0.png", "red_s1.png", f"{safe_stem('../../etc/x')}_s3.png"}
    assert set(pngs(out)) - set(files) == {"red_s0.attention-circle.png", "red_s1.attention-circle.png"}  # the probe's
    assert not list(tmp_path.rglob("etc")) and all(p.parent == out for p in tmp_path.rglob("*.png"))
    records = read_manifest(out)
    assert records["bad_s0.png"]["status"] == "failed"
    assert records["bad_s0.png"]["error"] == "RuntimeError: not enough memory for this item"
    assert all(records[f]["status"] == "done" and records[f]["seconds"] > 0 for f in files)

    # the PNG carries everything: generate --from regenerates the identical image
    meta = read_metadata(out / "red_s1.png")
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["model"]) == \
        ("a red circle on the left", 1, 2, str(model_dir.resolve()))
    assert meta["controls"][0]["kind"] == "probe" and meta["batch"]["id"] == "red"
    again = tmp_path / "again.png"
    result = run("generate", "--from", out / "red_s1.png", "--out", again)
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_image(again), read_image(out / "red_s1.png"))

    # re-run: done images are skipped, the failed one is retried (and fails again)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 1 and "3 already, 0 new" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes

    # the bad item can run now, and one item is changed: only those two are made; now everything is done
    failing_prompt.clear()
    data = json.loads(batch.read_text())
    data["items"][1]["steps"] = 3
    write_batch(batch, data)
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "4 done (2 already, 2 new)" in result.output
    assert {p.name for p in out.glob("*.png") if p.stat().st_mtime_ns != mtimes.get(p.name)} == \
        {"bad_s0.png", f"{safe_stem('../../etc/x')}_s3.png"}
    assert read_metadata(out / f"{safe_stem('../../etc/x')}_s3.png")["steps"] == 3


def test_a_redone_item_takes_its_old_companion_files_with_it(model_dir, tmp_path):
    """An item whose probe words or references changed is made again; the maps of words it no longer probes and
    the references it no longer has went on lying beside the new image, claimed by it in their metadata."""
    items = [{"id": "c", "prompt": "a blue square", "controls": [{"kind": "probe", "words": ["square"]}]},
             {"id": "d", "prompt": "a red circle and a blue square", "controls": [
                 {"kind": "isolation", "subjects": ["red circle", "blue square"], "references": True}],
              "reference_prompts": ["a small red circle", "a large blue square"]}]
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": items})
    out = tmp_path / "out"
    (out).mkdir()
    (out / "c_s0-notes.png").write_bytes((tmp_path / "b.json").read_bytes())  # not attnctl's: left alone
    assert run("batch", batch, "--out", out, "--model", model_dir).exit_code == 0
    assert {"c_s0.attention-square.png", "d_s0-ref1.png", "d_s0-ref2.png"} <= {p.name for p in out.glob("*.png")}
    items[0]["controls"][0]["words"] = ["blue"]
    del items[1]["reference_prompts"], items[1]["controls"]
    write_batch(batch, {"version": 1, "defaults": {"steps": 2}, "items": items})
    assert run("batch", batch, "--out", out, "--model", model_dir).exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["c_s0-notes.png", "c_s0.attention-blue.png", "c_s0.png",
                                                        "d_s0.png"]


def test_a_full_disk_is_one_clear_line(model_dir, tmp_path, monkeypatch):
    """A write that fails for space (no file name on the error) said so in a chained traceback, with exit code 1,
    which means "some images failed"; it is one line naming the way out, exit code 2."""
    import errno

    import attnctl.batch

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attnctl.batch.ManifestWriter, "append", full)
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2},
                                              "items": [{"id": "a", "prompt": "a red circle"}]})
    result = run("batch", batch, "--out", tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "a write failed: No space left on device" in result.stderr and "free space" in result.stderr


def test_compile_makes_the_same_images_and_is_not_part_of_the_hash(model_dir, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    batch = write_batch(tmp_path / "b.json", {
        "version": 1,
        "defaults": {"steps": 2},
        "items": [{"id": "red", "prompt": "a red circle on the left", "seeds": [0, 1],
                   "controls": [{"kind": "softpag", "heads": "all", "scale": 2.0}]},
                  {"id": "blue", "prompt": "a blue square", "seed": 3}],
    })
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    torch._dynamo.reset()
    counters.clear()
    try:
        result = run("batch", batch, "--out", plain, "--model", model_dir)
        assert result.exit_code == 0, result.output
        result = run("batch", batch, "--out", compiled, "--model", model_dir, "--compile", "eager")
        assert result.exit_code == 0 and "3 done" in result.output, result.output
        assert counters["stats"]["unique_graphs"] > 0  # the transformer ran compiled
    finally:
        torch._dynamo.reset()
    assert pngs(compiled) == pngs(plain) and len(pngs(plain)) == 3  # same names, same pixels
    meta = read_metadata(compiled / "red_s1.png")
    assert meta["compile"] == "eager" and read_metadata(plain / "red_s1.png")["compile"] is None
    assert meta["batch"]["hash"] == read_metadata(plain / "red_s1.png")["batch"]["hash"]
    assert {f: r["hash"] for f, r in read_manifest(compiled).items()} == \
        {f: r["hash"] for f, r in read_manifest(plain).items()}

    # resumed without --compile: everything is done (the hash did not change), nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in compiled.glob("*.png")}
    result = run("batch", batch, "--out", compiled, "--model", model_dir)
    assert result.exit_code == 0 and "3 done (3 already, 0 new)" in result.output, result.output
    assert {p.name: p.stat().st_mtime_ns for p in compiled.glob("*.png")} == mtimes
    for extra in ((), ("--compile", "eager")):  # --check lists them done, with or without the option
        result = run("batch", batch, "--out", compiled, "--model", model_dir, "--check", *extra)
        assert result.exit_code == 0 and "valid, 2 items, 3 images (3 done)" in result.output, result.output


def test_interrupt_and_kill_then_rerun_makes_every_image_exactly_once(model_dir, tmp_path):
    # 128×128 images with 4 steps: slow enough that the signals land mid-run
    items = [{"id": f"i{i}", "prompt": "a red circle", "seed": i} for i in range(10)]
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 4, "height": 128, "width": 128},
                                              "items": items})
    out = tmp_path / "out"
    expected = {f"i{i}_s{i}.png" for i in range(10)}

    # SIGKILL: whatever the moment, no partial PNG under a final name, whole records only
    proc = start(batch, out, model_dir)
    wait_for_done(out, proc)
    proc.kill()
    proc.communicate()
    for name in pngs(out):  # every visible PNG decodes (read_image raised otherwise) and carries its metadata
        assert read_metadata(out / name)["batch"]["id"] == name.split("_s")[0]
    done = {f for f, r in read_manifest(out).items() if r["status"] == "done"}
    assert done <= set(pngs(out)) and 0 < len(pngs(out)) < 10, "the kill came too late to test anything"
    # what a kill in the middle of a write leaves: a hidden temp file and a torn manifest line
    (out / ".i9_s9.png.k1ll3d.tmp").write_bytes(b"\x89PNG half")
    with open(out / MANIFEST_NAME, "ab") as f:
        f.write(b'{"file": "i9_s9.png", "status": "do')

    # Ctrl-C (SIGINT, here to this process): the current image is finished and recorded, then exit code 130
    before = sum(r["status"] == "done" for r in raw_records(out))

    def interrupt_after_next_image() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if sum(r["status"] == "done" for r in raw_records(out)) > before:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt_after_next_image, daemon=True)
    watcher.start()
    result = run("batch", batch, "--out", out, "--model", model_dir)
    watcher.join()
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    done = {f for f, r in read_manifest(out).items() if r["status"] == "done"}
    assert done <= set(pngs(out)) and len(done) < 10  # every image recorded done is there

    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert set(pngs(out)) == expected
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    done_records = [r["file"] for r in raw_records(out) if r["status"] == "done"]
    assert sorted(done_records) == sorted(expected), "an image was made twice or not recorded"


def test_two_processes_make_the_same_files_as_one_none_twice(model_dir, tmp_path, monkeypatch, capfd,
                                                             failing_prompt):
    items = [{"id": f"p{i}", "prompt": p, "seeds": [i, i + 10]}
             for i, p in enumerate(["a red circle", "a blue square on the left", "two green triangles"])]
    items.append({"id": "bad", "prompt": "a purple circle"})  # fails when it runs, in whichever worker takes it
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": items})
    one, two = tmp_path / "one", tmp_path / "two"
    result = run("batch", batch, "--out", one, "--model", model_dir)
    assert result.exit_code == 1, result.output

    # the launcher runs here (as `attnctl batch --processes 2` would); its two workers are real processes
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    result = run("batch", batch, "--out", two, "--model", model_dir, "--processes", "2")
    worker_out, worker_err = capfd.readouterr()
    assert result.exit_code == 1, result.output + worker_out + worker_err
    assert "on 2 processes" in worker_out and "1 of 7 images failed" in " ".join(worker_err.split())
    assert pngs(two) == pngs(one) and len(pngs(one)) == 6  # same names, same pixels
    records = raw_records(two)
    assert sorted(r["file"] for r in records) == sorted([*pngs(one), "bad_s0.png"])  # each image exactly once
    assert {r["rank"] for r in records} == {0, 1}
    assert [p.name for p in two.glob("manifest*.jsonl")] == [MANIFEST_NAME]  # shards merged

    # the merged manifest of a 2-process run resumes like any other: everything done but the failed image
    result = run("batch", batch, "--out", two, "--model", model_dir)
    assert result.exit_code == 1 and "6 already, 0 new" in result.output, result.output


def test_a_probe_item_writes_its_maps_and_a_lost_map_is_redone(model_dir, tmp_path):
    """A probe in a batch item leaves its maps: one heatmap per word and image, beside the image, the map of that
    image's run coloured over it; the maps are files of the job, so a deleted one makes the image again."""
    import attnctl
    from attnctl.cli import load_pipeline
    from attnctl.ui.heatmap import normalize, overlay

    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": [
        {"id": "p", "prompt": "a red circle and a blue square", "seeds": [0, 1],
         "controls": [{"kind": "probe", "words": ["circle", "blue square"]}]}]})
    out = tmp_path / "out"
    assert run("batch", batch, "--out", out, "--model", model_dir).exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "p_s0.attention-blue-square.png", "p_s0.attention-circle.png", "p_s0.png",
        "p_s1.attention-blue-square.png", "p_s1.attention-circle.png", "p_s1.png"]
    pipe = load_pipeline(str(model_dir))
    probe = attnctl.AttentionProbe(words=["circle", "blue square"])
    image = pipe("a red circle and a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                 controls=[probe]).images[0]
    assert np.array_equal(np.asarray(image), read_image(out / "p_s1.png"))
    expected = overlay(image, normalize(probe.word_maps()["blue square"][0].numpy()))
    assert np.array_equal(np.asarray(expected), read_image(out / "p_s1.attention-blue-square.png"))
    assert read_metadata(out / "p_s1.attention-circle.png")["attention_map_of"] == "p_s1.png"

    (out / "p_s1.attention-circle.png").unlink()
    mtime = (out / "p_s0.png").stat().st_mtime_ns
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 already, 1 new" in result.output
    assert (out / "p_s1.attention-circle.png").is_file() and (out / "p_s0.png").stat().st_mtime_ns == mtime


def test_a_layout_control_takes_each_items_boxes():
    layout = {"kind": "layout", "scale": "window(0.2, 0, 0.3)"}
    plan = plan_batch({"version": 1, "defaults": {"controls": [layout]}, "items": [
        {"prompt": "a red circle and a blue square", "boxes": {"red": [0, 0, 0.5, 0.5], "blue": [[0.5, 0.5, 1, 1]]}},
        {"prompt": "a green triangle", "boxes": {"green": [0.2, 0.2, 0.8, 0.8]},
         "controls": [{"kind": "layout", "boxes": {"triangle": [0, 0, 1, 1]}}]},  # its own boxes win
    ]})
    first, second = (job.settings["controls"][0] for job in plan.jobs)
    assert first["boxes"] == {"red": [0, 0, 0.5, 0.5], "blue": [0.5, 0.5, 1, 1]} and first["scale"]["value"] == 0.2
    assert second["boxes"] == {"triangle": [0, 0, 1, 1]}
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "defaults": {"controls": [layout]}, "items": [
            {"prompt": "a red circle"},
            {"prompt": "two red circles", "boxes": {"circles": [[0, 0, 0.4, 0.4], [0.6, 0.6, 1, 1]]}},
        ]})
    text = str(err.value)
    assert "item 0" in text and "boxes" in text and "Field required" in text
    assert "item 1" in text and "one box per word" in text and "'circles' 2" in text


# ---------------------------------------------------------------------------------------------- edit items

EDIT_SOURCE, EDIT_TARGET = "a red circle and a blue square", "a green circle and a blue square"


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    from attnctl.toyworld.world import parse_caption, render, scene_from_item

    item = {"prompt": EDIT_SOURCE, **parse_caption(EDIT_SOURCE),
            "boxes": [[0.1, 0.1, 0.45, 0.45], [0.55, 0.5, 0.9, 0.85]]}
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(render(scene_from_item(item), 32)).save(path)
    return path


def test_edit_items_are_checked_for_their_own_fields(tmp_path, scene_png):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "scene.png").write_bytes(scene_png.read_bytes())
    (tmp_path / "notes.png").write_text("not an image")
    edit = {"type": "edit", "image": "img/scene.png", "source_prompt": EDIT_SOURCE, "prompt": EDIT_TARGET}
    data = {"version": 1, "defaults": {"steps": 3, "controls": [{"kind": "unify_edit"}]}, "items": [
        {"type": "edit", "prompt": EDIT_TARGET},                                             # 0 image, source missing
        {**edit, "seed": 3, "mask": "m.png"},                                                # 1 generate-only, mask
        {**edit, "image": "nope.png"},                                                       # 2 no such file
        {**edit, "image": "notes.png"},                                                      # 3 not an image
        {**edit, "prompt": EDIT_SOURCE},                                                     # 4 nothing to edit
        {**edit, "controls": [{"kind": "probe", "words": ["circle"]}]},                      # 5 not UnifyEdit
        {"prompt": "a red circle", "image": "img/scene.png", "controls": []},               # 6 edit field on generate
        {"prompt": "a red circle"},                                                          # 7 unify_edit inherited
        {**edit, "solver": "heun"},                                                          # 8 no such solver
        {"prompt": "a red circle", "solver": "midpoint", "controls": []},                  # 9 edit field on generate
        {**edit, "rf_inversion": {"gamma": 2}},                                              # 10 bad RF settings
        {**edit, "rf_inversion": 0.5},                                                       # 11 not an object
        {"prompt": "a red circle", "rf_inversion": {}, "controls": []},                    # 12 edit field on generate
        {**edit, "controls": [{"kind": "unify_edit", "scale": -1}], "rf_inversion": {"gamma": 2}},  # 13 both reported
        {**edit, "value_sharing": {"tokens": "text"}},                                       # 14 bad sharing settings
        {**edit, "value_sharing": [1]},                                                      # 15 not an object
        {**edit, "value_sharing": {"kind": "unify_edit"}},                                   # 16 another control
        {"prompt": "a red circle", "value_sharing": {}, "controls": []},                   # 17 edit field on generate
        {**edit, "controls": [{"kind": "unify_edit", "scale": -1}], "value_sharing": {"weight": 2}},  # 18 both
        {"prompt": "a red circle", "controls": [{"kind": "value_sharing"}]},                 # 19 sharing as a control
        {**edit, "controls": [{"kind": "value_sharing"}]},                                   # 20 the same in an edit
    ]}
    with pytest.raises(BatchFileError) as err:
        load_batch(write_batch(tmp_path / "bad.json", data))
    problems = err.value.problems
    expected = [
        ("item 0: field 'image' is required", ""),
        ("item 0: field 'source_prompt' is required", ""),
        ("item 1: field 'seed' is not used by edit items", "inverted noise"),
        ("item 1: field 'mask' is not an edit item field", "unify_edit control's box"),
        ("item 2: field 'image': cannot read", "batch file's folder"),
        ("item 3: field 'image':", "not an image file"),
        ("item 4: field 'prompt':", "nothing to edit"),
        ("item 5: field 'controls[0]': an edit item runs UnifyEdit", "'probe'"),
        ("item 6: field 'image' belongs to edit items", "\"type\": \"edit\""),
        ("item 7: field 'controls' (from defaults): the unify_edit control edits an existing image", ""),
        ("item 8: field 'solver'", "midpoint"),
        ("item 9: field 'solver' belongs to edit items", "\"type\": \"edit\""),
        ("item 10: field 'rf_inversion': RF-Inversion settings: gamma", "less than or equal to 1"),
        ("item 11: field 'rf_inversion'", ""),
        ("item 12: field 'rf_inversion' belongs to edit items", "\"type\": \"edit\""),
        ("item 13: field 'controls[0]'", "scale"),
        ("item 13: field 'rf_inversion'", "gamma"),
        ("item 14: field 'value_sharing': invalid value_sharing control config — tokens", "'all' or 'image'"),
        ("item 15: field 'value_sharing'", ""),
        ("item 16: field 'value_sharing': value-sharing settings have the kind 'unify_edit'", 'leave "kind" out'),
        ("item 17: field 'value_sharing' belongs to edit items", "\"type\": \"edit\""),
        ("item 18: field 'controls[0]'", "scale"),
        ("item 18: field 'value_sharing'", "weight"),
        ("item 19: field 'controls': value_sharing acts in an edit", '"value_sharing": {...}'),
        ("item 20: field 'controls[0]': an edit item runs UnifyEdit", 'field "value_sharing"'),
    ]
    for start_text, also in expected:
        hits = [p for p in problems if p.startswith(start_text) and also in p]
        assert len(hits) == 1, f"{start_text!r} + {also!r} not reported exactly once in:\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)

    # a file of edits only: the defaults' generate fields would do nothing, so they are refused
    with pytest.raises(BatchFileError) as err:
        load_batch(write_batch(tmp_path / "edits.json", {"version": 1, "defaults": {"seeds": [0, 1], "steps": 3},
                                                        "items": [edit]}))
    assert err.value.problems == ["defaults: field 'seeds' is for generate items, and every item of this file is an "
                                  "edit; remove it (an edit takes only steps, guidance, max_sequence_length from "
                                  "defaults)"]

    # a good file: one PNG per edit named by its id, the image read from the file's folder and hashed by content
    good = write_batch(tmp_path / "good.json", {"version": 1, "defaults": {"steps": 3}, "items": [
        {**edit, "id": "green"}, {"prompt": "a red circle", "id": "red"}]})
    plan = load_batch(good)
    job = plan.jobs[0]
    assert (job.file, job.seed, job.kind, job.label, job.image) == \
        ("green.png", None, "edit", "edit", tmp_path / "img" / "scene.png")
    assert job.settings["steps"] == 3 and job.settings["controls"][0]["kind"] == "unify_edit"
    assert "solver" not in job.settings  # the default leaves the hash of an Euler edit as it was before the field
    assert "rf_inversion" not in job.settings  # so does leaving RF-Inversion out
    assert "value_sharing" not in job.settings  # and value sharing
    assert [j.file for j in plan.jobs] == ["green.png", "red_s0.png"]
    # RF-Inversion settings that change nothing change no hash: gamma 0 draws no noise sample (its seed is moot), and
    # gamma 0 with eta 0 is no RF-Inversion at all
    variants = [{}, {"rf_inversion": {"gamma": 0, "eta": 0, "seed": 3}}, {"rf_inversion": {"gamma": 0, "seed": 1}},
                {"rf_inversion": {"gamma": 0, "seed": 2}}, {"rf_inversion": {"seed": 1}}, {"rf_inversion": {"seed": 2}}]
    hashes = [load_batch(write_batch(tmp_path / f"rf{i}.json", {"version": 1, "defaults": {"steps": 3}, "items": [
        {**edit, **v}]})).jobs[0].hash for i, v in enumerate(variants)]
    assert hashes[0] == hashes[1] == job.hash and hashes[2] == hashes[3] and len(set(hashes)) == 4
    # value sharing: a weight of 0 throughout shares nothing (the edit without it, whatever its tokens); one setting in
    # any spelling is one hash
    window = {"kind": "window", "value": 1, "start": 0, "stop": 0.15}
    variants = [{}, {"value_sharing": {"weight": 0, "tokens": "image"}}, {"value_sharing": None},
                {"value_sharing": {"weight": "window(1, 0.6, 0.7)"}},  # on between the 3 steps' progress 0, 0.5, 1
                {"value_sharing": {}}, {"value_sharing": {"kind": "value_sharing", "weight": window, "sites": "late"}},
                {"value_sharing": {"tokens": "image"}}]
    hashes = [load_batch(write_batch(tmp_path / f"share{i}.json", {"version": 1, "defaults": {"steps": 3}, "items": [
        {**edit, **v}]})).jobs[0].hash for i, v in enumerate(variants)]
    assert hashes[0] == hashes[1] == hashes[2] == hashes[3] == job.hash and hashes[4] == hashes[5]
    assert len(set(hashes)) == 3
    (tmp_path / "img" / "scene.png").write_bytes(scene_png.read_bytes() + b"\0")  # other bytes: another hash
    assert load_batch(good).jobs[0].hash != job.hash and load_batch(good).jobs[1].hash == plan.jobs[1].hash


def test_items_the_model_cannot_run_are_refused_before_the_first_image(model_dir, tmp_path, scene_png, monkeypatch):
    from attnctl.cli import load_pipeline
    from attnctl.skeleton import pipeline_skeleton

    (tmp_path / "scene.png").write_bytes(scene_png.read_bytes())
    Image.open(scene_png).crop((0, 0, 30, 32)).save(tmp_path / "odd.png")
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": [
        {"id": "ok", "prompt": "a red circle", "controls": [{"kind": "softpag", "heads": "L1H0"}]},
        {"id": "pag", "prompt": "a red circle", "controls": [{"kind": "softpag", "heads": "L40H0"}]},
        {"id": "cfg", "prompt": "a red circle", "true_cfg": 3.0},
        {"id": "words", "prompt": "a green banana"},
        {"id": "reg", "prompt": "a red circle",
         "controls": [{"kind": "regulation", "targets": ["circle"], "sites": "transformer_blocks.99"}]},
        {"type": "edit", "id": "share", "image": "scene.png", "source_prompt": EDIT_SOURCE, "prompt": EDIT_TARGET,
         "value_sharing": {"sites": "transformer_blocks.77"}},
        {"id": "big", "prompt": "a red circle", "height": 512},  # past the model's position table
        {"id": "odd", "prompt": "a red circle", "width": 30},  # not a multiple of 4 px
        {"type": "edit", "id": "crop", "image": "odd.png", "source_prompt": EDIT_SOURCE, "prompt": EDIT_TARGET},
    ]})
    plan = load_batch(batch, model=str(model_dir))

    # from the configs alone: the skeleton holds no weights and finds what the loaded pipeline finds
    skeleton = pipeline_skeleton(str(model_dir))
    assert all(p.device.type == "meta" for p in skeleton.transformer.parameters())
    found = model_problems(plan, skeleton)
    assert found == model_problems(plan, load_pipeline(str(model_dir)))
    assert [line.split(":")[0] for line in found] == \
        ["item 1 (id 'pag')", "item 2 (id 'cfg')", "item 3 (id 'words')", "item 4 (id 'reg')", "item 5 (id 'share')",
         "item 6 (id 'big')", "item 7 (id 'odd')", "item 8 (id 'crop')"]
    assert "'L40'" in found[0] and "true_cfg" in found[1] and "'banana'" in found[2]
    assert "transformer_blocks.99" in found[3] and "transformer_blocks.77" in found[4]
    assert "field 'height' 512 is past this model's largest side, 128 px" in found[5]
    assert "field 'width' 30 is not a multiple of 4 px" in found[6] and "give field 'width' 28 or 32" in found[6]
    assert "the image is 30×32 px, and this model needs sides that are multiples of 4" in found[7]
    with pytest.raises(BatchFileError) as e:
        check_against_model(plan)
    assert e.value.problems == found and str(model_dir) in e.value.source

    # --check and the run both refuse the file, listing every problem; the run makes nothing
    out = tmp_path / "out"
    for extra in (["--check"], []):
        result = run("batch", batch, "--out", out, "--model", model_dir, *extra)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "8 problems" in text and all(line in text for line in found)
    assert not out.exists()

    # a model whose configs cannot be read here (a hub id offline) is run unchecked, and a note says so
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes: list[str] = []
    check_against_model(load_batch(batch, model="nobody/no-such-model"), notes.append)
    assert len(notes) == 1 and "not checked against the model" in notes[0]


def test_an_edit_batch_makes_what_attnctl_edit_makes_inverting_each_image_once(tmp_path, scene_png, monkeypatch):
    import attnctl.editing

    inversions = []
    real_invert = attnctl.editing.invert
    monkeypatch.setattr(attnctl.editing, "invert", lambda *a, **k: inversions.append(a[2]) or real_invert(*a, **k))
    control = {"kind": "unify_edit", "scale": "window(0.2, 0, 0.5)", "sites": "mid"}
    batch = write_batch(tmp_path / "edits.json", {"version": 1, "model": "toy-sd3", "defaults": {"steps": 4},
                                                  "items": [
        {"type": "edit", "id": "green", "image": str(scene_png), "source_prompt": EDIT_SOURCE, "prompt": EDIT_TARGET,
         "controls": [control]},
        {"type": "edit", "id": "yellow", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
         "prompt": "a yellow circle and a blue square"},
        {"type": "edit", "id": "green-share", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
         "prompt": EDIT_TARGET, "controls": [control], "value_sharing": {"tokens": "image"}},
        {"type": "edit", "id": "green-mid", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
         "prompt": EDIT_TARGET, "controls": [control], "solver": "midpoint"},
        {"type": "edit", "id": "green-rf", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
         "prompt": EDIT_TARGET, "controls": [control], "rf_inversion": {"gamma": 0.3, "eta": 0.5}},
        {"type": "edit", "id": "yellow-rf", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
         "prompt": "a yellow circle and a blue square", "rf_inversion": {"gamma": 0.3, "eta": 0.8}},
        {"id": "plain", "prompt": "a red circle", "steps": 2},
    ]})
    out = tmp_path / "out"
    result = run("batch", batch, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(pngs(out)) == {"green.png", "yellow.png", "green-share.png", "green-mid.png", "green-rf.png",
                              "yellow-rf.png", "plain_s0.png"}
    # the second edit of the same image and caption reuses the first's inversion, and so does the value-sharing one
    # (it shares values in the edit only); the midpoint one makes its own, and so do the RF ones, whose inversion is
    # pulled toward noise (their eta differs, which the inversion does not see)
    assert inversions == [EDIT_SOURCE, EDIT_SOURCE, EDIT_SOURCE]
    assert read_metadata(out / "green-mid.png")["solver"] == "midpoint"
    assert read_metadata(out / "green-rf.png")["rf_inversion"] == RFInversion(gamma=0.3, eta=0.5).to_json()
    assert read_metadata(out / "green-share.png")["value_sharing"] == ValueSharing(tokens="image").to_json()
    assert "value_sharing" not in read_metadata(out / "green.png")
    meta = read_metadata(out / "green.png")
    assert (meta["edited_from"], meta["source_prompt"], meta["prompt"], meta["steps"]) == \
        (str(scene_png), EDIT_SOURCE, EDIT_TARGET, 4)
    assert meta["controls"][0]["sites"] == "mid" and meta["batch"]["id"] == "green"
    records = read_manifest(out)
    assert records["green.png"]["status"] == "done" and records["green.png"]["seed"] is None

    # the same edit by `attnctl edit` has the same pixels, and so has each variant of it
    single = tmp_path / "single.png"
    variants = [([], "green"), (["--solver", "midpoint"], "green-mid"),
                (["--rf-settings", '{"gamma": 0.3, "eta": 0.5}'], "green-rf"),
                (["--share-settings", '{"tokens": "image"}'], "green-share")]
    for flags, name in variants:
        result = run("edit", scene_png, "--source", EDIT_SOURCE, "--target", EDIT_TARGET, "--model", "toy-sd3",
                     "--steps", "4", "--control", json.dumps(control), *flags, "--out", single)
        assert result.exit_code == 0, result.output
        assert np.array_equal(read_image(single), read_image(out / f"{name}.png")), name
        if flags:
            assert not np.array_equal(read_image(out / "green.png"), read_image(out / f"{name}.png")), name

    # re-run: all skipped; `generate --from` an edit says how to redo it instead of generating something else
    result = run("batch", batch, "--out", out)
    assert result.exit_code == 0 and "7 already, 0 new" in result.output, result.output
    again = run("generate", "--from", out / "green.png", "--out", tmp_path / "x.png")
    assert again.exit_code == 2 and "is an edit of" in again.output and "attnctl edit" in again.output


def test_processes_share_out_the_images_keeping_edits_of_one_image_together(tmp_path, scene_png):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.open(scene_png).transpose(Image.FLIP_LEFT_RIGHT).save(other)

    def edit(i, image, source=EDIT_SOURCE):
        return {"type": "edit", "id": f"e{i}", "image": str(image), "source_prompt": source,
                "prompt": f"a {['green', 'yellow', 'purple'][i % 3]} circle and a blue square"}

    items = [{"id": "g0", "prompt": "a red circle"}, edit(1, scene_png),
             {**edit(2, scene_png), "value_sharing": {}}, edit(3, scene_png),  # sharing values: the same inversion
             edit(4, other), edit(5, other), edit(6, other, "a circle and a square"), {"id": "g7", "prompt": "a cat"}]
    jobs = plan_batch({"version": 1, "items": items}).jobs
    parts = [[j.id for j in share_out(jobs, r, 2)] for r in range(2)]
    assert sorted(sum(parts, [])) == sorted(j.id for j in jobs)  # every image exactly once
    assert parts == [["g0", "e4", "e5", "e6"], ["e1", "e2", "e3", "g7"]]  # each inversion on one rank
    plain = plan_batch({"version": 1, "items": [{"prompt": "a red circle", "seeds": list(range(7))}]}).jobs
    for world in (1, 2, 3):  # without edits: round-robin by position
        assert all(share_out(plain, r, world) == plain[r::world] for r in range(world))


def test_the_example_batch_file_is_valid_and_reads_its_image_next_to_it():
    plan = load_batch(Path(__file__).resolve().parent.parent / "examples" / "batch.json")
    edits = [j for j in plan.jobs if j.kind == "edit"]
    assert len(edits) == 1 and edits[0].image.is_file() and edits[0].image.parent.name == "examples"
    assert len(plan.jobs) == 9  # three items × two seeds, two items with their own seed, and the edit
    views = next(j for j in plan.jobs if j.id == "views")
    assert views.files == ("views_s3-0.png", "views_s3-1.png")  # the stereo rig's two views


def test_reposition_items_write_their_references_and_redo_a_set_that_lost_one(model_dir, tmp_path):
    iso = {"kind": "isolation", "subjects": ["red circle", "blue square"], "references": True, "sites": "all"}
    refs = ["a small red circle", "a large blue square"]
    scene = "a red circle and a blue square"
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"prompt": scene, "controls": [iso], "reference_prompts": refs[:1]},
            {"prompt": scene, "controls": [iso]},
            {"prompt": scene, "reference_prompts": [refs[0], " "], "controls": [iso]},
        ]})
    problems = err.value.problems
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == [
        "item 0 (id '0'): field 'reference_prompts'", "item 1 (id '1'): field 'controls'",
        "item 2 (id '2'): field 'reference_prompts'"], problems
    assert "1 reference prompts for 2 subjects" in problems[0] and "no reference prompts" in problems[1]
    assert "a reference prompt is empty" in problems[2]
    plain = plan_batch({"version": 1, "items": [{"prompt": scene, "reference_prompts": refs}]})  # a plain set
    assert plain.jobs[0].files == ("0_s0-ref1.png", "0_s0-ref2.png", "0_s0.png")
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [{"type": "edit", "image": "x.png", "source_prompt": "a red circle",
                                             "prompt": "a blue circle", "reference_prompts": refs}]})
    assert err.value.problems[0].startswith("item 0: field 'reference_prompts' is not used by edit items")

    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 3}, "items": [
        {"id": "set", "prompt": scene, "seed": 2, "controls": [iso], "reference_prompts": refs}]})
    out = tmp_path / "out"
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    files = pngs(out)
    assert set(files) == {"set_s2.png", "set_s2-ref1.png", "set_s2-ref2.png"}
    assert read_metadata(out / "set_s2.png")["reference_prompts"] == refs

    # the scene is what `attnctl generate` makes of the same settings
    single = tmp_path / "single.png"
    result = run("generate", "--model", model_dir, "--prompt", scene, "-r", refs[0], "-r", refs[1], "--seed", "2",
                 "--steps", "3", "--control", json.dumps(iso), "--out", single)
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_image(single), read_image(out / "set_s2.png"))

    # a lost reference image makes the set "missing": the re-run makes all three again
    (out / "set_s2-ref1.png").unlink()
    assert "missing" in run("batch", batch, "--out", out, "--model", model_dir, "--check").output
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    assert pngs(out) == files


def test_epipolar_items_write_their_views_and_match_attnctl_generate(model_dir, tmp_path, monkeypatch):
    epi = {"kind": "epipolar", "rig": {"kind": "stereo", "roll": 60}, "band": 0.5}
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"prompt": "a red circle", "controls": [epi], "images": 3},
            {"prompt": "a red circle", "controls": [epi], "reference_prompts": ["a red circle"]},
        ]})
    problems = err.value.problems
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == [
        "item 0 (id '0'): field 'images'", "item 1 (id '1'): field 'controls'"]
    assert "images 3 with an epipolar control of 2 cameras" in problems[0] and "separate runs" in problems[1]
    with pytest.raises(BatchFileError, match="item 0: field 'images'"):
        plan_batch({"version": 1, "items": [{"prompt": "a red circle", "images": 0}]})
    plain = plan_batch({"version": 1, "items": [{"prompt": "a red circle"}, {"prompt": "a circle", "images": 1}]})
    old = plan_batch({"version": 1, "items": [{"prompt": "a red circle"}]})
    assert plain.jobs[0].hash == old.jobs[0].hash and plain.jobs[0].files == ("0_s0.png",)
    assert plain.jobs[1].files == ("1_s0.png",) and "images" not in plain.jobs[1].settings

    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": [
        {"id": "views", "prompt": "a red circle and a blue square", "seeds": [1], "controls": [epi]},
        {"id": "four", "prompt": "a blue square", "controls": [epi], "images": 4}]})
    plan = plan_batch(json.loads(batch.read_text()))
    assert plan.jobs[0].files == ("views_s1-0.png", "views_s1-1.png") and plan.jobs[0].settings["images"] == 2
    out = tmp_path / "out"
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert set(pngs(out)) == {"views_s1-0.png", "views_s1-1.png", *(f"four_s0-{i}.png" for i in range(4))}
    meta = read_metadata(out / "views_s1-1.png")
    assert (meta["images"], meta["image_index"], meta["controls"][0]["rig"]["roll"]) == (2, 1, 60.0)
    single = tmp_path / "single" / "v.png"
    result = run("generate", "--model", model_dir, "--prompt", "a red circle and a blue square", "--seed", "1",
                 "--steps", "2", "--control", json.dumps(epi), "--out", single)
    assert result.exit_code == 0, result.output
    for i in (0, 1):
        assert np.array_equal(read_image(single.with_name(f"v-{i}.png")), read_image(out / f"views_s1-{i}.png"))
    (out / "four_s0-1.png").unlink()  # a lost view: the set is made again
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 new" in result.output and (out / "four_s0-1.png").is_file(), result.output

    # A redo killed after its first view, then the change taken back: the set was taken as done (its record and last
    # view were the old settings'), with a first view of the other settings
    import attnctl.imageio

    before = [read_image(out / f"four_s0-{i}.png") for i in range(4)]
    data = json.loads(batch.read_text())
    data["items"][1]["steps"] = 3
    changed = write_batch(tmp_path / "changed.json", data)
    real, saved = attnctl.imageio.save_png, []

    class Killed(BaseException):
        pass

    def dying(path, *args, **kwargs):
        if saved:
            raise Killed
        saved.append(Path(path).name)
        return real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(attnctl.imageio, "save_png", dying)
        with contextlib.suppress(Killed):
            run("batch", changed, "--out", out, "--model", model_dir)
    assert saved == ["four_s0-0.png"] and not np.array_equal(read_image(out / "four_s0-0.png"), before[0])
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 new" in result.output, result.output
    assert all(np.array_equal(read_image(out / f"four_s0-{i}.png"), before[i]) for i in range(4))


def test_a_repeated_key_and_a_folder_named_like_a_toy_model(tmp_path, monkeypatch):
    """A key written twice in one item kept the last silently; an output folder named ``toy-sd3`` in the working
    directory was recorded as the model, so the hash of every image changed with it."""
    (tmp_path / "dup.json").write_text('{"version": 1, "items": [{"id": "f", "prompt": "a red circle", "seed": 1, '
                                       '"seed": 2}]}')
    with pytest.raises(BatchFileError, match="the key 'seed' is written twice in one object \\(the object with id "
                                             "'f'\\)"):
        load_batch(tmp_path / "dup.json")
    monkeypatch.chdir(tmp_path)
    away = _settings_hash("toy-sd3", "fp32", {"prompt": "a"})
    (tmp_path / "toy-sd3").mkdir()
    assert _settings_hash("toy-sd3", "fp32", {"prompt": "a"}) == away


def test_items_whose_phrases_have_words_elsewhere_hash_apart():
    """A phrase once took every occurrence of its words; the items where that differs from the words where they
    stand are hashed apart (made again on resume), and no other item's hash moves."""
    assert phrases_apart(["red circle", "circle", "blue circle"], "a red circle and a blue circle") == [
        "red circle", "blue circle"]
    assert phrases_apart(["red circle", "blue square"], "a red circle and a blue square") == []
    assert phrases_apart(["red circle"], "a red circle, a red circle") == []  # every occurrence is the phrase's
    assert phrases_apart(["red circle"], "a red circle beside red paint") == ["red circle"]

    def hashes(prompt: str, control: dict) -> list:
        plan = plan_batch({"version": 1, "items": [{"prompt": prompt, "controls": [control]}]})
        return [plan.jobs[0].settings.get("phrases"), plan.jobs[0].hash, _settings_hash(
            "toy-sd3", "fp32", {k: v for k, v in plan.jobs[0].settings.items() if k != "phrases"})]

    shared = "a purple circle and an orange circle"
    for control in ({"kind": "probe", "words": ["purple circle"]},
                    {"kind": "regulation", "targets": ["purple circle", "orange"], "missing": "ignore"},
                    {"kind": "isolation", "subjects": ["purple circle", "orange circle"]}):
        marker, new, old = hashes(shared, control)
        assert marker == "where they stand" and new != old, control
    marker, new, old = hashes("a purple circle and an orange square", {"kind": "probe", "words": ["purple circle"]})
    assert marker is None and new == old
    marker, new, old = hashes(shared, {"kind": "probe", "words": ["purple", "circle"]})  # single words: unchanged
    assert marker is None and new == old


def test_reference_prompts_are_checked_against_their_subjects_at_read():
    """Reference prompts beside an isolation control without references=true, or in another order than the
    subjects, passed --check and failed every image (with an error about the subject's words)."""
    iso = {"kind": "isolation", "subjects": ["red circle", "blue square"]}
    scene, refs = "a red circle and a blue square", ["a small red circle", "a large blue square"]
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"id": "norefs", "prompt": scene, "reference_prompts": refs, "controls": [iso]},
            {"id": "swapped", "prompt": scene, "reference_prompts": refs[::-1],
             "controls": [{**iso, "references": True}]}]})
    text = "\n".join(err.value.problems)
    assert "isolation control that does not reposition" in text and "\"references\": true" in text
    assert "reference prompt 1 ('a large blue square') does not name subject 1 ('red circle')" in text
    plan_batch({"version": 1, "items": [{"prompt": scene, "reference_prompts": refs,
                                         "controls": [{**iso, "references": True}]}]})


def test_a_set_whose_other_files_hold_another_version_is_made_again(model_dir, tmp_path):
    """A set of views counted as done when its last view's record was done with its hash: taken from 2 views to 3 and
    back, it was skipped with the 3-view run's first views (and view 2 and its map stayed); a map another item's
    image had replaced was not noticed either."""
    def write(images: int) -> Path:
        return write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2}, "items": [
            {"id": "a", "prompt": "a red circle", "images": images,
             "controls": [{"kind": "probe", "words": ["circle"]}]},
            {"id": "b", "prompt": "a blue square"}]})

    out = tmp_path / "out"
    for images in (2, 3):
        assert run("batch", write(images), "--out", out, "--model", model_dir).exit_code == 0
    batch = write(2)
    listing = " ".join(run("batch", batch, "--out", out, "--model", model_dir, "--check").output.split())
    assert "a_s0-1.png item 0 seed 0 changed" in listing and "(1 done, 1 changed)" in listing, listing
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "2 done (1 already, 1 new)" in result.output, result.output
    files = {"a_s0-0.png", "a_s0-1.png", "a_s0-0.attention-circle.png", "a_s0-1.attention-circle.png", "b_s0.png"}
    assert set(pngs(out)) == files  # view 2 and its map, of the 3-view version, are gone
    plan = load_batch(batch, model=str(model_dir))
    for name in ("a_s0-0.png", "a_s0-1.png"):
        meta = read_metadata(out / name)
        assert (meta["images"], meta["batch"]["hash"]) == (2, plan.jobs[0].hash)

    # another item's image under the name of a map of the set (an edit item whose id was that name, say)
    (out / "a_s0-0.attention-circle.png").write_bytes((out / "b_s0.png").read_bytes())
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 new" in result.output, result.output
    assert read_metadata(out / "a_s0-0.attention-circle.png")["attention_map_of"] == "a_s0-0.png"
    assert "2 done" in run("batch", batch, "--out", out, "--model", model_dir, "--check").output


def test_the_latest_record_is_the_last_written_whatever_the_clocks_say(model_dir, tmp_path):
    """The latest record of a file was picked by its time: a machine whose clock is behind (or a clock stepped back)
    wrote records that lost to older ones, and a changed item taken back was skipped with the other version's
    image."""
    w = ManifestWriter(tmp_path / MANIFEST_NAME)
    w.append({"file": "x_s0.png", "status": "done", "hash": "old", "time": 2000.0, "rank": 0})
    w.append({"file": "x_s0.png", "status": "done", "hash": "new", "time": 1000.0, "rank": 0})  # a clock behind
    w.append({"file": "y_s0.png", "status": "done", "hash": "new", "time": 1500.0, "rank": 1})  # merged from a shard
    w.append({"file": "y_s0.png", "status": "failed", "hash": "new", "time": 1600.0, "rank": 0})  # the next run's
    w.close()
    w = ManifestWriter(tmp_path / "manifest.rank1.jsonl")  # the shard the merge copied, left by a crash
    w.append({"file": "y_s0.png", "status": "done", "hash": "new", "time": 1500.0, "rank": 1})
    w.close()
    assert {f: (r["hash"], r["status"]) for f, r in read_manifest(tmp_path).items()} == \
        {"x_s0.png": ("new", "done"), "y_s0.png": ("new", "failed")}

    # a run merges a killed run's shards before its own records, whose clock may be behind theirs
    out = tmp_path / "out"
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2},
                                              "items": [{"id": "a", "prompt": "a red circle"}]})
    plan = load_batch(batch, model=str(model_dir))
    out.mkdir()
    w = ManifestWriter(out / "manifest.rank1.jsonl")
    w.append({"file": "a_s0.png", "status": "failed", "hash": plan.jobs[0].hash, "time": time.time() + 3600,
              "rank": 1, "error": "killed"})
    w.close()
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    assert [r["status"] for r in iter_records(out / MANIFEST_NAME)] == ["failed", "done"]
    assert read_manifest(out)["a_s0.png"]["status"] == "done"


def test_word_controls_are_checked_against_each_reference_prompt():
    """A probe or regulation naming a word of the scene only passed --check in a reposition item, then failed every
    image: the references are prompts of the same call, and those controls look for their words in each of them."""
    iso = {"kind": "isolation", "subjects": ["red circle", "blue square"], "references": True}
    scene, refs = "a red circle and a blue square", ["a small red circle", "a large blue square"]
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"id": "probe", "prompt": scene, "reference_prompts": refs,
             "controls": [iso, {"kind": "probe", "words": ["circle"]}]},
            {"id": "reg", "prompt": scene, "reference_prompts": refs,
             "controls": [iso, {"kind": "regulation", "targets": ["circle"]}]},
            {"id": "plain", "prompt": scene, "reference_prompts": refs,  # a plain set: the same call
             "controls": [{"kind": "probe", "words": ["square"]}]}]})
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == ["item 0 (id 'probe')", "item 1 (id 'reg')", "item 2 (id 'plain')"]
    assert "field 'controls[1]': probe names 'circle', which reference prompt 2 ('a large blue square') lacks" \
        in problems[0]
    assert "regulation names 'circle'" in problems[1] and "missing: \"ignore\"" in problems[1]
    assert "reference prompt 1 ('a small red circle') lacks" in problems[2]
    plan_batch({"version": 1, "items": [  # what acts where its words are, and isolation's own subjects, pass
        {"prompt": scene, "reference_prompts": refs,
         "controls": [iso, {"kind": "regulation", "targets": ["circle"], "missing": "ignore"}]}]})


def test_a_probe_naming_a_token_twice_and_an_id_clash_read_clearly(scene_png):
    """A probe with tokens [1, 1] planned one map file twice; the id-clash message ran its two parts together."""
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"id": "t", "prompt": "a red circle", "controls": [{"kind": "probe", "tokens": [1, 2, 1]}]}]})
    assert err.value.problems == [
        "item 0 (id 't'): field 'controls[0]': invalid probe control config — tokens: repeats 1; list each once"]
    with pytest.raises(BatchFileError) as err:
        plan_batch({"version": 1, "items": [
            {"id": "a", "prompt": "a red circle", "images": 2},
            {"id": "a_s0-1", "type": "edit", "image": str(scene_png), "source_prompt": EDIT_SOURCE,
             "prompt": EDIT_TARGET}]})
    assert err.value.problems == [
        "item 1 (id 'a_s0-1'): field 'id': its image 'a_s0-1.png' would overwrite 'a_s0-1.png' of item 0; give it "
        "another id"]
    assert plan_batch({"version": 1, "items": [{"id": "t", "prompt": "a red circle", "controls": [
        {"kind": "probe", "tokens": [1, 2]}]}]}).jobs[0].map_files == ("t_s0.attention-1.png", "t_s0.attention-2.png")


def test_a_run_removes_the_temp_files_of_every_image_a_killed_writer_left(model_dir, tmp_path):
    """Only the temp files of the images still to make were removed: those of a done item, of an item no longer in
    the file and of a manifest merge stayed for good."""
    batch = write_batch(tmp_path / "b.json", {"version": 1, "defaults": {"steps": 2},
                                              "items": [{"id": "a", "prompt": "a red circle"}]})
    out = tmp_path / "out"
    assert run("batch", batch, "--out", out, "--model", model_dir).exit_code == 0
    stale = [".a_s0.png.k1ll3d.tmp", ".gone_s0.png.zz9.tmp", ".gone_s0.attention-circle.png.x1.tmp",
             ".manifest.jsonl.q1w2.tmp"]
    for name in [*stale, ".notes.txt.tmp"]:
        (out / name).write_bytes(b"half")
    result = run("batch", batch, "--out", out, "--model", model_dir)
    assert result.exit_code == 0 and "1 already, 0 new" in result.output, result.output
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [".notes.txt.tmp"]  # not a batch's
