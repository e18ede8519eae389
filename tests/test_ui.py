"""The editing UI (``attnctl ui``): its plain functions, and the Streamlit app driven by ``AppTest``.

The app runs on a tiny SD3 pipeline folder (random weights, 32×32 images, 2 steps), passed the way
``attnctl ui --model PATH`` passes it (the ``ATTNCTL_UI_MODEL`` environment variable).
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("streamlit", reason="the UI tests need the ui extra: pip install -e '.[ui]'")

from streamlit.testing.v1 import AppTest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from attnctl.errors import AttnCtlError  # noqa: E402
from attnctl.imageio import encode_png  # noqa: E402
from attnctl.testing import save_pipeline, tiny_sd3_pipeline  # noqa: E402
from attnctl.ui import APP_PATH, MODEL_ENV, heatmap, schedules_ui  # noqa: E402
from attnctl.ui.panels import GENERIC, Panel, available_panels, panel_for  # noqa: E402
from attnctl.ui.safety import (  # noqa: E402
    MAX_PIXELS,
    UploadError,
    check_control_json,
    check_png_upload,
    png_header_size,
)
from attnctl.ui.setup import (  # noqa: E402
    Setup,
    batch_file,
    batch_item,
    check_batch_file,
    describe_changes,
    metadata_for,
    setup_from_metadata,
)

TIMEOUT = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_pipeline(tiny_sd3_pipeline("sd3"), tmp_path_factory.mktemp("ui") / "tiny-sd3")


# --------------------------------------------------------------------------------------------- PNG helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-looking PNG whose header claims width × height (1-bit grey): a few hundred bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 64, 9)  # only the first rows: the UI must refuse before it decodes anything
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def attnctl_png(setup: Setup, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (200, 30, 30)
    return encode_png(pixels, metadata_for(setup, {"model": setup.model, "family": "sd3"}))


# --------------------------------------------------------------------------------------------- plain functions


def test_panels_check_phrases_as_a_run_finds_them():
    """A phrase the run finds (its words together) is not flagged; words apart, or absent, are."""
    from attnctl.ui.panels import PanelContext

    ctx = PanelContext(words=["a", "red", "circle", "and", "blue", "square"], prompt="a red circle and a blue square")
    assert ctx.absent(["red circle", "square", "Blue Square"]) == []
    assert ctx.absent(["red square", "triangle"]) == ["red square", "triangle"]


def test_upload_checks_refuse_bad_files_with_messages():
    with pytest.raises(UploadError, match="not a PNG"):
        check_png_upload("notes.png", b"just some text, renamed to .png\n" * 4)
    with pytest.raises(UploadError, match="400,000,000 pixels"):
        check_png_upload("huge.png", huge_png())
    assert png_header_size(huge_png()) == (20000, 20000)
    damaged = bytearray(huge_png(64, 64))
    damaged[20] ^= 0xFF  # the header's checksum no longer matches
    with pytest.raises(UploadError, match="checksum"):
        check_png_upload("damaged.png", bytes(damaged))
    with pytest.raises(UploadError, match="MB"):
        check_png_upload("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, max_bytes=50)
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    with pytest.raises(UploadError, match="no attnctl settings"):
        check_png_upload("plain.png", plain.getvalue())
    real = check_png_upload("plain.png", plain.getvalue(), settings=False)  # a real image to edit: any PNG
    assert real.metadata == {} and real.image.size == (8, 8)
    with pytest.raises(UploadError, match="400,000,000 pixels"):
        check_png_upload("huge.png", huge_png(), settings=False)  # and every other check still holds


def test_pils_decompression_bomb_guard_is_tightened_too():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= MAX_PIXELS
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")  # 36 Mpx in a few kB
    assert len(bomb.getvalue()) < 100_000
    # Past the app's own header check (limit raised here), PIL's guard still refuses it.
    with pytest.raises(UploadError, match="decompression bomb"):
        check_png_upload("bomb.png", bomb.getvalue(), max_pixels=10**9)


def test_control_json_that_names_a_file_is_refused():
    with pytest.raises(UploadError, match="does not open files"):
        check_control_json({"kind": "softpag", "heads": "/etc/presets/heads.json"})
    with pytest.raises(UploadError, match="kind"):
        check_control_json({"heads": ["L0"]})
    assert check_control_json({"kind": "softpag", "heads": ["L0H1"]})["heads"] == ["L0H1"]


def test_setup_round_trips_through_png_metadata_and_exports_a_valid_batch_file(tmp_path):
    s = Setup(model="toy-flux", prompt="a blue square", seed=7, steps=3, guidance=2.5, height=48, width=64,
              controls=[{"kind": "regulation", "targets": ["square"], "iterations": 2}])
    png = attnctl_png(s)
    checked = check_png_upload("a.png", png)
    back, notes = setup_from_metadata(checked.metadata)
    assert back == s and notes == []
    data = batch_file(s)
    assert data["version"] == 1 and data["model"] == "toy-flux"
    assert data["items"][0] == {"prompt": "a blue square", "seed": 7, "steps": 3, "guidance": 2.5, "height": 48,
                                "width": 64, "controls": s.controls}
    assert check_batch_file(data) == []
    bad = json.loads(json.dumps(data))
    bad["items"][0]["steps"] = 0
    assert check_batch_file(bad)
    # hostile or broken metadata: values out of range are refused with a note, files are never named
    meta = dict(checked.metadata, seed=-3, steps="many")
    back, notes = setup_from_metadata(meta)
    assert (back.seed, back.steps) == (Setup().seed, Setup().steps) and len(notes) == 2
    with pytest.raises(UploadError):
        setup_from_metadata(dict(checked.metadata, controls=[{"kind": "softpag", "heads": "x.json"}]))
    # a reposition setup keeps its reference prompts in the PNG and in the batch item
    r = Setup(prompt="a red circle and a blue square", reference_prompts=["a red circle", "a blue square"],
              controls=[{"kind": "isolation", "subjects": ["red circle", "blue square"], "references": True}])
    back, notes = setup_from_metadata(check_png_upload("r.png", attnctl_png(r)).metadata)
    assert back == r and notes == []
    assert batch_item(r)["reference_prompts"] == r.reference_prompts and check_batch_file(batch_file(r)) == []
    assert describe_changes(r, Setup(**{**r.to_dict(), "reference_prompts": ["a red circle", "a square"]})) == \
        "reference prompts edited"


def test_describe_changes():
    a = Setup(seed=1, controls=[])
    b = Setup(seed=2, controls=[{"kind": "softpag"}])
    assert describe_changes(None, a) == "first run"
    assert describe_changes(a, b) == "seed 1 → 2, +softpag"
    assert describe_changes(b, b) == "same settings"


def test_schedule_editor_forms_round_trip():
    for data in ({"kind": "constant", "value": 0.5}, {"kind": "linear", "start": 1.0, "end": 0.0},
                 {"kind": "cosine", "start": 0.2, "end": 0.9},
                 {"kind": "window", "value": 2.0, "start": 0.0, "stop": 0.5}):
        kind, fields = schedules_ui.form_from_json(data)
        assert kind == data["kind"]
        assert schedules_ui.json_from_form(kind, fields) == data
    kind, fields = schedules_ui.form_from_json({"kind": "piecewise", "points": [[0, 1], [0.5, 0.2], [1, 0]]})
    assert (kind, fields["points"]) == ("piecewise", "0:1, 0.5:0.2, 1:0")
    assert schedules_ui.curve(schedules_ui.json_from_form(kind, fields), 5) == pytest.approx([1, 0.6, 0.2, 0.1, 0])
    exact = {"kind": "piecewise", "points": [[0, 5.123456789], [0.3333333333, 1.87654321], [1, 0]]}
    assert schedules_ui.json_from_form(*schedules_ui.form_from_json(exact)) == exact  # %g kept six digits
    # bounds of a control's strength come off for editing and are checked on the way back
    kind, fields = schedules_ui.form_from_json({"kind": "constant", "value": 1.0, "lo": 0.0, "hi": 1.0})
    assert (kind, fields) == ("constant", {"value": 1.0})
    with pytest.raises(ValueError, match="outside"):
        schedules_ui.json_from_form("constant", {"value": 1.5}, lo=0.0, hi=1.0)
    # anything else is edited as the library's shorthand (parsed, never evaluated)
    assert schedules_ui.form_from_json("2 * cosine(1, 0)") == ("custom", {"text": "scaled(cosine(1.0, 0.0), 2.0)"})
    with pytest.raises(ValueError):
        schedules_ui.json_from_form("custom", {"text": "__import__('os').system('true')"})
    with pytest.raises(ValueError, match="progress:value"):
        schedules_ui.json_from_form("piecewise", {"points": "0.5"})


def test_heatmap_overlay_and_upscale():
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    m = np.zeros((8, 8))
    m[2, 2] = 1.0
    out = heatmap.overlay(img, m, side=256)
    assert out.size == (256, 256)
    arr = np.asarray(out).astype(int)
    assert arr[2 * 32 + 16, 2 * 32 + 16].sum() > arr[200, 200].sum()  # the hot cell is brighter
    assert heatmap.upscale(Image.new("RGB", (1024, 1024))).size == (1024, 1024)
    assert heatmap.colormap(np.array([0.0, 1.0])).shape == (2, 3)


def test_panel_registry_offers_importable_controls_and_falls_back_to_json(monkeypatch):
    panels = available_panels()
    assert {"softpag", "regulation", "layout", GENERIC} <= set(panels)
    assert list(panels)[-1] == GENERIC
    assert panel_for("probe", panels).kind == GENERIC
    from attnctl.ui import panels as registry

    ghost = Panel(kind="ghost", module="attnctl.controls.not_written_yet", title="Ghost", description="",
                  default=lambda ctx: {}, render=lambda ctx, key, cfg: cfg, summary=lambda cfg: "")
    monkeypatch.setattr(registry, "_discover", lambda: [ghost, *panels.values()])
    assert "ghost" not in registry.available_panels()


def test_cli_ui_binds_localhost_and_warns_for_other_hosts(monkeypatch):
    import subprocess

    from attnctl.cli import app

    calls = []

    class FakeServer:
        def __init__(self, cmd, env):
            calls.append((cmd, env))

        def terminate(self):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)
    runner = CliRunner()
    result = runner.invoke(app, ["ui", "--port", "8600", "--model", "toy-flux"])
    assert result.exit_code == 0, result.output
    cmd, env = calls[-1]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert str(APP_PATH) in cmd and env[MODEL_ENV] == "toy-flux"
    result = runner.invoke(app, ["ui", "--host", "0.0.0.0"])
    assert result.exit_code == 0
    assert "warning" in result.output and "0.0.0.0" in result.output
    assert calls[-1][0][calls[-1][0].index("--server.address") + 1] == "0.0.0.0"


def test_cli_ui_passes_its_device_and_dtype_to_the_app(monkeypatch):
    import signal
    import subprocess

    from attnctl.cli import app
    from attnctl.ui import DEVICE_ENV, DTYPE_ENV

    envs = []

    class FakeServer:
        def __init__(self, cmd, env):
            envs.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    runner = CliRunner()
    result = runner.invoke(app, ["ui", "--device", "cpu", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert (envs[-1][DEVICE_ENV], envs[-1][DTYPE_ENV]) == ("cpu", "bf16")
    result = runner.invoke(app, ["ui"])
    assert (envs[-1][DEVICE_ENV], envs[-1][DTYPE_ENV]) == ("cpu", "fp32")
    result = runner.invoke(app, ["ui", "--dtype", "fp8"])
    assert result.exit_code != 0 and "unknown dtype" in result.output and len(envs) == 2


# --------------------------------------------------------------------------------------------- the app


def start(monkeypatch, model_dir) -> AppTest:
    monkeypatch.setenv(MODEL_ENV, str(model_dir))
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    at.run()
    ok(at)
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def generate(at: AppTest, steps: int = 2) -> AppTest:
    at.number_input(key="steps").set_value(steps)
    at.button(key="generate").click().run()
    ok(at)
    return at


def only_control(at: AppTest, kind: str) -> int:
    """Add a control of ``kind``, remove the first card (the default SoftPAG), and return the new card's id."""
    at.selectbox(key="add_kind").set_value(kind)
    at.button(key="add_control").click().run()
    first, added = at.session_state["controls"]
    at.button(key=f"remove{first['id']}").click().run()
    ok(at)
    return added["id"]


def compare_images(at: AppTest) -> list:
    return list(at.tabs[0].image)


def test_app_loads_with_the_model_and_a_first_control(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    assert errors(at) == []
    assert at.session_state["model_choice"] == "other"
    assert at.text_input(key="model_path").value == str(model_dir)
    assert (at.number_input(key="height").value, at.number_input(key="width").value) == (32, 32)
    assert [c["kind"] for c in at.session_state["controls"]] == ["softpag"]
    assert [t.label for t in at.tabs] == ["Compare", "Attention", "History", "Export", "Edit image"]
    assert not at.button(key="generate").disabled


def test_generate_shows_baseline_and_controlled_side_by_side(monkeypatch, model_dir):
    at = generate(start(monkeypatch, model_dir))
    assert errors(at) == []
    assert len(compare_images(at)) == 2
    run = at.session_state["history"][-1]
    for key, controls in (("baseline", 0), ("controlled", 1)):
        with Image.open(io.BytesIO(run[key])) as img:
            assert img.size == (32, 32)
            meta = json.loads(img.text["attnctl"])
        assert meta["seed"] == 0 and meta["steps"] == 2 and len(meta["controls"]) == controls
    assert run["maps"]["baseline"] and run["maps"]["controlled"]  # word maps for the Attention tab
    assert len(at.tabs[1].image) >= 4  # image + overlays for both images
    assert at.tabs[2].image  # the history lists the run
    # a second run with another seed lands in the history with what changed
    at.number_input(key="seed").set_value(5)
    at.button(key="generate").click().run()
    ok(at)
    assert [r["changes"] for r in at.session_state["history"]] == ["first run", "seed 0 → 5"]


def test_add_configure_and_remove_controls(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    at.selectbox(key="add_kind").set_value("regulation")
    at.button(key="add_control").click().run()
    ok(at)
    controls = at.session_state["controls"]
    assert [c["kind"] for c in controls] == ["softpag", "regulation"]
    reg = controls[1]["id"]
    assert at.multiselect(key=f"c{reg}.targets").value == ["circle", "square"]
    at.multiselect(key=f"c{reg}.targets").set_value(["square"]).run()
    ok(at)
    assert at.session_state["controls"][1]["config"]["targets"] == ["square"]
    soft = controls[0]["id"]
    layers = at.session_state["controls"][0]["config"]["heads"]
    at.segmented_control(key=f"c{soft}.mode").set_value("heads").run()  # whole layers → their single heads
    ok(at)
    heads = at.session_state["controls"][0]["config"]["heads"]
    assert layers and heads and all(any(h.startswith(layer + "H") for layer in layers) for h in heads)
    at.button(key=f"remove{soft}").click().run()
    ok(at)
    assert [c["kind"] for c in at.session_state["controls"]] == ["regulation"]
    at.number_input(key=f"c{reg}.iterations").set_value(2)
    generate(at)
    assert errors(at) == [] and len(compare_images(at)) == 2
    assert at.session_state["history"][-1]["setup"].controls[0]["iterations"] == 2
    # the Compare tab says what the regulation did
    (note,) = at.session_state["history"][-1]["control_notes"]
    assert note.startswith("regulation of 'square'") and any(note == c.value for c in at.tabs[0].caption)


def test_layout_panel_places_words_in_boxes_and_runs(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    at.selectbox(key="add_kind").set_value("layout")
    at.button(key="add_control").click().run()
    ok(at)
    controls = at.session_state["controls"]
    assert [c["kind"] for c in controls] == ["softpag", "layout"]
    lay = controls[1]["id"]
    # a shapes-world model: the boxes are keyed by the prompt's colour words (which carry location there)
    assert at.multiselect(key=f"c{lay}.words").value == ["red", "blue"]
    assert controls[1]["config"]["boxes"] == {"red": [0.025, 0.2, 0.475, 0.8], "blue": [0.525, 0.2, 0.975, 0.8]}
    at.number_input(key=f"c{lay}.box.blue.y1").set_value(0.5).run()
    ok(at)
    assert at.session_state["controls"][1]["config"]["boxes"]["blue"] == [0.525, 0.2, 0.975, 0.5]
    at.button(key=f"remove{controls[0]['id']}").click().run()
    generate(at)
    assert errors(at) == [] and len(compare_images(at)) == 2
    assert at.session_state["history"][-1]["setup"].controls[0]["boxes"]["blue"][3] == 0.5
    (note,) = at.session_state["history"][-1]["control_notes"]
    assert note.startswith("layout loss") and any(note == c.value for c in at.tabs[0].caption)
    # an empty box is named before the run, and the run refuses it with the control's own message
    at.number_input(key=f"c{lay}.box.blue.y1").set_value(0.1).run()
    ok(at)
    assert any("Empty box" in w.value for w in at.warning)
    at.button(key="generate").click().run()
    ok(at)
    assert any("need 0 <= x0 < x1 <= 1" in e for e in errors(at))


def test_isolation_panel_names_the_prompts_subjects_and_runs(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    at.selectbox(key="add_kind").set_value("isolation")
    at.button(key="add_control").click().run()
    ok(at)
    controls = at.session_state["controls"]
    iso = controls[1]["id"]
    # the subjects of the default prompt "a red circle to the left of a blue square", as phrases
    assert at.multiselect(key=f"c{iso}.subjects").value == ["red circle", "blue square"]
    at.button(key=f"remove{controls[0]['id']}").click().run()
    generate(at, steps=3)
    assert errors(at) == [] and len(compare_images(at)) == 2
    assert at.session_state["history"][-1]["setup"].controls[0]["subjects"] == ["red circle", "blue square"]
    (note,) = at.session_state["history"][-1]["control_notes"]
    assert note.startswith("isolation of 2 subjects at") and any(note == c.value for c in at.tabs[0].caption)
    at.multiselect(key=f"c{iso}.subjects").set_value(["red circle"]).run()
    ok(at)
    assert any("at least two subjects" in w.value for w in at.warning)


def test_isolation_panel_repositions_after_reference_prompts_made_in_the_same_call(monkeypatch, model_dir):
    import torch

    from attnctl import IsolationAttention
    from attnctl.cli import load_pipeline

    at = start(monkeypatch, model_dir)
    iso = only_control(at, "isolation")
    at.toggle(key=f"c{iso}.references").set_value(True).run()
    ok(at)
    assert at.text_input(key=f"c{iso}.ref.red circle").value == "a red circle"  # a first reference prompt per subject
    at.text_input(key=f"c{iso}.ref.blue square").set_value("a large blue square").run()
    generate(at, steps=3)
    assert errors(at) == [] and len(compare_images(at)) == 2
    run = at.session_state["history"][-1]
    setup = run["setup"]
    assert setup.reference_prompts == ["a red circle", "a large blue square"]
    assert setup.controls[0]["references"] is True and "maps are not made for reposition" in run["note"]

    # both images are the scenes of [reference_1, reference_2, scene] from one noise: plain, and repositioned
    pipe = load_pipeline(str(model_dir))
    call = dict(num_inference_steps=3, guidance_scale=setup.guidance, height=32, width=32,
                max_sequence_length=json.loads(Image.open(io.BytesIO(run["baseline"])).text["attnctl"])[
                    "max_sequence_length"])
    prompts = [*setup.reference_prompts, setup.prompt]
    config = {k: v for k, v in setup.controls[0].items() if k != "kind"}
    for key, controls in (("baseline", None), ("controlled", [IsolationAttention(**config)])):
        want = pipe(prompts, generator=torch.Generator("cpu").manual_seed(setup.seed), controls=controls,
                    **call).images[2]
        with Image.open(io.BytesIO(run[key])) as img:
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(want)), key
            assert json.loads(img.text["attnctl"])["reference_prompts"] == setup.reference_prompts

    # an empty reference prompt is named, and the run refuses it
    at.text_input(key=f"c{iso}.ref.red circle").set_value("").run()
    ok(at)
    assert any("reference prompt for every subject" in w.value for w in at.warning)
    at.button(key="generate").click().run()
    ok(at)
    assert any("reference prompt is empty" in e for e in errors(at))


def test_epipolar_panel_makes_the_views_of_a_rig_and_restores_given_cameras(monkeypatch, model_dir):
    import zipfile

    import torch

    from attnctl import Camera, EpipolarAttention
    from attnctl.cli import load_pipeline
    from attnctl.ui.app import views_zip

    at = start(monkeypatch, model_dir)
    epi = only_control(at, "epipolar")
    assert at.slider(key=f"c{epi}.roll").value == 90.0  # a rolled stereo pair first
    generate(at, steps=3)
    assert errors(at) == [] and len(compare_images(at)) == 4  # two views, baseline and controlled
    run = at.session_state["history"][-1]
    setup = run["setup"]
    assert setup.controls[0]["rig"] == {"kind": "stereo", "baseline": 0.3, "roll": 90.0, "fov": 50.0}
    assert "view 1 of 2" in run["note"] and run["maps"]["controlled"]

    # the rows are the pipeline's views from one noise: independent, and with epipolar attention
    pipe = load_pipeline(str(model_dir))
    meta = json.loads(Image.open(io.BytesIO(run["baseline"])).text["attnctl"])
    call = dict(num_inference_steps=3, guidance_scale=setup.guidance, height=32, width=32, num_images_per_prompt=2,
                max_sequence_length=meta["max_sequence_length"])
    config = {k: v for k, v in setup.controls[0].items() if k != "kind"}
    for key, ctl in (("baseline", None), ("controlled", [EpipolarAttention(**config)])):
        want = pipe(setup.prompt, generator=torch.Generator("cpu").manual_seed(setup.seed), controls=ctl,
                    **call).images
        for i, png in enumerate(run[f"{key}_views"]):
            with Image.open(io.BytesIO(png)) as img:
                assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(want[i])), (key, i)
                assert (json.loads(img.text["attnctl"])["images"], json.loads(img.text["attnctl"])["image_index"]) \
                    == (2, i)
    assert run["baseline"] == run["baseline_views"][0] and run["controlled"] == run["controlled_views"][0]
    with zipfile.ZipFile(io.BytesIO(views_zip(run, "r"))) as z:
        assert z.namelist() == ["r-baseline-0.png", "r-baseline-1.png", "r-controlled-0.png", "r-controlled-1.png"]

    # an orbit of three views
    at.segmented_control(key=f"c{epi}.rig").set_value("orbit").run()
    at.number_input(key=f"c{epi}.views").set_value(3).run()
    generate(at, steps=2)
    assert errors(at) == [] and len(compare_images(at)) == 6
    assert at.session_state["history"][-1]["summary"] == "Epipolar views"
    assert any("orbit of 3 views 20° apart" in c.value for c in at.caption)
    at.selectbox(key=f"c{epi}.falloff").set_value("adaptive").run()  # AnimateAnywhere's rule, with its threshold
    at.number_input(key=f"c{epi}.strong").set_value(4.0).run()
    generate(at, steps=2)
    assert errors(at) == [] and len(compare_images(at)) == 6
    config = at.session_state["history"][-1]["setup"].controls[0]
    assert (config["falloff"], config["strong"]) == ("adaptive", 4.0)

    # a PNG with explicit cameras keeps them, and a rig can be tried and switched back
    cams = [Camera.look_at([x, 0, -4], [0, 0, 0], size=(32, 32)).model_dump(mode="json") for x in (-1.0, 1.0)]
    s = Setup(model=str(model_dir), prompt="a red circle", steps=2, controls=[{"kind": "epipolar", "cameras": cams}])
    at.file_uploader(key="upload").set_value(("views.png", attnctl_png(s), "image/png")).run()
    ok(at)
    (entry,) = at.session_state["controls"]
    assert at.toggle(key=f"c{entry['id']}.custom").value and entry["config"]["cameras"] == cams
    assert any("2 given cameras" in c.value for c in at.caption)
    at.toggle(key=f"c{entry['id']}.custom").set_value(False).run()
    assert at.session_state["controls"][0]["config"]["rig"]["kind"] == "stereo"
    at.toggle(key=f"c{entry['id']}.custom").set_value(True).run()
    ok(at)
    assert at.session_state["controls"][0]["config"]["cameras"] == cams
    assert "rig" not in at.session_state["controls"][0]["config"]


def test_schedule_editing_updates_the_control_and_blocks_bad_input(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    cid = at.session_state["controls"][0]["id"]
    charts = len(at.get("arrow_vega_lite_chart"))
    at.selectbox(key=f"c{cid}.u.kind").set_value("linear").run()
    ok(at)
    at.number_input(key=f"c{cid}.u.start").set_value(1.0)
    at.number_input(key=f"c{cid}.u.end").set_value(0.25).run()
    ok(at)
    assert at.session_state["controls"][0]["config"]["u"] == {"kind": "linear", "start": 1.0, "end": 0.25}
    assert len(at.get("arrow_vega_lite_chart")) == charts  # every strength keeps its curve
    at.selectbox(key=f"c{cid}.scale.kind").set_value("piecewise").run()
    at.text_input(key=f"c{cid}.scale.points").input("0:4, 0.5").run()
    ok(at)
    assert any("progress:value" in e for e in errors(at))
    at.button(key="generate").click().run()
    ok(at)
    assert any("Control 1 (SoftPAG)" in e for e in errors(at))
    assert at.session_state["history"] == []
    at.text_input(key=f"c{cid}.scale.points").input("0:4, 0.5:2, 1:0").run()
    ok(at)
    assert at.session_state["controls"][0]["config"]["scale"]["points"] == [[0, 4], [0.5, 2], [1, 0]]
    generate(at)
    assert errors(at) == [] and len(compare_images(at)) == 2


def test_uploaded_png_restores_every_setting(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    s = Setup(model=str(model_dir), prompt="a blue square above a green triangle", seed=11, steps=2, guidance=5.5,
              height=24, width=40,
              controls=[{"kind": "regulation", "targets": ["triangle"], "iterations": 1, "sites": "all"},
                        {"kind": "probe", "words": ["square"]}])
    at.file_uploader(key="upload").set_value(("made-by-attnctl.png", attnctl_png(s), "image/png")).run()
    ok(at)
    assert errors(at) == []
    assert any("Restored the settings" in m.value for m in at.success)
    for key in ("prompt", "seed", "steps", "guidance", "height", "width"):
        assert at.session_state[key] == getattr(s, key), key
    controls = at.session_state["controls"]
    assert [c["kind"] for c in controls] == ["regulation", GENERIC]  # the probe opens in the JSON panel
    assert controls[0]["config"]["targets"] == ["triangle"]
    at.button(key="generate").click().run()
    ok(at)
    assert errors(at) == [] and len(compare_images(at)) == 2
    ran = at.session_state["history"][-1]["setup"]
    assert ran.to_dict() | {"controls": None} == s.to_dict() | {"controls": None}
    assert [full(c) for c in ran.controls] == [full(c) for c in s.controls]  # same controls, defaults spelt out


def test_an_upload_restored_with_changes_says_each_change(monkeypatch, model_dir):
    """What the editor cannot run as recorded (true CFG, image 2 of a set, a value past a field's range) is named in
    a warning, not reported as restored."""
    s = Setup(model=str(model_dir), prompt="a blue square", seed=3, steps=2,
              controls=[{"kind": "regulation", "targets": ["square"], "iterations": 300}])
    meta = {**metadata_for(s, {"model": s.model, "family": "sd3"}), "true_cfg": 5.0, "images": 3, "image_index": 1}
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    at = start(monkeypatch, model_dir)
    at.file_uploader(key="upload").set_value(("set.png", encode_png(pixels, meta), "image/png")).run()
    ok(at)
    text = " ".join(w.value for w in at.warning)
    assert "Not everything could be restored as recorded" in text and not any(
        "Restored the settings" in m.value for m in at.success)
    assert "true CFG 5.0 is recorded" in text and "image 2 of 3 made in one call" in text
    assert "300 is outside this field's range" in text
    # a value past a field's range alone: the notice said "restored" (and the card's warning went at the next rerun)
    s2 = Setup(model=str(model_dir), prompt="a blue square", seed=3, steps=2,
               controls=[{"kind": "regulation", "targets": ["square"], "iterations": 300}])
    at = start(monkeypatch, model_dir)
    at.file_uploader(key="upload").set_value(("clamped.png", attnctl_png(s2), "image/png")).run()
    ok(at)
    at.run()  # another interaction: the change is still named
    text = " ".join(w.value for w in at.warning)
    assert "300 is outside this field's range" in text and not any("Restored the settings" in m.value
                                                                    for m in at.success)


def full(config: dict) -> dict:
    from attnctl.controls import control_from_json

    return control_from_json(config).to_json()


@pytest.mark.parametrize("name, data, message", [
    ("notes.png", b"these are my notes\nnot an image\n" * 8, "not a PNG"),
    ("huge.png", huge_png(), "pixels"),
])
def test_bad_upload_shows_an_error_and_the_app_keeps_working(monkeypatch, model_dir, name, data, message):
    at = start(monkeypatch, model_dir)
    before = at.session_state["prompt"]
    at.file_uploader(key="upload").set_value((name, data, "image/png")).run()
    ok(at)
    assert any(message in e and name in e for e in errors(at)), errors(at)
    assert at.session_state["prompt"] == before
    generate(at)
    assert len(compare_images(at)) == 2


def test_json_panel_takes_any_control_and_checks_it_against_the_model(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    at.selectbox(key="add_kind").set_value(GENERIC)
    at.button(key="add_control").click().run()
    ok(at)
    cid = at.session_state["controls"][-1]["id"]
    at.text_area(key=f"c{cid}.json").input('{"kind": "softpag", "heads": ["L9H0"]}').run()
    ok(at)
    assert any("L9" in e for e in errors(at)), errors(at)  # the tiny model has sites L0 and L1 only
    at.button(key="generate").click().run()
    assert at.session_state["history"] == []
    at.text_area(key=f"c{cid}.json").input('{"kind": "softpag", "heads": ["L0H1"], "u": 0.5}').run()
    ok(at)
    assert errors(at) == []
    generate(at)
    assert at.session_state["history"][-1]["setup"].controls[-1] == {"kind": "softpag", "heads": ["L0H1"], "u": 0.5}


def test_a_midpoint_edit_reports_steps_not_calls_and_gives_the_model_its_scheduler_back(model_dir):
    from attnctl.toyworld.world import parse_caption, render, scene_from_item
    from attnctl.ui import engine

    model = engine.load_model(str(model_dir))
    own = model.pipe.scheduler
    source = "a red circle and a blue square"
    item = {"prompt": source, **parse_caption(source), "boxes": [[0.1, 0.1, 0.45, 0.45], [0.55, 0.5, 0.9, 0.85]]}
    image = Image.fromarray(render(scene_from_item(item), 32))
    seen = []
    run = engine.edit_image(model, image, source, "a green circle and a blue square", 3, 1.0,
                            progress=lambda f, t: seen.append((f, t)), solver="midpoint")
    assert run.edited.size == (32, 32) and model.pipe.scheduler is own
    assert len(seen) == 12 and seen[-1] == (1.0, "UnifyEdit: step 3 of 3")  # 2 runs × 3 steps × 2 calls
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    with pytest.raises(AttnCtlError, match="the solver is 'heun'"):
        engine.edit_image(model, image, source, "a green circle", 3, 1.0, solver="heun")
    with pytest.raises(AttnCtlError, match="RF-Inversion settings: gamma"):
        engine.edit_image(model, image, source, "a green circle", 3, 1.0, rf={"gamma": 3})
    with pytest.raises(AttnCtlError, match="value_sharing control config — tokens"):
        engine.edit_image(model, image, source, "a green circle", 3, 1.0, share={"tokens": "text"})
    with pytest.raises(AttnCtlError, match="outside the vocabulary.*'zebra'"):
        engine.edit_image(model, image, source, "a green zebra", 3, 1.0)
    assert model.pipe.scheduler is own


def test_setups_the_run_would_ignore_or_refuse_are_flagged_in_the_editor_and_its_batch_file(model_dir):
    """The editor flags what generate would silently ignore or refuse, and its exported batch file is checked against
    the loaded model as `attnctl batch` checks it."""
    from attnctl.testing import save_pipeline, tiny_flux_pipeline
    from attnctl.ui import engine

    sd3 = engine.load_model(str(model_dir))
    assert engine.check_setup(sd3, Setup(model=str(model_dir), steps=2)) == []
    problems = engine.check_setup(sd3, Setup(model=str(model_dir), steps=2, negative_prompt="a green square",
                                             guidance=1.0))
    assert any("acts through CFG, which a guidance of 1.0 turns off" in p for p in problems)
    problems = engine.check_setup(sd3, Setup(model=str(model_dir), steps=2, controls=[{"kind": "unify_edit"}]))
    assert any("edits an existing image: use the Edit tab" in p for p in problems)
    problems = engine.check_setup(sd3, Setup(model=str(model_dir), steps=2, height=256, width=64))
    assert any("between 8 and 128 (got 256)" in p for p in problems)  # the tiny model's position table: 128 px
    # the smallest side is the CLI's and batch files' (8 px), though the tiny model's sides are multiples of 4
    problems = engine.check_setup(sd3, Setup(model=str(model_dir), steps=2, height=4, width=8))
    assert problems == ["The height must be a multiple of 4 between 8 and 128 (got 4)."]
    flux_dir = save_pipeline(tiny_flux_pipeline(), model_dir.parent / "tiny-flux")
    flux = engine.load_model(str(flux_dir))
    setup = Setup(model=str(flux_dir), steps=2, negative_prompt="a green triangle")
    assert any("does nothing on a FLUX model here" in p for p in engine.check_setup(flux, setup))
    other = Setup(model=str(flux_dir), steps=2, guidance=flux.defaults["guidance"] + 3)
    assert any("The guidance does nothing on this FLUX model" in p for p in engine.check_setup(flux, other))
    exported = batch_file(setup)
    assert check_batch_file(exported) == []  # the file alone is valid
    # an empty span of steps for the maps: the images are made, the maps are not, and a note says why
    run = engine.generate(sd3, Setup(model=str(model_dir), steps=2), engine.MapOptions(start=0.5, stop=0.5))
    assert run.baseline is not None and run.maps == {} and "span of the steps is empty" in run.map_note
    assert any("acts only through true CFG" in p for p in check_batch_file(exported, flux.pipe))
    # a FLUX model without a guidance embedding: the export leaves the guidance out (the batch check refuses it, so
    # the download was always disabled on toy-flux)
    plain = Setup(model=str(flux_dir), steps=2)
    assert "guidance" in batch_file(plain)["items"][0] and "guidance" not in batch_file(plain, flux.pipe)["items"][0]
    assert check_batch_file(batch_file(plain, flux.pipe), flux.pipe) == []
    assert check_batch_file(batch_file(plain), flux.pipe)  # with it, the check refuses the file


def test_a_regulation_site_selector_the_panel_cannot_pick_is_kept_as_written(monkeypatch, model_dir):
    """Opening a PNG with regulation sites "L0:2" (or a list of another model's sites) reset them to "mid" without a
    word; the panel now keeps them, as written."""
    from attnctl.ui.panels.regulation import _site_mode

    assert [_site_mode(v, ["L0", "L1"]) for v in ("mid", "all", ["L1"], ["L7"], "L0:2", "*")] == [
        "mid", "all", "pick", "other", "other", "other"]
    at = start(monkeypatch, model_dir)
    s = Setup(model=str(model_dir), prompt="a blue square above a green triangle", seed=1, steps=2,
              controls=[{"kind": "regulation", "targets": ["triangle"], "iterations": 1, "sites": "L0:2"}])
    at.file_uploader(key="upload").set_value(("made-by-attnctl.png", attnctl_png(s), "image/png")).run()
    ok(at)
    at.button(key="generate").click().run()
    ok(at)
    assert errors(at) == []
    assert at.session_state["history"][-1]["setup"].controls[0]["sites"] == "L0:2"


def test_the_edit_tabs_source_prompt_follows_the_current_baseline(monkeypatch, model_dir):
    """It stayed the session's first prompt, so a later baseline was inverted under a caption of another image; a
    source prompt the user wrote stays until the baseline changes."""
    at = generate(start(monkeypatch, model_dir))
    at.text_input(key="edit_source").set_value("my own words").run()
    assert at.text_input(key="edit_source").value == "my own words"
    at.text_area(key="prompt").set_value("a blue square").run()
    generate(at)
    assert at.text_input(key="edit_source").value == "a blue square"


def test_edit_tab_edits_the_current_baseline_and_refuses_an_unchanged_prompt(monkeypatch, model_dir):
    at = generate(start(monkeypatch, model_dir), steps=4)
    source = at.session_state["prompt"]
    assert at.text_input(key="edit_source").value == source
    assert at.button(key="edit_run").disabled is False  # the baseline is there to edit
    at.text_input(key="edit_target").set_value(source)
    at.button(key="edit_run").click().run()
    ok(at)
    assert any("nothing to edit" in e for e in errors(at)) and at.session_state["edit_result"] is None
    target = source.replace("red", "green") if "red" in source else source + " and a green square"
    at.text_input(key="edit_target").set_value(target)
    at.button(key="edit_run").click().run()
    ok(at)
    assert errors(at) == []
    shown = at.session_state["edit_result"]
    assert len(shown["images"]) == 3 and "UnifyEdit over 2 guided steps" in shown["summary"]
    with Image.open(io.BytesIO(shown["images"][2])) as img:
        assert img.size == (32, 32)
        meta = json.loads(img.text["attnctl"])
    assert (meta["source_prompt"], meta["prompt"]) == (source, target)
    assert meta["controls"][0]["kind"] == "unify_edit" and meta["controls"][0]["scale"]["kind"] == "window"
    assert meta["solver"] == "euler" and meta["model"] == str(model_dir)
    assert len(at.tabs[4].image) == 3
    scheduler = at.session_state["edit_result"]  # the midpoint solver: the same edit, another result, same summary
    at.radio(key="edit_solver").set_value("midpoint")
    at.button(key="edit_run").click().run()
    ok(at)
    assert errors(at) == []
    mid = at.session_state["edit_result"]
    assert "UnifyEdit over 2 guided steps" in mid["summary"] and mid["images"][2] != scheduler["images"][2]
    with Image.open(io.BytesIO(mid["images"][2])) as img:
        assert json.loads(img.text["attnctl"])["solver"] == "midpoint"
    assert at.number_input(key="edit_rf_eta").disabled  # RF-Inversion off: its settings greyed out
    at.checkbox(key="edit_rf").check().run()  # RF-Inversion's controllers on both runs, with the tab's settings
    at.number_input(key="edit_rf_eta").set_value(0.6).run()
    at.checkbox(key="edit_rf").uncheck().run()  # a setting survives the box being unticked and ticked again
    at.checkbox(key="edit_rf").check().run()
    assert at.number_input(key="edit_rf_eta").value == 0.6 and not at.number_input(key="edit_rf_eta").disabled
    at.button(key="edit_run").click().run()
    ok(at)
    assert errors(at) == []
    rf = at.session_state["edit_result"]
    assert rf["images"][1] != mid["images"][1] and rf["images"][2] != mid["images"][2]
    with Image.open(io.BytesIO(rf["images"][2])) as img:
        meta = json.loads(img.text["attnctl"])
    assert meta["rf_inversion"]["gamma"] == 0.5 and meta["rf_inversion"]["seed"] == 0
    assert rf["labels"][1:] == ("Target prompt, RF-Inversion", "UnifyEdit + RF-Inversion")
    assert mid["labels"][1:] == ("Target prompt, unguided", "UnifyEdit")
    assert (meta["rf_inversion"]["eta"]["value"], meta["rf_inversion"]["eta"]["stop"]) == (0.6, 0.25)

    # value sharing (RF-Solver-Edit) on both runs, RF-Inversion off: its inputs greyed out until the box is ticked, and
    # kept when it is unticked
    at.checkbox(key="edit_rf").uncheck().run()
    assert at.number_input(key="edit_share_weight").disabled and at.radio(key="edit_share_tokens").disabled
    at.checkbox(key="edit_share").check().run()
    at.number_input(key="edit_share_weight").set_value(0.8).run()
    at.radio(key="edit_share_tokens").set_value("image").run()
    at.checkbox(key="edit_share").uncheck().run()
    at.checkbox(key="edit_share").check().run()
    assert at.number_input(key="edit_share_weight").value == 0.8 and at.radio(key="edit_share_tokens").value == "image"
    assert not at.number_input(key="edit_share_stop").disabled and at.number_input(key="edit_share_stop").value == 0.15
    at.button(key="edit_run").click().run()
    ok(at)
    assert errors(at) == []
    shared = at.session_state["edit_result"]
    assert shared["images"][1] != mid["images"][1] and shared["images"][2] != mid["images"][2]  # mid: the same edit
    assert shared["labels"][1:] == ("Target prompt, value sharing", "UnifyEdit + value sharing")
    assert "UnifyEdit over 2 guided steps" in shared["summary"] and "ValueSharing at 1 sites" in shared["summary"]
    with Image.open(io.BytesIO(shared["images"][2])) as img:
        meta = json.loads(img.text["attnctl"])
    assert "rf_inversion" not in meta and meta["value_sharing"]["tokens"] == "image"
    assert (meta["value_sharing"]["weight"]["value"], meta["value_sharing"]["weight"]["stop"]) == (0.8, 0.15)
    at.checkbox(key="edit_rf").check().run()  # both: the labels name both
    at.button(key="edit_run").click().run()
    ok(at)
    both = at.session_state["edit_result"]
    assert both["labels"][1:] == ("Target prompt, RF-Inversion + value sharing",
                                  "UnifyEdit + RF-Inversion + value sharing")
    with Image.open(io.BytesIO(both["images"][2])) as img:
        assert {"rf_inversion", "value_sharing"} <= set(json.loads(img.text["attnctl"]))
    # the edit's PNG opened in the sidebar: refused with the way out (the Edit tab), not a setup that cannot run
    at.file_uploader(key="upload").set_value(("edited.png", shown["images"][2], "image/png")).run()
    assert any("this PNG is an edit" in e and "Edit tab" in e for e in errors(at))
    assert at.session_state["controls"] == [c for c in at.session_state["controls"] if c["kind"] != "unify_edit"]



# --------------------------------------------------------------------------------------------- fixes of the editor


def upload(at: AppTest, setup: Setup, info: dict | None = None, name: str = "made-by-attnctl.png") -> AppTest:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    meta = metadata_for(setup, {"model": setup.model, "family": "sd3", **(info or {})})
    at.file_uploader(key="upload").set_value((name, encode_png(pixels, meta), "image/png")).run()
    ok(at)
    return at


def test_sites_and_heads_survive_a_rerun_without_a_model(monkeypatch, model_dir):
    """With no model loaded (the model field emptied, or a PNG's model that does not load), the cards used to
    re-fit their sites and heads to no sites at all, for good: SoftPAG's layers, regulation's picked sites and the
    maps' sites were wiped."""
    at = start(monkeypatch, model_dir)
    soft = at.session_state["controls"][0]["id"]
    at.multiselect(key=f"c{soft}.layers").set_value(["L0", "L1"]).run()
    at.selectbox(key="add_kind").set_value("regulation")
    at.button(key="add_control").click().run()
    reg = at.session_state["controls"][1]["id"]
    at.segmented_control(key=f"c{reg}.sitemode").set_value("pick").run()
    at.multiselect(key=f"c{reg}.sites").set_value(["L0", "L1"]).run()
    at.multiselect(key="map_sites").set_value(["L1"]).run()
    ok(at)
    at.text_input(key="model_path").set_value("").run()  # no model for a rerun
    ok(at)
    assert at.button(key="generate").disabled
    at.text_input(key="model_path").set_value(str(model_dir)).run()
    ok(at)
    soft_cfg, reg_cfg = (c["config"] for c in at.session_state["controls"])
    assert soft_cfg["heads"] == ["L0", "L1"] and reg_cfg["sites"] == ["L0", "L1"]
    assert at.multiselect(key="map_sites").value == ["L1"]
    assert errors(at) == [] and not at.warning


def test_a_layer_the_model_lacks_is_named_when_it_is_left_out(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    s = Setup(model=str(model_dir), prompt="a red circle", steps=2,
              controls=[{"kind": "softpag", "heads": ["L1", "L5"]}])
    upload(at, s)
    assert at.session_state["controls"][0]["config"]["heads"] == ["L1"]
    text = " ".join(w.value for w in at.warning)
    assert "L5 not offered here" in text and "Not everything could be restored" in text


@pytest.mark.parametrize("bad", [
    {"kind": "layout", "boxes": {"circle": [0.1, 0.2, 0.9]}},
    {"kind": "epipolar", "rig": "stereo"},
    {"kind": "regulation", "targets": "circle"},
    {"kind": "softpag", "heads": 7},
])
def test_a_png_with_a_control_the_library_refuses_opens_it_as_json(monkeypatch, model_dir, bad):
    """Such a PNG used to end every rerun in a traceback (a panel drawing the config), or to be "restored" mangled
    ("circle" as six letters, heads 7 as none)."""
    s = Setup(model=str(model_dir), prompt="a red circle to the left of a blue square", steps=2, controls=[bad])
    _, notes = setup_from_metadata(metadata_for(s, {"model": s.model}))
    assert any("not valid as recorded" in n and "JSON panel" in n for n in notes)
    at = upload(start(monkeypatch, model_dir), s)
    (entry,) = at.session_state["controls"]
    assert entry["kind"] == GENERIC and entry["config"] == bad
    assert any("opens as JSON" in w.value for w in at.warning)
    at.button(key="generate").click().run()
    ok(at)
    assert at.session_state["history"] == [] and errors(at)


def test_a_panel_that_cannot_draw_a_config_hands_it_to_the_json_panel(monkeypatch, model_dir):
    import dataclasses

    from attnctl.ui.panels import layout

    def broken(ctx, key, config):
        raise KeyError("x0")

    monkeypatch.setattr(layout, "PANEL", dataclasses.replace(layout.PANEL, render=broken))
    at = start(monkeypatch, model_dir)
    at.selectbox(key="add_kind").set_value("layout")
    at.button(key="add_control").click().run()
    ok(at)
    assert at.session_state["controls"][-1]["kind"] == GENERIC
    assert any("Layout guidance panel cannot show this config" in w.value for w in at.warning)
    at.run()
    ok(at)
    assert any("opens as JSON" in w.value for w in at.warning)  # said until it is fixed


def test_an_opened_png_runs_with_its_recorded_text_length(monkeypatch, model_dir):
    import torch

    from attnctl.cli import load_pipeline

    s = Setup(model=str(model_dir), prompt="a red circle", seed=2, steps=2)
    at = upload(start(monkeypatch, model_dir), s, {"max_sequence_length": 7})
    assert any("Text length 7 tokens" in c.value for c in at.caption)
    at.button(key="generate").click().run()
    ok(at)
    run = at.session_state["history"][-1]
    assert run["setup"].max_sequence_length == 7
    assert json.loads(Image.open(io.BytesIO(run["baseline"])).text["attnctl"])["max_sequence_length"] == 7
    pipe = load_pipeline(str(model_dir))
    want = pipe(s.prompt, num_inference_steps=2, guidance_scale=run["setup"].guidance, height=32, width=32,
                max_sequence_length=7, generator=torch.Generator("cpu").manual_seed(2)).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(run["baseline"])).convert("RGB")), np.asarray(want))
    at.button(key="reset_text_length").click().run()
    ok(at)
    assert at.session_state["max_sequence_length"] is None


def test_a_reposition_baseline_png_keeps_its_reference_prompts(monkeypatch, model_dir):
    refs = ["a red circle", "a blue square"]
    s = Setup(model=str(model_dir), prompt="a red circle to the left of a blue square", seed=1, steps=2,
              reference_prompts=refs)
    at = upload(start(monkeypatch, model_dir), s)
    assert at.session_state["controls"] == [] and at.session_state["loose_references"] == refs
    assert any("Reference prompts" in m.value for m in at.markdown)
    at.button(key="generate").click().run()
    ok(at)
    assert at.session_state["history"][-1]["setup"].reference_prompts == refs
    at.button(key="drop_references").click().run()
    ok(at)
    at.button(key="generate").click().run()
    ok(at)
    assert at.session_state["history"][-1]["setup"].reference_prompts == []


def test_export_is_refused_while_a_card_shows_an_error(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    soft = at.session_state["controls"][0]["id"]
    (download,) = [b for b in at.get("download_button") if b.proto.label == "Batch file (JSON)"]
    assert not download.proto.disabled
    at.selectbox(key=f"c{soft}.u.kind").set_value("custom").run()
    at.text_input(key=f"c{soft}.u.text").input("linear(1, 5)").run()  # past u's [0, 1]
    ok(at)
    (download,) = [b for b in at.get("download_button") if b.proto.label == "Batch file (JSON)"]
    assert download.proto.disabled
    assert any("Fix the control cards first" in e for e in errors(at))
    at.text_input(key=f"c{soft}.u.text").input("0.5").run()
    at.selectbox(key="add_kind").set_value(GENERIC)
    at.button(key="add_control").click().run()
    cid = at.session_state["controls"][-1]["id"]
    at.text_area(key=f"c{cid}.json").input('{"kind": "probe", "words": ["circle"]').run()  # not valid JSON
    ok(at)
    (download,) = [b for b in at.get("download_button") if b.proto.label == "Batch file (JSON)"]
    assert download.proto.disabled and any("Control 2" in e for e in errors(at))


def test_word_pickers_offer_every_word_of_a_long_prompt(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    words = " ".join(f"w{i}" for i in range(30))
    at.text_area(key="prompt").input(f"a red circle {words} square").run()
    at.selectbox(key="add_kind").set_value("regulation")
    at.button(key="add_control").click().run()
    ok(at)
    reg = at.session_state["controls"][-1]["id"]
    assert {"w29", "square"} <= set(at.multiselect(key=f"c{reg}.targets").options)


def test_reference_prompts_follow_their_subjects(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    iso = only_control(at, "isolation")
    at.toggle(key=f"c{iso}.references").set_value(True).run()

    def reference(subject: str):
        return next(t for t in at.text_input if t.label == f"Reference prompt of {subject!r}")

    reference("blue square").set_value("a large blue square").run()
    at.multiselect(key=f"c{iso}.subjects").set_value(["blue square", "red circle"]).run()  # reordered
    ok(at)
    assert at.session_state["controls"][0]["reference_prompts"] == ["a large blue square", "a red circle"]
    assert reference("blue square").value == "a large blue square"
    at.multiselect(key=f"c{iso}.subjects").set_value(["red circle"]).run()  # one dropped
    ok(at)
    assert at.session_state["controls"][0]["reference_prompts"] == ["a red circle"]


def test_a_typed_size_is_snapped_to_the_nearest_multiple_and_said(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    for typed, snapped in ((26, 28), (30, 32), (9, 8)):  # multiples of 4; halves go up
        at.number_input(key="width").set_value(typed).run()
        ok(at)
        assert at.number_input(key="width").value == snapped
        assert any(f"width {typed} → {snapped}" in c.value for c in at.caption)


def test_exported_batch_file_records_the_model_as_the_pngs_do(monkeypatch, model_dir):
    monkeypatch.chdir(model_dir.parent)
    monkeypatch.setenv(MODEL_ENV, model_dir.name)  # a folder relative to where the UI was started
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    at.run()
    ok(at)
    assert json.loads(at.code[-1].value)["model"] == str(model_dir.resolve())
    assert batch_file(Setup(model="x"), model="/abs/x")["model"] == "/abs/x"


def test_softpag_heads_given_as_one_selector_string_are_kept(monkeypatch, model_dir):
    s = Setup(model=str(model_dir), prompt="a red circle", steps=2, controls=[{"kind": "softpag", "heads": "L0"}])
    at = upload(start(monkeypatch, model_dir), s)
    assert at.session_state["controls"][0]["config"]["heads"] == ["L0"]


def test_softpag_custom_method_stays_and_its_error_names_no_file(monkeypatch, model_dir):
    at = start(monkeypatch, model_dir)
    soft = at.session_state["controls"][0]["id"]
    at.selectbox(key=f"c{soft}.method").set_value("custom").run()
    ok(at)
    assert at.selectbox(key=f"c{soft}.method").value == "custom"
    at.selectbox(key=f"c{soft}.method").set_value("softug").run()
    ok(at)
    assert at.session_state["controls"][0]["config"]["target"] == "uniform"
    from attnctl.ui.setup import control_problem

    problem = control_problem({"kind": "softpag", "heads": 7})
    assert problem and "not a head selection" in problem and "*.json" not in problem


def test_models_load_on_the_device_and_dtype_given(model_dir):
    import torch

    from attnctl.ui import engine

    model = engine.load_model(str(model_dir), device="cpu", dtype="bf16")
    assert model.pipe.transformer.dtype == torch.bfloat16 and model.info["dtype"] == "bf16"
    run = engine.generate(model, Setup(model=str(model_dir), steps=2, controls=[{"kind": "softpag", "heads": ["L1"]}]),
                          engine.MapOptions())
    assert run.controlled is not None and run.maps["controlled"]
    assert metadata_for(run.setup, run.info)["dtype"] == "bf16"
    with pytest.raises(AttnCtlError, match="unknown dtype"):
        engine.load_model(str(model_dir), dtype="fp8")
