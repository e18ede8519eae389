"""``launch_workers`` (``--processes N``): how the launcher tells a crashed worker from one whose images failed.

The workers are stand-ins for the ``attnctl`` command (a ``sitecustomize`` on their ``PYTHONPATH`` replaces
``attnctl.cli.main``), so each test takes a second or two, not a batch.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from attnctl.distributed import launch_workers

FAKE_WORKER = textwrap.dedent('''
    import os
    import sys
    import time

    if os.environ.get("FAKE_WORKER_DIR"):
        import attnctl.cli

        def _fake_main():
            rank = os.environ["RANK"]
            what = os.environ["FAKE_WORKER_" + rank]
            folder = __import__("pathlib").Path(os.environ["FAKE_WORKER_DIR"])
            if what == "crash":  # outside the per-image try, e.g. out of memory while the model loads
                for _ in range(600):  # once a working peer is at work (a loaded machine starts it late)
                    if any(folder.glob("started*")) or "work" not in os.environ.values():
                        break
                    time.sleep(0.1)
                raise RuntimeError("simulated failure while loading the model")
            if what.startswith("exit"):
                sys.exit(int(what[4:]))
            try:  # "work": a long share of images, then the final barrier fails as the peer is gone
                (folder / f"started{rank}").touch()
                for _ in range(150):
                    time.sleep(0.1)
            except KeyboardInterrupt:  # the launcher's SIGINT: stop after the current image
                (folder / f"stopped{rank}").touch()
            sys.exit(2)  # "rank 0: another process of this batch ended early"

        attnctl.cli.main = _fake_main
''')


def launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *ranks: str) -> tuple[int, list[str]]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAKE_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FAKE_WORKER_DIR", str(tmp_path))
    for rank, what in enumerate(ranks):
        monkeypatch.setenv(f"FAKE_WORKER_{rank}", what)
    notes: list[str] = []
    code = launch_workers(["batch", "unused.json"], len(ranks), threads=1, note=notes.append)
    return code, notes


def test_crashed_worker_stops_the_others_and_is_named(tmp_path, monkeypatch, capfd):
    code, notes = launch(tmp_path, monkeypatch, "work", "crash")
    assert code == 1  # not rank 0's 2 ("the file or an option is wrong")
    assert len(notes) == 1 and notes[0].startswith("worker rank 1 crashed"), notes
    assert (tmp_path / "stopped0").exists()  # rank 0 was told to stop, not left to finish its share
    assert "RuntimeError: simulated failure while loading the model" in capfd.readouterr().err  # traceback kept


@pytest.mark.parametrize(("ranks", "expected"), [
    (("exit1", "exit0"), 1),  # some images failed: rank 0's code, nothing crashed
    (("exit0", "exit0"), 0),
    (("exit2", "exit2"), 2),  # every worker refused the file or an option
])
def test_normal_endings_are_not_crashes(tmp_path, monkeypatch, ranks, expected):
    code, notes = launch(tmp_path, monkeypatch, *ranks)
    assert code == expected
    if expected != 2:
        assert notes == []
    else:  # the first to end may stop the other while it starts (then only the first is named)
        said = [f"worker rank {r} exited with code 2; finished images are kept — re-run the same command to continue"
                for r in (0, 1)]
        assert notes and all(n in said for n in notes), notes


def test_a_dead_head_search_worker_says_what_the_search_keeps(tmp_path, monkeypatch):
    """The launcher said "finished images are kept" when a head-search worker died: a search scores candidates."""
    launch(tmp_path, monkeypatch, "exit0")  # sets the stand-in workers up
    monkeypatch.setenv("FAKE_WORKER_0", "work")
    monkeypatch.setenv("FAKE_WORKER_1", "crash")
    notes: list[str] = []
    code = launch_workers(["--debug", "headhunt", "--out", "unused"], 2, threads=1, note=notes.append)
    assert code == 1
    assert notes == ["worker rank 1 crashed (an unexpected error; its traceback is above); the rounds done and "
                     "candidates scored are kept — re-run the same command to continue"]
