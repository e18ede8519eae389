"""HeadHunter: a greedy search for the attention heads whose perturbation guides best.

Starting from an empty set ``S``, each round scores every remaining candidate head ``h`` by generating the
M prompt–seed pairs with SoftPAG on ``S ∪ {h}`` (guidance weight ``w``, strength ``u``) and averaging an
objective over the images; the ``top_k`` best join ``S``. After ``rounds`` rounds ``S`` is the result, saved
as a head-set preset that ``SoftPAG(heads="heads.json")`` loads. Paper settings and credits:
``docs/softpag.md``.

How it runs:

- **Noise per pair.** By default (``noise="per_prompt"``) pair (prompt ``i``, seed ``s``) starts from generator
  seed ``s + 1000003·i``, so the M pairs see M different initial noises. With ``noise="shared"`` (how searches
  ran before this setting existed) every prompt reuses seeds ``0 … S−1``: on small models, where the noise
  decides much of the layout, the M pairs then behave like about S samples, and a head that suits those few
  noises wins the search.
- **Finalists.** With noisy objectives the best of many candidates is mostly the luckiest. ``finalists = F``
  re-scores the round's F best candidates and the current set on ``finalist_seeds`` more seeds and chooses
  on the mean over all their pairs (a one-step successive halving): the cost of F more candidates on the
  extra seeds buys a choice made on many more pairs.
- **Batched.** ``B`` candidates share one pipeline call: one prompt, ``num_images_per_prompt = B·seeds``,
  image ``r`` guided by candidate ``r mod B`` with seed ``seeds[r // B]`` (SoftPAG ``branch=`` rows, see
  :mod:`attnctl.guidance`). The round's reference, the current set ``S`` alone (no guidance while ``S`` is
  empty), is scored once per round, as a chunk of its own before the candidates' chunks.
- **Resumable.** The scores of every finished call — one record per candidate and prompt, the prompt's per-seed
  scores — are appended to ``scores-r<rank>.jsonl`` in the output folder and synced, so a killed search loses at
  most the call in flight; the state (``state.json``: settings, rounds, per-candidate scores, the selected heads)
  is rewritten atomically after every round. Re-running the same command continues where it stopped, scoring only
  the (candidate, prompt) calls the logs lack; changed settings are refused. One search writes to a folder at a
  time (:func:`search_lock`).
- **Split across processes.** ``--processes N``, ``accelerate launch`` or ``torchrun``: the candidate chunks
  (fixed by the settings, not by the number of processes) go round-robin to the ranks, which meet at the end
  of each round and read each other's scores, so N processes choose exactly what one process would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .distributed import Dist
from .errors import AttnCtlError, ConfigError
from .io import atomic_write_text
from .objectives import BUILTIN, Objective, check_prompts, load_objective, score_images

STATE_NAME = "state.json"
PRESET_NAME = "heads.json"
PROMPT_SEED_STRIDE = 1_000_003
"""With ``noise="per_prompt"``, prompt i's seed s becomes generator seed ``s + PROMPT_SEED_STRIDE·i``."""


NOISE_KINDS = ("per_prompt", "shared")
"""How prompt–seed pairs get their initial noise: each its own, or every prompt the same seeds 0..S−1."""


def pair_seed(prompt_index: int, seed: int, noise: str = "per_prompt") -> int:
    """The generator seed of pair (prompt ``prompt_index``, ``seed``): its own per prompt, or ``seed`` when
    every prompt shares the seeds (``noise="shared"``)."""
    return seed + PROMPT_SEED_STRIDE * prompt_index if noise == "per_prompt" else seed


REFERENCE = "(current set)"
"""The pseudo-candidate that scores the current set alone (no guidance in the first round)."""
STATE_VERSION = 1


INERT = {
    "u": ("u = 0 perturbs no attention map, so every candidate scores exactly the reference and the search would "
          "'select' heads that do nothing", "use u > 0 (--u 1 is full PAG)"),
    "w": ("w = 0 gives the perturbation no weight, so every candidate scores exactly the reference and the search "
          "would 'select' heads that do nothing", "use w != 0 (e.g. --w 3)"),
}
"""Why a search with u = 0 or w = 0 is refused, and the way out (the settings' validation; the CLI checks before
any model loads)."""


RESUMABLE = {"rounds", "batch_images"}
"""Settings a search may resume with changed (:meth:`HeadHuntSettings.digest` leaves them out)."""


class HeadHuntSettings(BaseModel):
    """Everything that decides a search's result; recorded in the state and checked on resume."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="model name or folder (recorded; the pipeline is passed separately)")
    prompts: list[str] = Field(..., min_length=1, description="the search prompts")
    seeds: list[int] = Field([0, 1], min_length=1, description="seeds per prompt: M = prompts × seeds pairs")
    noise: Literal["per_prompt", "shared"] = Field(
        "per_prompt", description="per_prompt: pair (prompt i, seed s) uses generator seed s + 1000003·i; "
                                  "shared: every prompt uses the seeds themselves")
    candidates: list[str] = Field(["all"], min_length=1, description="site/head selectors of the candidate pool")
    objective: str = Field("toy_combined", description="built-in name or 'module:function'")
    rounds: int = Field(1, ge=1, description="R: greedy rounds")
    top_k: int = Field(1, ge=1, description="k: heads added per round")
    u: float = Field(1.0, ge=0.0, le=1.0, description="SoftPAG strength during the search")
    w: float = Field(3.0, description="guidance weight during the search")
    target: Literal["identity", "uniform", "mean_query"] = "identity"
    scope: Literal["joint", "image"] = "joint"
    require_gain: bool = Field(False, description="add only candidates that beat the current set; stop when none")
    finalists: int = Field(0, ge=0, description="F: re-score the round's F best (and the current set) on "
                                                "finalist_seeds before choosing; 0 = choose on the first scores")
    finalist_seeds: list[int] = Field([], description="the finalists' extra seeds (distinct from seeds)")
    steps: int = Field(..., ge=1)
    guidance: float = Field(..., description="the pipeline's guidance_scale (CFG for SD3)")
    height: int = Field(..., ge=16)
    width: int = Field(..., ge=16)
    max_sequence_length: int = Field(..., ge=1)
    batch_images: int = Field(32, ge=1, description="images per pipeline call (candidates per call × seeds)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="the pipeline's dtype (scores differ by dtype)")

    @field_validator("w")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"w must be a finite number, not {v}")
        if v == 0:
            raise ValueError("; ".join(INERT["w"]))
        return v

    @field_validator("u")
    @classmethod
    def _acts(cls, v: float) -> float:
        if v == 0:
            raise ValueError("; ".join(INERT["u"]))
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("prompts")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("prompts must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _finalists(self) -> HeadHuntSettings:
        if self.finalists and not self.finalist_seeds:
            raise ValueError("finalists need finalist_seeds (the extra seeds they are re-scored on)")
        if self.finalist_seeds and not self.finalists:
            raise ValueError("finalist_seeds are only used with finalists > 0")
        if self.finalists and self.finalists < self.top_k:
            raise ValueError(f"finalists ({self.finalists}) must be at least top_k ({self.top_k})")
        if len(set(self.finalist_seeds)) != len(self.finalist_seeds) or set(self.finalist_seeds) & set(self.seeds):
            raise ValueError("finalist_seeds must be distinct and not among seeds")
        return self

    def digest(self) -> str:
        """Hash of the settings that decide each round's scores (``rounds`` is left out: a finished search
        can be extended by more rounds; ``batch_images`` too: how many images share a call changes no score, so a
        search that ran out of memory resumes with fewer)."""
        data = self.model_dump(exclude=RESUMABLE)
        if not self.finalists:  # searches saved before finalists existed keep their digest
            del data["finalists"], data["finalist_seeds"]
        if self.noise == "shared":  # ... and so do those saved before the noise setting
            del data["noise"]
        if self.dtype == "fp32":  # ... and those saved before the dtype was recorded (which ran in fp32 by default)
            del data["dtype"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def candidates_per_call(self, seeds: Sequence[int] | None = None) -> int:
        return max(1, self.batch_images // len(seeds or self.seeds))


def make_settings(**kwargs: Any) -> HeadHuntSettings:
    """:class:`HeadHuntSettings` with pydantic's complaints turned into one clear error."""
    try:
        return HeadHuntSettings(**kwargs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                             .removeprefix(": ") for err in e.errors())
        raise ConfigError(f"bad head-search settings: {problems}", fix="see `attnctl headhunt --help`") from None


# ------------------------------------------------------------------------------------------------ state


@dataclass
class Round:
    index: int
    selected_before: list[str]
    reference: float
    scores: dict[str, float]
    chosen: list[str]
    seconds: float = 0.0
    final: dict[str, float] = field(default_factory=dict)
    """The finalists' (and the current set's) means over the search and the finalist seeds."""

    def to_json(self) -> dict[str, Any]:
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1])
        out = {"round": self.index, "selected_before": self.selected_before, "reference": self.reference,
               "chosen": self.chosen, "seconds": round(self.seconds, 2), "scores": dict(ranked)}
        if self.final:
            out["final"] = dict(sorted(self.final.items(), key=lambda kv: -kv[1]))
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Round:
        return cls(int(d["round"]), list(d["selected_before"]), float(d["reference"]),
                   {str(k): float(v) for k, v in d["scores"].items()}, list(d["chosen"]), float(d.get("seconds", 0)),
                   {str(k): float(v) for k, v in d.get("final", {}).items()})


@dataclass
class HeadHuntState:
    settings: HeadHuntSettings
    rounds: list[Round] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    finished: bool = False
    stop_reason: str | None = None
    pool: list[str] = field(default_factory=list)
    scored_with: list[str] = field(default_factory=list)
    """The objectives the search was scored with, in order (a callable's ``module:qualname``; the settings'
    ``objective`` names the objective in the digest, and a callable given to :class:`HeadHunt` is taken to be it)."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "attnctl.headhunt", "version": STATE_VERSION, "settings_hash": self.settings.digest(),
                "settings": self.settings.model_dump(), "pool_size": len(self.pool), "selected": self.selected,
                "finished": self.finished, "stop_reason": self.stop_reason, "scored_with": self.scored_with,
                "rounds": [r.to_json() for r in self.rounds]}

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


def saved_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The settings of a saved state as a dict; states written before the noise setting shared their seeds."""
    return {"noise": "shared", **state["settings"]}


def load_state(path: Path, settings: HeadHuntSettings) -> HeadHuntState:
    """The saved state when it was written with these settings; a fresh one when there is none."""
    if not path.exists():
        return HeadHuntState(settings)
    try:
        data = json.loads(path.read_text())
        saved = HeadHuntSettings(**saved_settings(data))
        rounds = [Round.from_json(r) for r in data["rounds"]]
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as e:
        raise AttnCtlError(f"{path} is not a head-search state ({type(e).__name__}: {str(e)[:200]})",
                           "point --out at a new folder, or delete the broken state.json to start over") from None
    if saved.digest() != settings.digest():
        old, new = saved.model_dump(exclude=RESUMABLE), settings.model_dump(exclude=RESUMABLE)
        changed = [k for k in new if old.get(k) != new[k]]
        raise AttnCtlError(f"{path} was written by a search with other settings (changed: {', '.join(changed)})",
                           "re-run with the same settings to resume, or use a new --out folder")
    complete = [r for r in rounds if r.chosen]  # a round that chose nothing ended the search; it adds no heads
    if len(complete) > settings.rounds:
        raise AttnCtlError(f"{path} holds a search of {len(complete)} rounds, more than the {settings.rounds} asked "
                           f"for; its heads are those {len(complete)} rounds' (a search is extended, never cut back)",
                           f"re-run with --rounds {len(complete)} (or more) to use it, or use a new --out folder for a "
                           f"{settings.rounds}-round search")
    state = HeadHuntState(settings, rounds, list(data.get("selected", [])), bool(data.get("finished")),
                          data.get("stop_reason"), scored_with=[str(x) for x in data.get("scored_with", [])])
    return state


class ScoreLog:
    """Append-only JSON lines of finished pipeline calls, one file per rank: a record per (candidate, prompt)
    holds that prompt's per-seed scores, appended and synced as soon as its call finishes, so a killed run loses
    at most the call in flight (a half-written last line is ignored). Records written before per-prompt logging
    (no ``"prompt"``: a whole candidate's scores) still count."""

    def __init__(self, folder: Path, rank: int):
        self.folder = folder
        self.path = folder / f"scores-r{rank}.jsonl"

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a killed run may have left half a line: never glue a record onto it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def parts(self, key: str) -> dict[str, dict[int, list[float]]]:
        """Every logged score of the stage ``key``: candidate → prompt index → that prompt's per-seed scores
        (a whole candidate's scores from a log of the older format under :data:`WHOLE`)."""
        out: dict[str, dict[int, list[float]]] = {}
        for path in sorted(self.folder.glob("scores-r*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the half-written last line of a killed run
                if isinstance(rec, dict) and rec.get("key") == key:
                    prompt = int(rec["prompt"]) if "prompt" in rec else WHOLE
                    out.setdefault(str(rec["candidate"]), {})[prompt] = [float(x) for x in rec["scores"]]
        return out

    def read(self, key: str, prompts: int) -> dict[str, list[float]]:
        """The per-pair scores (prompt-major, then seed) of every candidate of the stage ``key`` whose
        ``prompts`` prompts are all logged; candidates with only some of them are left out."""
        return complete(self.parts(key), prompts)


WHOLE = -1
"""The prompt index under which :meth:`ScoreLog.parts` files a record of a whole candidate (the format before
per-prompt records)."""


def complete(parts: dict[str, dict[int, list[float]]], prompts: int) -> dict[str, list[float]]:
    """The candidates of ``parts`` whose every prompt is scored, with their scores in prompt order."""
    out: dict[str, list[float]] = {}
    for candidate, by_prompt in parts.items():
        if WHOLE in by_prompt:
            out[candidate] = by_prompt[WHOLE]
        elif all(i in by_prompt for i in range(prompts)):
            out[candidate] = [x for i in range(prompts) for x in by_prompt[i]]
    return out


def round_key(settings: HeadHuntSettings, index: int, selected: Sequence[str]) -> str:
    text = json.dumps([settings.digest(), index, sorted(selected)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def search_lock(out: Path) -> Iterator[None]:
    """One writer per output folder at a time: the advisory lock ``attnctl batch`` takes (so a search also refuses
    a folder a batch is writing, and the other way round); released when the process dies. Without it two searches
    started on one folder both ran to the end and the folder kept whichever finished last."""
    from .batch import _folder_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_folder_lock(out))
        except AttnCtlError:
            raise AttnCtlError(f"another attnctl head search (or batch) is writing to {out}",
                               "wait for it to finish, or use another --out folder") from None
        yield


# ------------------------------------------------------------------------------------------------ candidates


def candidate_pool(transformer: Any, selectors: Sequence[str]) -> list[str]:
    """Candidate heads as ``"<site>/H<h>"`` in the model's site order (each a valid head selector)."""
    from .sites import HeadSet, list_sites

    sites = list_sites(transformer)
    heads = HeadSet.parse(sites, list(selectors)).resolve(sites)
    return [f"{site.name}/H{h}" for site in sorted(heads, key=lambda s: s.index) for h in heads[site]]


def _pairs(names: Sequence[str]) -> list[tuple[str, int]]:
    out = []
    for n in names:
        site, h = n.rsplit("/H", 1)
        out.append((site, int(h)))
    return out


def head_set_of(names: Sequence[str], transformer: Any) -> Any:
    """The :class:`~attnctl.sites.HeadSet` of candidate names, stamped with the model's fingerprint."""
    from .sites import HeadSet, list_sites, model_fingerprint

    return HeadSet.from_pairs(_pairs(names), model_fingerprint(list_sites(transformer)))


# ------------------------------------------------------------------------------------------------ the search


class HeadHunt:
    """One search: ``HeadHunt(pipe, settings, out).run()``; the pipeline must be an attnctl pipeline
    (``AttnCtlSD3Pipeline`` / ``AttnCtlFluxPipeline``, e.g. from :func:`attnctl.cli.load_pipeline`)."""

    def __init__(self, pipe: Any, settings: HeadHuntSettings, out: str | Path | None, *,
                 objective: Objective | str | None = None, dist: Dist | None = None,
                 note: Callable[[str], None] | None = None, progress: Callable[[int, int], None] | None = None):
        if not hasattr(pipe, "controlled_call"):
            raise ConfigError(f"{type(pipe).__name__} is not an attnctl pipeline",
                              fix="load it with attnctl.cli.load_pipeline or wrap it: "
                                  "AttnCtlSD3Pipeline(**pipe.components)")
        from .cli import DTYPE_NAMES

        runs = DTYPE_NAMES.get(str(pipe.transformer.dtype)[6:], str(pipe.transformer.dtype))
        if runs != settings.dtype:
            raise ConfigError(f"the search settings say dtype {settings.dtype!r} and the pipeline runs {runs}; scores "
                              "differ by dtype, so a search records it", fix=f"make the settings with dtype={runs!r}")
        self.pipe = pipe
        self.settings = settings
        self.out = Path(out) if out is not None else None  # None: only score_sets, no search state
        self.objective, self.objective_name = load_objective(objective if objective is not None
                                                             else settings.objective)
        if self.objective in BUILTIN.values():
            from .cli import is_toy_pipeline

            if not is_toy_pipeline(pipe):
                raise ConfigError(
                    f"the objective {self.objective_name!r} scores images with the shapes world's detector, and this "
                    "model is not a toy model (its tokenizer is not the shapes world's): the search would chase "
                    "scores that mean nothing", fix="pass your own objective ('module:function' or a callable "
                                                    "f(images, prompts) -> scores, e.g. an aesthetic or "
                                                    "prompt-alignment scorer)")
        self.dist = dist or Dist("cpu", what="head search")
        self.note = note or (lambda message: None)
        self.progress = progress
        self.pool = candidate_pool(pipe.transformer, settings.candidates)
        if not self.pool:
            raise ConfigError("the candidate selection holds no heads", fix="use --candidates all or a site selector")
        self.log = ScoreLog(self.out, self.dist.rank) if self.out is not None else None

    @property
    def state_path(self) -> Path:
        return self.out / STATE_NAME

    @property
    def preset_path(self) -> Path:
        return self.out / PRESET_NAME

    # -- generation ---------------------------------------------------------------------------------
    def _call(self, index: int, n_branches: int, controls: list | None, seeds: Sequence[int]) -> list[Any]:
        import torch

        s = self.settings
        prompt = s.prompts[index]
        gens = [torch.Generator("cpu").manual_seed(pair_seed(index, seed, s.noise)) for seed in seeds
                for _ in range(n_branches)]
        out = self.pipe(prompt=prompt, num_images_per_prompt=len(gens), generator=gens,
                        num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height, width=s.width,
                        max_sequence_length=s.max_sequence_length, output_type="pil", controls=controls)
        return list(out.images)

    def _softpag(self, heads: Sequence[str], branch: int | None = None) -> Any:
        from .controls.softpag import SoftPAG

        s = self.settings
        return SoftPAG.from_pairs(_pairs(heads), u=s.u, target=s.target, scope=s.scope, scale=s.w, branch=branch)

    def score_sets(self, sets: Sequence[Sequence[str] | None], seeds: Sequence[int] | None = None
                   ) -> list[list[float]]:
        """Per-pair scores (prompt-major, then seed) of each head set, all in shared calls; ``None`` or an
        empty set means no perturbation guidance. ``seeds`` defaults to the settings' search seeds."""
        seeds = list(seeds or self.settings.seeds)
        scores: list[list[float]] = [[] for _ in sets]
        for index in range(len(self.settings.prompts)):
            for i, values in enumerate(self.score_prompt(index, sets, seeds)):
                scores[i].extend(values)
        return scores

    def score_prompt(self, index: int, sets: Sequence[Sequence[str] | None], seeds: Sequence[int]
                     ) -> list[list[float]]:
        """Per-seed scores of each head set on prompt ``index`` alone (one call for the guided sets, one for the
        unguided ones): the unit a search logs, so a killed run loses at most the call in flight."""
        prompt = self.settings.prompts[index]
        guided = [i for i, h in enumerate(sets) if h]
        scores: list[list[float]] = [[] for _ in sets]
        if len(guided) < len(sets):  # the unguided images, once
            images = self._call(index, 1, None, seeds)
            values = score_images(self.objective, self.objective_name, images, [prompt] * len(images))
            for i, h in enumerate(sets):
                if not h:
                    scores[i] = list(values)
        if guided:
            controls = [self._softpag(sets[i], branch=j) for j, i in enumerate(guided)]
            images = self._call(index, len(guided), controls, seeds)
            values = score_images(self.objective, self.objective_name, images, [prompt] * len(images))
            for j, i in enumerate(guided):  # image r: branch r mod B, seed r // B
                scores[i] = list(values[j::len(guided)])
        return scores

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> HeadHuntState:
        if self.out is None or self.log is None:
            raise ConfigError("HeadHunt.run needs an output folder for its state", fix="pass out='out/headhunt'")
        self.out.mkdir(parents=True, exist_ok=True)
        with search_lock(self.out) if self.dist.rank == 0 else contextlib.nullcontext():
            return self._run()

    def _run(self) -> HeadHuntState:
        state = load_state(self.state_path, self.settings)
        state.pool = self.pool
        if state.scored_with and state.scored_with[-1] != self.objective_name:
            self.note(f"this search was scored with the objective {state.scored_with[-1]} and goes on with "
                      f"{self.objective_name}; its rounds compare scores of both (give settings.objective a new name, "
                      "or a new out folder, for a search of another objective)")
        if not state.scored_with or state.scored_with[-1] != self.objective_name:
            state.scored_with.append(self.objective_name)
        unknown = [h for h in state.selected if h not in self.pool]
        if unknown:
            raise AttnCtlError(f"the saved state selects heads this model does not have ({unknown[:3]})",
                               "resume with the model the search started on, or use a new --out folder")
        s = self.settings
        state.finished = False
        while True:
            index = len(state.rounds)
            remaining = [h for h in self.pool if h not in state.selected]
            if state.rounds and not state.rounds[-1].chosen:
                state.finished, state.stop_reason = True, f"round {index}: no candidate beats the current set"
            elif index >= s.rounds:
                state.finished, state.stop_reason = True, f"{s.rounds} rounds done"
            elif not remaining:
                state.finished, state.stop_reason = True, "every candidate is selected"
            if state.finished:
                break
            start = time.perf_counter()
            key = round_key(s, index, state.selected)
            done = self._stage(key, index, state.selected, [REFERENCE, *remaining], s.seeds, f"round {index + 1}")
            means = {c: sum(v) / len(v) for c, v in done.items()}
            ranked = sorted(remaining, key=lambda c: (-means[c], self.pool.index(c)))
            first, final = dict(means), {}
            if s.finalists:  # re-score the best F and the current set on more seeds; choose on all their pairs
                finalists = ranked[: s.finalists]
                more = self._stage(f"{key}/final", index, state.selected, [REFERENCE, *finalists],
                                   s.finalist_seeds, f"round {index + 1} finalists")
                final = {c: sum(done[c] + more[c]) / len(done[c] + more[c]) for c in [REFERENCE, *finalists]}
                means.update(final)
                ranked = sorted(finalists, key=lambda c: (-means[c], self.pool.index(c)))
            reference = means[REFERENCE]
            chosen = ranked[: s.top_k]
            if s.require_gain:
                chosen = [c for c in chosen if means[c] > reference]
            state.rounds.append(Round(index, list(state.selected), reference, {c: first[c] for c in remaining},
                                      chosen, time.perf_counter() - start, final))
            state.selected = [*state.selected, *chosen]
            self._save(state)
            gain = (means[chosen[0]] - reference) if chosen else 0.0
            self.note(f"round {index + 1}/{s.rounds}: reference {reference:.4f}; added "
                      f"{', '.join(chosen) or 'nothing'}" + (f" (best {means[chosen[0]]:.4f}, {gain:+.4f})"
                                                               if chosen else ""))
            ties = [c for c in chosen if means[c] == reference]
            if ties:  # (only without require_gain, which never adds a tie)
                self.note(f"round {index + 1}: {', '.join(ties)} scored exactly the reference ({reference:.4f}): "
                          "the heads changed no score, so adding them guides nothing the objective sees (use "
                          "--require-gain to add only heads that beat the reference, or check --u, --w and the "
                          "objective)")
            self.dist.barrier()
        self._save(state)
        return state

    def _stage(self, key: str, index: int, selected: list[str], candidates: list[str], seeds: Sequence[int],
               label: str) -> dict[str, list[float]]:
        """Score ``selected + [c]`` for every candidate c (the current set for REFERENCE) on ``seeds``: this
        rank's share of the chunks not yet in the logs (within a chunk, only the prompts not yet logged for its
        candidates), then wait for the others and read every score."""
        n_prompts = len(self.settings.prompts)
        parts = self.log.parts(key)
        done = complete(parts, n_prompts)
        # Every rank reads the logs before any rank writes this stage's scores: all ranks then see the same
        # ``done``, so they split the same ``todo`` the same way. (Without it, a rank that starts late, e.g. still
        # loading the model, would see another rank's first chunks, split a shorter list, and leave candidates
        # to nobody.)
        self.dist.barrier()
        todo = [c for c in candidates if c not in done]
        if parts:
            partly = sum(1 for c in todo if c in parts)
            self.note(f"{label}: {len(candidates) - len(todo)} candidates already scored"
                      + (f", {partly} on some prompts" if partly else "") + f", {len(todo)} to go")
        chunks = self._chunks(todo, self.settings.candidates_per_call(seeds))
        mine = [c for i, c in enumerate(chunks) if i % self.dist.world == self.dist.rank]
        total = sum(len(c) for c in mine)
        finished = 0
        if self.progress is not None:
            self.progress(0, total)
        for chunk in mine:
            for prompt in range(n_prompts):  # each call's scores are logged as soon as it finishes
                need = [c for c in chunk if prompt not in parts.get(c, {})]
                if not need:  # logged by a run that was killed within this chunk
                    continue
                sets = [selected if c == REFERENCE else [*selected, c] for c in need]
                per_seed = self.score_prompt(prompt, sets, seeds)
                self.log.append([{"key": key, "round": index, "candidate": c, "prompt": prompt, "scores": v}
                                 for c, v in zip(need, per_seed, strict=True)])
            finished += len(chunk)
            if self.progress is not None:
                self.progress(finished, total)
        self.dist.barrier()
        done = self.log.read(key, n_prompts)
        missing = [c for c in candidates if c not in done]
        if missing:
            raise AttnCtlError(f"{label}: {len(missing)} candidates have no score after every process finished",
                               "re-run the same command to score them")
        return {c: done[c] for c in candidates}

    def _save(self, state: HeadHuntState) -> None:
        """Rank 0 writes the state and the preset of the heads selected so far (both atomically)."""
        if self.dist.rank != 0:
            return
        state.save(self.state_path)
        if state.selected:
            preset = head_set_of(state.selected, self.pipe.transformer).to_json()
            st = self.settings
            preset["search"] = {  # provenance; HeadSet.load reads only "heads" and "model"
                "model": st.model, "objective": st.objective, "scored_with": state.scored_with, "u": st.u, "w": st.w,
                "target": st.target,
                "scope": st.scope, "prompts": len(st.prompts), "seeds": len(st.seeds), "top_k": st.top_k,
                "finalists": st.finalists, "finalist_seeds": len(st.finalist_seeds),
                "rounds": [{"reference": r.reference, "chosen": r.chosen,
                            "best": max(r.scores.values()) if r.scores else None} for r in state.rounds],
                "finished": state.finished,
            }
            atomic_write_text(self.preset_path, json.dumps(preset, indent=2) + "\n")

    def _chunks(self, todo: Sequence[str], b: int) -> list[list[str]]:
        """The reference alone, then the candidates ``candidates_per_call`` at a time (the split depends only
        on the settings and what is left, never on the number of processes)."""
        chunks: list[list[str]] = []
        rest = list(todo)
        if rest and rest[0] == REFERENCE:
            chunks.append([REFERENCE])
            rest = rest[1:]
        chunks += [rest[i:i + b] for i in range(0, len(rest), b)]
        return chunks


# ------------------------------------------------------------------------------------------------ prompts


def read_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Search prompts from a built-in toy prompt set name, a ``.txt`` file (one per line) or a ``.json`` file (the
    suffix in any case, as eval reads it) of a JSON list of strings or ``{"prompt": ...}`` items."""
    from .toyworld.world import PROMPT_SETS, prompt_set

    path = Path(spec).expanduser()
    if spec in PROMPT_SETS and not path.exists():
        prompts = [item["prompt"] for item in prompt_set(spec)]
    elif path.is_file():
        is_json = path.suffix.lower() == ".json"  # P.JSON too, as attnctl eval reads it
        text = _read_text(path, "JSON text" if is_json else "text")
        if is_json:
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}", fix="write a JSON list of prompts") from None
            if isinstance(data, dict):
                data = data.get("items", data.get("prompts"))
            if not isinstance(data, list):
                raise ConfigError(f"{path} must hold a JSON list of prompts", fix='["a red circle", ...]')
            prompts = [d.get("prompt") if isinstance(d, dict) else d for d in data]
            if not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ConfigError(f"{path}: every entry must be a prompt string or an object with 'prompt'",
                                  fix='["a red circle", {"prompt": "a blue square"}]')
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise ConfigError(f"--prompts {spec!r} is neither a file nor a built-in prompt set",
                          fix=f"pass a .txt/.json file of prompts or one of {', '.join(PROMPT_SETS)}")
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ConfigError(f"--prompts {spec!r} holds no prompts", fix="give at least one prompt")
    return prompts


def _read_text(path: Path, kind: str) -> str:
    """A prompts file's text; one that is not UTF-8 (an image under a .json name) is a clear error, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a UTF-8 {kind} file (byte {e.start} is not UTF-8)",
                          fix="give a .txt file of prompts, one per line, or a .json list of prompts, saved as UTF-8 "
                              "text") from None


# ------------------------------------------------------------------------------------------------ command


def main(*, model: str, out: Path, prompts: str, limit: int | None, seeds: int, candidates: list[str],
         objective: str, rounds: int, top_k: int, u: float, w: float, target: str, scope: str, require_gain: bool,
         finalists: int, finalist_seeds: int, noise: str,
         steps: int | None, guidance: float | None, height: int | None, width: int | None, batch_images: int,
         processes: int, threads: int | None,
         device: str, dtype: str, attention_backend: str | None, debug: bool = False) -> int:
    """``attnctl headhunt``: returns the exit code (0 done, 2 bad input, 130 interrupted)."""
    import torch
    from rich.markup import escape

    from .cli import (
        DTYPE_NAMES,
        call_defaults,
        check_device,
        check_guidance_used,
        check_size,
        check_vocabulary,
        err_console,
        load_pipeline,
        out_console,
        parse_dtype,
        resolve_model,
        set_attention_backend,
    )
    from .distributed import launch_workers

    def note(message: str) -> None:
        err_console.print(f"[yellow]{escape(message)}[/yellow]", highlight=False)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and world > 1:
        raise AttnCtlError(f"--processes inside a launcher that already started {world} processes",
                           "drop --processes; the launcher decides")
    prompt_list = read_prompts(prompts, limit)
    load_objective(objective)  # a bad objective: one clear error before any model work
    check_prompts(objective, prompt_list)
    for name, value in (("u", u), ("w", w)):  # (make_settings refuses them too, but only after the model loads)
        if value == 0:
            raise ConfigError(f"bad head-search settings: {name}: {INERT[name][0]}", fix=INERT[name][1])
    if world == 1 and out.is_dir():  # another search writing there: refused before the model loads (rank 0 of
        with search_lock(out):       # the run, or of the workers started below, then holds the lock throughout)
            pass
    if processes > 1:
        resolve_model(model)
        argv = (["--debug"] if debug else []) + [
            "headhunt", "--model", model, "--out", str(out), "--prompts", prompts, "--seeds", str(seeds),
            "--objective", objective, "--rounds", str(rounds), "--top-k", str(top_k), "--u", str(u), "--w", str(w),
            "--target", target, "--scope", scope, "--batch-images", str(batch_images), "--device", device,
            "--dtype", dtype, "--finalists", str(finalists), "--finalist-seeds", str(finalist_seeds),
            "--noise", noise]
        for c in candidates:
            argv += ["--candidates", c]
        for flag, value in (("--limit", limit), ("--steps", steps), ("--guidance", guidance), ("--height", height),
                            ("--width", width), ("--threads", threads), ("--attention-backend", attention_backend)):
            if value is not None:
                argv += [flag, str(value)]
        if require_gain:
            argv.append("--require-gain")
        return launch_workers(argv, processes, threads, note=note)

    dist = Dist(device, what="head search")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_dtype = parse_dtype(dtype)
    dev = dist.device or str(check_device("cpu" if device == "auto" else device))
    pipe = load_pipeline(model, device=dev, dtype=torch_dtype)
    check_size(pipe, height, width)
    check_guidance_used(pipe.transformer, guidance, ("--guidance", None))
    check_vocabulary(pipe, prompt_list, model)
    if attention_backend is not None:
        set_attention_backend(pipe, attention_backend, torch.device(dev), torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    defaults = call_defaults(pipe)
    settings = make_settings(
        model=model, prompts=prompt_list, seeds=list(range(seeds)), candidates=candidates, objective=objective,
        rounds=rounds, top_k=top_k, u=u, w=w, target=target, scope=scope, require_gain=require_gain,
        finalists=finalists, finalist_seeds=list(range(seeds, seeds + finalist_seeds)), noise=noise,
        steps=steps if steps is not None else defaults["steps"],
        guidance=guidance if guidance is not None else defaults["guidance"],
        height=height or defaults["height"], width=width or defaults["width"],
        max_sequence_length=defaults["max_sequence_length"],
        batch_images=batch_images, dtype=DTYPE_NAMES[str(torch_dtype)[6:]])
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("candidates this round"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=dist.rank != 0 or not err_console.is_terminal)
    task = bar.add_task("round", total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    hunt = HeadHunt(pipe, settings, out, dist=dist, note=note if dist.rank == 0 else None, progress=progress)
    if dist.rank == 0:
        out_console.print(f"head search on {escape(model)} ({DTYPE_NAMES[str(torch_dtype)[6:]]}): "
                          f"{len(hunt.pool)} candidates, {len(prompt_list)} prompts × {seeds} seeds, "
                          f"{rounds} round(s) of top {top_k}, u={u}, w={w}"
                          + (f", best {finalists} re-scored on {finalist_seeds} more seeds" if finalists else "")
                          + (f", {dist.world} processes" if dist.world > 1 else ""), highlight=False)
    start = time.perf_counter()
    try:
        with bar:
            state = hunt.run()
    except KeyboardInterrupt:
        note(f"interrupted; finished candidates are kept in {out} — re-run the same command to continue")
        return 130
    if dist.rank == 0:
        where = hunt.preset_path if state.selected else "(nothing selected)"
        out_console.print(f"selected {len(state.selected)} heads: {', '.join(state.selected) or '-'}", highlight=False)
        out_console.print(f"{escape(state.stop_reason or '')}; preset {escape(str(where))}; state "
                          f"{escape(str(hunt.state_path))} ({time.perf_counter() - start:.1f} s)", highlight=False)
    return 0
