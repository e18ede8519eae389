"""The example scripts run on the toy models with their default (or quick) settings and write their output."""

from __future__ import annotations

from pathlib import Path

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
