"""HeadHunter: batched candidate scoring, greedy rounds, resume, processes, presets and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnctl
from attnctl.errors import AttnCtlError, ConfigError, SiteError
from attnctl.headhunt import REFERENCE, HeadHunt, candidate_pool, make_settings
from attnctl.objectives import load_objective, toy_combined


def brightness(images, prompts):
    """A plain objective: mean pixel value (deterministic, sensitive to any change of the image)."""
    return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]


@pytest.fixture(scope="module")
def pipes():
    from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
    from attnctl.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    out = {"sd3": AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3").components),
           "flux": AttnCtlFluxPipeline(**tiny_flux_pipeline().components)}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def settings(**over):
    base = dict(model="tiny", prompts=["a red circle", "a blue square"], seeds=[0, 1], candidates=["L0H0:2", "L1H0:2"],
                objective="brightness", rounds=2, top_k=1, u=1.0, w=2.0, steps=2, guidance=3.0, height=32, width=32,
                max_sequence_length=24, batch_images=4)
    base.update(over)
    return make_settings(**base)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_batched_scores_equal_one_call_per_head_set(pipes, family, tmp_path):
    """score_sets runs B candidates per call (branch rows); each candidate's scores equal those of separate
    pipeline calls with SoftPAG on its heads, and the empty set equals the unguided pipeline."""
    pipe = pipes[family]
    s = settings()
    hunt = HeadHunt(pipe, s, tmp_path, objective=brightness)
    pool = hunt.pool
    sets = [[], [pool[0]], [pool[1], pool[2]], [pool[3]]]
    got = hunt.score_sets(sets)
    for heads, scores in zip(sets, got, strict=True):
        want = []
        for i, prompt in enumerate(s.prompts):
            for seed in s.seeds:
                controls = [attnctl.SoftPAG(heads=heads, u=1.0, scale=2.0)] if heads else None
                image = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                             max_sequence_length=24, generator=torch.Generator().manual_seed(seed + 1_000_003 * i),
                             controls=controls).images[0]
                want.extend(brightness([image], [prompt]))
        assert np.allclose(scores, want, atol=0.02), (heads, scores, want)  # uint8 rounding of a few pixels at most
    assert len({round(sum(v), 6) for v in got}) == len(got)  # the head sets made different images


def test_greedy_rounds_pick_the_best_and_write_state_and_preset(pipes, tmp_path):
    pipe = pipes["sd3"]
    hunt = HeadHunt(pipe, settings(top_k=2), tmp_path, objective=brightness)
    state = hunt.run()
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["finished"] and len(data["rounds"]) == 2 and data["pool_size"] == len(hunt.pool) == 4
    first = data["rounds"][0]
    best = sorted(first["scores"], key=lambda c: (-first["scores"][c], hunt.pool.index(c)))[:2]
    assert first["chosen"] == best and first["selected_before"] == []
    assert data["rounds"][1]["selected_before"] == best and len(data["rounds"][1]["scores"]) == 2
    assert state.selected == data["selected"] == best + data["rounds"][1]["chosen"]
    # a folder holding two rounds is not cut back to one: asking for fewer is refused, naming the way out
    with pytest.raises(AttnCtlError, match=r"2 rounds, more than the 1 asked for.*--rounds 2"):
        HeadHunt(pipe, settings(top_k=2, rounds=1), tmp_path, objective=brightness).run()
    # the first round's reference is the unguided pipeline
    plain = hunt.score_sets([[]])[0]
    assert first["reference"] == pytest.approx(sum(plain) / len(plain))
    # the preset loads into SoftPAG and selects exactly those heads
    pag = attnctl.SoftPAG(heads=str(tmp_path / "heads.json"))
    attnctl.Controller(pipe, [pag]).restore()
    got = sorted(f"{site.name}/H{h}" for site in pag.sites for h in pag.heads_at(site))
    assert got == sorted(state.selected)


def test_require_gain_stops_when_nothing_helps(pipes, tmp_path):
    def flat(images, prompts):  # no head set can beat the reference
        return [1.0] * len(images)

    state = HeadHunt(pipes["sd3"], settings(require_gain=True, rounds=3), tmp_path, objective=flat).run()
    assert len(state.rounds) == 1 and state.rounds[0].chosen == [] and state.selected == []
    assert state.finished and "no candidate beats" in state.stop_reason
    assert not (tmp_path / "heads.json").exists()
    # without require_gain the paper's rule adds the top k regardless, and warns that the head ties the reference
    notes: list[str] = []
    state = HeadHunt(pipes["sd3"], settings(rounds=1), tmp_path / "paper", objective=flat, note=notes.append).run()
    assert state.selected == [state.pool[0]]
    assert any(f"{state.pool[0]} scored exactly the reference" in n and "--require-gain" in n for n in notes), notes


def test_each_pair_gets_its_own_noise_and_old_searches_keep_shared_noise(pipes, tmp_path):
    pipe = pipes["sd3"]
    two_same = settings(prompts=["a red circle", "a red circle"], seeds=[0])
    per_prompt = HeadHunt(pipe, two_same, None, objective=brightness).score_sets([[]])[0]
    assert per_prompt[0] != per_prompt[1]  # the same prompt twice: two different initial noises
    shared = HeadHunt(pipe, make_settings(**{**two_same.model_dump(), "noise": "shared"}), None,
                      objective=brightness).score_sets([[]])[0]
    assert shared[0] == shared[1] and shared[0] == per_prompt[0]  # prompt 0 keeps its seed either way
    # a state saved before the setting existed (no "noise" key) ran with shared noise: it resumes as such
    old = make_settings(**{**settings(rounds=1).model_dump(), "noise": "shared"})
    HeadHunt(pipe, old, tmp_path, objective=brightness).run()
    data = json.loads((tmp_path / "state.json").read_text())
    del data["settings"]["noise"]
    assert data["settings_hash"] == old.digest()  # the digest of a shared-noise search is the old digest
    (tmp_path / "state.json").write_text(json.dumps(data))
    longer = make_settings(**{**old.model_dump(), "rounds": 2})
    assert len(HeadHunt(pipe, longer, tmp_path, objective=brightness).run().rounds) == 2
    with pytest.raises(AttnCtlError, match=r"changed: noise"):
        HeadHunt(pipe, settings(rounds=2), tmp_path, objective=brightness).run()


def test_finalists_are_rescored_on_more_seeds_and_chosen_on_all_their_pairs(pipes, tmp_path):
    pipe = pipes["sd3"]
    s = settings(rounds=1, finalists=2, finalist_seeds=[2, 3])
    hunt = HeadHunt(pipe, s, tmp_path, objective=brightness)
    state = hunt.run()
    r = state.rounds[0]
    first = sorted(r.scores, key=lambda c: (-r.scores[c], hunt.pool.index(c)))
    assert sorted(r.final) == sorted([REFERENCE, *first[:2]])  # the two best of the first pass, and the reference
    # the final means are over the search seeds and the extra seeds, scored plainly here
    for c in first[:2]:
        both = hunt.score_sets([[c]])[0] + hunt.score_sets([[c]], seeds=[2, 3])[0]
        assert r.final[c] == pytest.approx(sum(both) / len(both))
    plain = hunt.score_sets([[]])[0] + hunt.score_sets([[]], seeds=[2, 3])[0]
    assert r.reference == pytest.approx(sum(plain) / len(plain))
    assert state.selected == [max(first[:2], key=lambda c: (r.final[c], -hunt.pool.index(c)))]
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["rounds"][0]["final"] == pytest.approx(r.final) and saved["settings"]["finalists"] == 2
    # the finalists' scores are logged under their own key: a re-run scores nothing again
    again = HeadHunt(pipe, s, tmp_path, objective=lambda im, p: pytest.fail("re-scored")).run()
    assert again.selected == state.selected
    # a search without finalists keeps the digest it had before the setting existed
    assert settings().digest() == make_settings(**{**settings().model_dump(), "finalists": 0}).digest()


def test_resume_after_a_crash_scores_nothing_twice_and_ends_the_same(pipes, tmp_path):
    """Every pipeline call's scores are logged as it finishes (a record per candidate and prompt): a crash within a
    chunk keeps the chunk's finished prompts, and the resumed search equals an uninterrupted one."""
    pipe = pipes["flux"]
    full = HeadHunt(pipe, settings(), tmp_path / "full", objective=brightness).run()

    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 4:  # calls: the reference on prompts 0, 1; then candidates 0-1 on prompt 0, then on 1
            raise RuntimeError("GPU fell off the bus")
        return brightness(images, prompts)

    with pytest.raises(AttnCtlError, match="objective .* failed: RuntimeError: GPU fell off"):
        HeadHunt(pipe, settings(), tmp_path / "r", objective=flaky).run()
    logged = (tmp_path / "r" / "scores-r0.jsonl").read_text().splitlines()
    assert not (tmp_path / "r" / "state.json").exists()
    pool = HeadHunt(pipe, settings(), None, objective=brightness).pool
    records = {(json.loads(x)["candidate"], json.loads(x)["prompt"]) for x in logged}
    assert records == {(REFERENCE, 0), (REFERENCE, 1), (pool[0], 0), (pool[1], 0)}  # the chunk's first call kept
    (tmp_path / "r" / "scores-r0.jsonl").write_text("\n".join(logged) + '\n{"key": "trunc')  # a killed write
    counted = {"n": 0}

    def counting(images, prompts):
        counted["n"] += len(images)
        return brightness(images, prompts)

    resumed = HeadHunt(pipe, settings(), tmp_path / "r", objective=counting).run()
    assert resumed.selected == full.selected
    assert [r.scores for r in resumed.rounds] == [r.scores for r in full.rounds]
    # round 1 re-scored only what the log lacked: 1 reference + 4 candidates + round 2's 3, minus the logged
    # (candidate, prompt) calls of 2 seeds each
    pairs = 4
    assert counted["n"] == (1 + 4 + 1 + 3) * pairs - len(logged) * 2
    # a log of the format before per-prompt records (one record per candidate) still resumes: nothing is re-scored
    parts: dict = {}
    for line in (tmp_path / "full" / "scores-r0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        parts.setdefault((rec["key"], rec["round"], rec["candidate"]), {})[rec["prompt"]] = rec["scores"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scores-r0.jsonl").write_text("".join(
        json.dumps({"key": k, "round": r, "candidate": c, "scores": by[0] + by[1]}) + "\n"
        for (k, r, c), by in parts.items()))
    old = HeadHunt(pipe, settings(), tmp_path / "old", objective=lambda im, p: pytest.fail("re-scored")).run()
    assert old.selected == full.selected and [r.scores for r in old.rounds] == [r.scores for r in full.rounds]
    # more rounds extend a finished search; other settings are refused
    longer = HeadHunt(pipe, settings(rounds=3), tmp_path / "r", objective=brightness).run()
    assert longer.selected[:2] == full.selected and len(longer.rounds) == 3
    with pytest.raises(AttnCtlError, match=r"other settings \(changed: w\)"):
        HeadHunt(pipe, settings(w=5.0), tmp_path / "r", objective=brightness).run()


def test_a_search_records_the_objective_it_ran_and_resumes_with_fewer_images_per_call(pipes, tmp_path):
    """The state and the preset say which objective scored the search (a callable by its name, not the settings'
    default); resuming under another callable says so; batch_images may change on resume (it changes no score)."""
    pipe = pipes["sd3"]
    first = HeadHunt(pipe, settings(rounds=1, batch_images=4), tmp_path, objective=brightness).run()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["scored_with"] == [f"{__name__}:brightness"]
    assert json.loads((tmp_path / "heads.json").read_text())["search"]["scored_with"] == [f"{__name__}:brightness"]
    notes: list[str] = []
    again = HeadHunt(pipe, settings(rounds=2, batch_images=1), tmp_path, objective=brightness, note=notes.append)
    longer = again.run()  # fewer images per call: no refusal, round 1 not scored again
    assert longer.rounds[0].scores == first.rounds[0].scores and not [n for n in notes if "objective" in n]
    darker = HeadHunt(pipe, settings(rounds=3), tmp_path, note=notes.append,
                      objective=lambda images, prompts: [-s for s in brightness(images, prompts)]).run()
    assert any("scored with the objective" in n and "<lambda>" in n for n in notes)
    assert len(darker.scored_with) == 2 and darker.scored_with[0] == f"{__name__}:brightness"


def test_two_processes_choose_what_one_process_chooses(tmp_path):
    """``attnctl headhunt --processes 2`` (torchrun-style ranks over gloo) on toy-sd3 equals one process."""
    args = ["--model", "toy-sd3", "--prompts", "pair", "--limit", "1", "--seeds", "2", "--candidates", "L0:2",
            "--rounds", "2", "--top-k", "1", "--steps", "6", "--batch-images", "4", "--w", "2", "--finalists", "1",
            "--finalist-seeds", "1"]
    for name, extra in (("one", []), ("two", ["--processes", "2"])):
        res = subprocess.run([sys.executable, "-m", "attnctl", "headhunt", *args, "--out", str(tmp_path / name),
                              *extra], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "state.json").read_text()) for n in ("one", "two"))
    assert one["selected"] == two["selected"] and len(one["selected"]) == 2
    assert [r["scores"] for r in one["rounds"]] == [r["scores"] for r in two["rounds"]]
    assert [r["final"] for r in one["rounds"]] == [r["final"] for r in two["rounds"]]
    assert sorted(p.name for p in (tmp_path / "two").glob("scores-r*.jsonl")) == ["scores-r0.jsonl", "scores-r1.jsonl"]


def test_a_second_search_on_a_folder_in_use_is_refused(pipes, tmp_path, monkeypatch):
    """Two searches started on one --out both ran to the end and the folder kept one run's result: a search holds
    the folder's advisory lock (the one ``attnctl batch`` takes), and a second is refused — the CLI with exit code
    2, before its model loads."""
    import fcntl

    from typer.testing import CliRunner

    import attnctl.cli
    from attnctl.batch import LOCK_NAME
    from attnctl.cli import app

    out = tmp_path / "o"
    out.mkdir()
    with open(out / LOCK_NAME, "a+b") as held:  # a search (or batch) of another process writing there
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AttnCtlError, match="another attnctl head search .*is writing to") as err:
            HeadHunt(pipes["sd3"], settings(rounds=1), out, objective=brightness).run()
        assert "another --out folder" in err.value.fix
        assert not list(out.glob("scores-r*.jsonl")) and not (out / "state.json").exists()  # nothing written

        def no_model(*a, **k):
            raise AssertionError("a model was loaded")

        monkeypatch.setattr(attnctl.cli, "load_pipeline", no_model)
        res = CliRunner().invoke(app, ["headhunt", "--out", str(out), "--prompts", "pair", "--limit", "1",
                                       "--candidates", "L0H0"])
        assert res.exit_code == 2, res.output
        assert "another attnctl head search (or batch) is writing to" in " ".join(res.output.split())
    # the lock is released with the search: the next one runs, and leaves the folder free again
    HeadHunt(pipes["sd3"], settings(rounds=1), out, objective=brightness).run()
    assert (out / "state.json").exists()
    with open(out / LOCK_NAME, "a+b") as again:
        fcntl.flock(again.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_toy_objectives_score_the_world():
    from PIL import Image

    from attnctl.toyworld.world import render, scene_from_item

    item = {"prompt": "a red circle", "objects": [{"shape": "circle", "colour": "red", "count": 1}],
            "boxes": [[0.2, 0.2, 0.7, 0.7]]}
    good = Image.fromarray(render(scene_from_item(item)))
    blank = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    g, b = toy_combined([good, blank], ["a red circle"] * 2)
    assert g == pytest.approx(1.0) and b == 0.0
    with pytest.raises(ConfigError, match="cannot read the prompt") as e:
        toy_combined([good], ["a photo of a cat"])
    assert str(e.value).count("Fix:") == 1  # one way out, not the world's and the objective's


def test_bad_input_is_refused_clearly(pipes, tmp_path):
    pipe = pipes["sd3"]
    with pytest.raises(ConfigError, match="unknown objective 'pickscore'"):
        load_objective("pickscore")
    with pytest.raises(ConfigError, match="cannot import the objective's module"):
        load_objective("no_such_module_xyz:f")
    (tmp_path / "obj.py").write_text("def score(images, prompts):\n    return [1.0]\n")
    fn, _ = load_objective(f"{tmp_path / 'obj.py'}:score")
    hunt = HeadHunt(pipe, settings(), tmp_path / "o", objective=fn)
    with pytest.raises(AttnCtlError, match="returned 1 scores for 2 images"):
        hunt.run()
    with pytest.raises(AttnCtlError, match="non-finite"):
        HeadHunt(pipe, settings(), tmp_path / "n", objective=lambda im, p: [float("nan")] * len(im)).run()
    for bad, match in ((dict(u=1.5), "u: Input should be less"), (dict(w=float("nan")), "w must be a finite"),
                       (dict(top_k=0), "top_k"), (dict(seeds=[1, 1]), "distinct"), (dict(prompts=[]), "prompts"),
                       (dict(finalists=2), "need finalist_seeds"), (dict(finalist_seeds=[5]), "only used with"),
                       (dict(finalists=1, top_k=2, finalist_seeds=[5]), "at least top_k"),
                       (dict(finalists=2, finalist_seeds=[1, 5]), "not among seeds"),
                       (dict(u=0.0), "u = 0 perturbs no attention map.*use u > 0"),
                       (dict(w=0.0), "w = 0 gives the perturbation no weight.*use w != 0")):
        with pytest.raises(ConfigError, match=match):
            settings(**bad)
    with pytest.raises(SiteError, match="out of range"):
        candidate_pool(pipe.transformer, ["L0H9"])
    scorer = HeadHunt(pipe, settings(), None, objective=brightness)  # scoring only, no search folder
    assert len(scorer.score_sets([[]])[0]) == 4
    with pytest.raises(ConfigError, match="needs an output folder"):
        scorer.run()
    with pytest.raises(ConfigError, match="not an attnctl pipeline"):
        from attnctl.testing import tiny_sd3_pipeline

        HeadHunt(tiny_sd3_pipeline("sd3"), settings(), tmp_path / "s", objective=brightness)
    # a preset searched on another model: refused by its family, and by its site names
    state = HeadHunt(pipes["flux"], settings(rounds=1, candidates=["kind:flux_single"]), tmp_path / "f",
                     objective=brightness).run()
    assert state.selected[0].startswith("single_transformer_blocks")
    with pytest.raises(SiteError, match="made for a flux model and this is a sd3 model"):
        attnctl.Controller(pipe, [attnctl.SoftPAG(heads=str(tmp_path / "f" / "heads.json"))])
    data = json.loads((tmp_path / "f" / "heads.json").read_text())
    data["model"] = {"family": "sd3"}  # the family only, no size on record: the site names are checked
    (tmp_path / "f" / "heads.json").write_text(json.dumps(data))
    with pytest.raises(SiteError, match="single_transformer_blocks"):
        attnctl.Controller(pipe, [attnctl.SoftPAG(heads=str(tmp_path / "f" / "heads.json"))])
    assert REFERENCE not in state.rounds[0].scores


def test_a_toy_objective_on_a_model_that_is_not_a_toy_is_refused(pipes, tmp_path, monkeypatch):
    """The built-in objectives read the shapes world: on a real model the search chased meaningless scores."""
    import attnctl.cli

    monkeypatch.setattr(attnctl.cli, "is_toy_pipeline", lambda pipe: False)  # as a real model's tokenizer makes it
    for objective in ("toy_combined", toy_combined):
        with pytest.raises(ConfigError, match="not a toy model") as err:
            HeadHunt(pipes["sd3"], settings(), tmp_path / "real", objective=objective)
        assert "your own objective" in err.value.fix
    HeadHunt(pipes["sd3"], settings(), tmp_path / "real", objective=brightness)  # the user's own: fine


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import attnctl.cli
    from attnctl.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["headhunt", "--out", str(tmp_path / "o"), *args])

    for args, message in (
        (["--prompts", "no-such-file.txt"], "neither a file nor a built-in prompt set"),
        (["--prompts", "pair", "--objective", "pickscore"], "unknown objective 'pickscore'"),
        (["--prompts", "pair", "--u", "1.5", "--limit", "1", "--candidates", "L0H0"], "u: Input should be less"),
        (["--prompts", "pair", "--w", "nan", "--limit", "1", "--candidates", "L0H0"], "w must be a finite number"),
        (["--prompts", "pair", "--limit", "1", "--candidates", "L0H7"], "out of range"),
    ):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)

    # a built-in (toy) objective and prompts it cannot read: refused before the model loads (on a real model that
    # was after loading its weights and generating a first batch)
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(attnctl.cli, "load_pipeline", no_model)  # (headhunt imports it from there when it runs)
    (tmp_path / "real.txt").write_text("a photo of a cat\n")
    res = run("--prompts", str(tmp_path / "real.txt"), "--candidates", "L0H0")
    assert res.exit_code == 2, res.output
    assert "the toy-world objectives cannot read the prompt 'a photo of a cat'" in " ".join(res.output.split())
    # u = 0 or w = 0: no candidate changes any image; the search "selected" a head that does nothing
    for args, message in ((["--u", "0"], "u = 0 perturbs no attention map"), (["--w", "0"], "w = 0 gives the")):
        res = run("--prompts", "pair", "--limit", "1", "--candidates", "L0H0", *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
    monkeypatch.undo()

    # after the model loads, before any image: a size the model cannot take, a guidance the model ignores, words a
    # toy's tokenizer does not know (these ran, crashed deep in diffusers, or searched silently)
    (tmp_path / "obj.py").write_text("def score(images, prompts):\n    return [1.0] * len(images)\n")
    own = ["--objective", f"{tmp_path / 'obj.py'}:score", "--candidates", "L0H0", "--seeds", "1"]
    for args, message in (
        (["--prompts", "pair", "--limit", "1", "--height", "18", *own], "--height 18 is not a multiple of"),
        (["--model", "toy-flux", "--prompts", "pair", "--limit", "1", "--guidance", "7", *own],
         "--guidance does nothing on this FLUX model"),
        (["--prompts", str(tmp_path / "real.txt"), *own], "'photo'"),
    ):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)


def test_a_search_records_its_dtype_and_refuses_resuming_in_another(pipes, tmp_path):
    """A search started in fp32 and extended in bf16 compared bf16 scores with fp32 ones, without a word."""
    state = HeadHunt(pipes["sd3"], settings(rounds=1), tmp_path / "s", objective=brightness).run()
    assert state.rounds
    with pytest.raises(ConfigError, match="settings say dtype 'bf16' and the pipeline runs fp32"):
        HeadHunt(pipes["sd3"], settings(rounds=2, dtype="bf16"), tmp_path / "s", objective=brightness)
    assert settings(dtype="fp32").digest() == settings().digest()  # searches saved before the field resume
    assert settings(dtype="bf16").digest() != settings().digest()


@pytest.mark.parametrize("model", ["toy-sd3", "toy-flux"])
def test_shipped_presets_load_on_their_toy_model_only(model):
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline(model)
    pag = attnctl.SoftPAG(heads=f"{model}-headhunter.json")  # found in attnctl/presets/
    attnctl.Controller(pipe, [pag]).restore()
    data = json.loads((attnctl.controls.softpag.PRESETS_DIR / f"{model}-headhunter.json").read_text())
    assert data["search"]["model"] == model and data["search"]["finished"]
    assert sorted(f"{s.name}/H{h}" for s in pag.sites for h in pag.heads_at(s)) == sorted(
        f"{site}/H{h}" for site, hs in data["heads"].items() for h in hs)
    other = "toy-flux" if model == "toy-sd3" else "toy-sd3"
    with pytest.raises(SiteError, match=f"made for a {'flux' if model == 'toy-sd3' else 'sd3'} model"):
        attnctl.Controller(pipe, [attnctl.SoftPAG(heads=f"{other}-headhunter.json")])


def test_a_rank_that_starts_late_still_gets_its_share(tmp_path):
    """Two ranks (threads with their own pipeline, barriers shared): rank 1 starts only after rank 0 has logged
    its first chunk, or after 5 s if rank 0 waits for it. Both ranks must split the same candidates, so every
    candidate is scored exactly once and the result equals one process's."""
    import threading

    from attnctl.pipelines import AttnCtlSD3Pipeline
    from attnctl.testing import tiny_sd3_pipeline

    barrier = threading.Barrier(2, timeout=120)

    class ThreadRank:
        def __init__(self, rank: int):
            self.rank, self.world, self.device = rank, 2, "cpu"

        def barrier(self) -> None:
            barrier.wait()

    def pipe():
        p = AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3").components)
        p.set_progress_bar_config(disable=True)
        return p

    s = settings(rounds=1, batch_images=2)  # one candidate per call: several chunks per rank
    alone = HeadHunt(pipe(), s, tmp_path / "one", objective=brightness).run()
    out, logged, results, errors = tmp_path / "two", threading.Event(), {}, []

    def rank0_objective(images, prompts):
        scores = brightness(images, prompts)
        threading.Timer(0.05, logged.set).start()  # shortly after this chunk is appended to the log
        return scores

    def run(rank: int) -> None:
        try:
            if rank == 1:
                logged.wait(timeout=5)
            hunt = HeadHunt(pipe(), s, out, objective=rank0_objective if rank == 0 else brightness,
                            dist=ThreadRank(rank))
            results[rank] = hunt.run()
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results[0].selected == results[1].selected == alone.selected
    assert [r.scores for r in results[0].rounds] == [r.scores for r in alone.rounds]
    keys = [(json.loads(x)["candidate"], json.loads(x)["prompt"]) for f in sorted(out.glob("scores-r*.jsonl"))
            for x in f.read_text().splitlines()]  # a record per candidate and prompt
    assert sorted(keys) == sorted(set(keys)) and len(keys) == (len(alone.rounds[0].scores) + 1) * len(s.prompts)


def test_prompt_files_are_read_by_their_suffix_in_any_case_and_must_be_utf8(tmp_path):
    """P.JSON was read as lines of text (eval reads it as JSON); a file that is not UTF-8 was a traceback."""
    from attnctl.headhunt import read_prompts

    upper = tmp_path / "P.JSON"
    upper.write_text(json.dumps(["a red circle", {"prompt": "a blue square"}]))
    assert read_prompts(str(upper)) == ["a red circle", "a blue square"]
    for name in ("bin.json", "bin.txt"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
        with pytest.raises(ConfigError, match="is not a UTF-8 (JSON )?text file"):
            read_prompts(str(tmp_path / name))
