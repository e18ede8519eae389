"""The example scripts run on the toy models with their default (or quick) settings and write their output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "set_attn_processor.py": [],
    "set_attn_processor.py --softpag": ["--softpag", "toy-sd3-headhunter.json"],
    "softpag.py": ["--steps", "4"],
    "regulation.py": ["--seeds", "1"],
    "layout.py": ["--seeds", "1"],
    "epipolar.py": [],
    "isolation.py": [],
    "invert.py": [],
    "invert.py --solver midpoint": ["--solver", "midpoint"],
    "edit.py": ["--steps", "8"],
    "edit.py --rf": ["--steps", "8", "--rf-settings", '{"gamma": 0.4}'],
    "edit.py --share": ["--steps", "8", "--share-settings", '{"tokens": "image"}'],
    "headhunt.py": ["--limit", "1", "--seeds", "1", "--rounds", "1", "--candidates", "L0", "--w", "2"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path, run_script):
    res = run_script(ROOT / "examples" / script.split()[0], [*CASES[script], "--out", tmp_path], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(p.suffix == ".png" for p in tmp_path.rglob("*")) or "no head improved" in res.stdout, res.stdout


def test_invert_example_reads_images_as_attnctl_does(tmp_path, run_script):
    """examples/invert.py opened --image with PIL's own conversion: a 16-bit greyscale PNG came out white. It now
    reads it as `attnctl edit` does (8 bits, upright); the first panel of invert.png is the image it inverted."""
    from PIL import Image

    from attnctl.imageio import read_image

    ramp = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)  # 0 … 61380: a 16-bit grey ramp
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    res = run_script(ROOT / "examples" / "invert.py", ["--image", tmp_path / "grey16.png", "--steps", "2",
                                                       "--out", tmp_path], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    shown = np.asarray(Image.open(tmp_path / "invert.png"))[:, :32]
    assert np.array_equal(shown, read_image(tmp_path / "grey16.png")) and shown.max() < 255


@pytest.mark.parametrize("script", ["invert.py", "edit.py"])
def test_example_image_problems_are_named_before_the_model_loads(script, tmp_path, run_script):
    """A missing --image was a FileNotFoundError traceback after the model loaded (and, in invert.py, a file that is
    no image a PIL traceback). The model named here does not exist, so its error would come first if it loaded."""
    (tmp_path / "notes.png").write_text("not an image")
    for image, said in (("missing.png", "'missing.png' is not a file"), (tmp_path / "notes.png",
                                                                         "is not an image file PIL can read")):
        res = run_script(ROOT / "examples" / script, ["--model", "no-such-model", "--image", image, "--out",
                                                      tmp_path], cwd=tmp_path)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "no-such-model" not in res.stderr, res.stderr[-2000:]


def test_edit_example_reads_rf_settings_before_the_model_loads(tmp_path, run_script):
    """--rf-settings was parsed after the edits: bad JSON was a traceback, and a bad key a message, after the work."""
    for settings, said in (('{"gamma": 0.5', "--rf-settings is not valid JSON"), ('{"gama": 0.5}', "gama")):
        res = run_script(ROOT / "examples" / "edit.py", ["--model", "no-such-model", "--rf-settings", settings,
                                                         "--out", tmp_path], cwd=tmp_path)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "no-such-model" not in res.stderr, res.stderr[-2000:]
