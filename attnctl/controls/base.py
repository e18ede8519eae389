"""The control protocol: one small class per method over this base (as diffusers' guiders are).

A control is configured by a pydantic model (``Config``) that saves and loads as JSON. At the start of a
run the controller calls :meth:`Control.begin_run`; at every attention call of a site the control selected,
:meth:`Control.contribute` returns what it adds there and now (see ``attnctl.processors.contributions``):
logit biases and masks, extra keys/values, probes, output mixes. Returning nothing keeps that call on the
stock fused kernel.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, ConfigDict, ValidationError

from ..errors import ConfigError, LayoutError, UnsupportedModelError, WordCutOffError
from ..json_types import ScalarsOfTheirKind
from ..layout import TokenLayout
from ..processors.contributions import index_tensor
from ..sites import Site, select_sites

if TYPE_CHECKING:
    from ..controller import Controller
    from ..processors.base import SiteCall
    from ..processors.contributions import Contribution
    from ..schedules import Schedule

ROLES = ("uncond", "cond", "perturbed", "source", "target")
"""Batch roles a controller knows; references are ``reference[i]``."""

SegmentList = list[Literal["clip", "t5"]] | None
"""A control's ``segments``: the tokenizer segments of the text tokens to find words in (SD3: clip, t5; FLUX: t5)."""


def check_roles(roles: list[str]) -> list[str]:
    """A control's ``roles``: not empty, each a role the controller gives rows (:data:`ROLES`, ``reference``,
    optionally indexed as ``perturbed[0]``) — a misspelt role would match no row and the control would do nothing."""
    if not roles:
        raise ValueError("roles is empty; the control acts on batch rows of these roles (default ['cond'])")
    bad = [r for r in roles if not isinstance(r, str) or r.split("[")[0] not in (*ROLES, "reference")]
    if bad:
        raise ValueError(f"unknown batch roles {bad}; the roles are {', '.join(ROLES)} and reference "
                         "(an index selects one branch or reference: 'perturbed[0]', 'reference[1]')")
    return roles


Roles = Annotated[list[str], AfterValidator(check_roles)]
"""A control's ``roles`` field, checked by :func:`check_roles`."""


def _value(x: Any) -> float | None:
    """A number kept as a tensor, as a float (a shape-only meta tensor has none: ``None``)."""
    if not isinstance(x, torch.Tensor):
        return x
    return float(x.flatten()[0]) if x.numel() and x.device.type != "meta" else None


@dataclass
class RunState:
    """Where the run is: step, schedule position, batch roles and token layout."""

    step: int = 0
    num_steps: int = 1  # the loop's model calls in the run (``step`` counts them too)
    calls_per_step: int = 1  # model calls per denoising step: the scheduler's order (2 for the midpoint step)
    roles: list[str] | None = None
    layout: TokenLayout | None = None
    row_layouts: list[TokenLayout | None] | None = None  # per batch row, when a call has several prompts
    own_prompt_rows_only: bool = False  # layouts of the prompts: uncond rows hold the negative prompt's tokens
    reports: dict[str, float] = field(default_factory=dict)
    gradient_pass: bool = False  # a latent-guidance forward for its loss (only latent-guidance controls act)
    skip_layer_pass: bool = False  # SD3's skip-layer guidance call: the step's conditional rows again, layers skipped
    _indices: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _timestep: Any = field(default=None, repr=False, compare=False)
    _sigma: Any = field(default=None, repr=False, compare=False)

    @property
    def timestep(self) -> float | None:
        """The model's timestep at this call, as the pipeline gives it (SD3: 0–1000; FLUX: 0–1, the sigma). The
        controller keeps the call's tensor and reads its value only here, when a control asks: on a GPU, reading a
        value waits for the device, and nothing in attnctl needs it."""
        self._timestep = _value(self._timestep)
        return self._timestep

    @timestep.setter
    def timestep(self, value: Any) -> None:
        self._timestep = value

    @property
    def sigma(self) -> float | None:
        """The scheduler's sigma at this step (read when asked, as :attr:`timestep`)."""
        self._sigma = _value(self._sigma)
        return self._sigma

    @sigma.setter
    def sigma(self, value: Any) -> None:
        self._sigma = value

    def index(self, values: Sequence[int], device=None) -> torch.Tensor:
        """``values`` as a long tensor on ``device``, made once and then reused. Controls need the same few index
        tensors (rows, columns, heads) at every attention call of a run, and building one from a list is a copy
        from the host that, on a GPU, waits for the device; reused, it costs nothing. The tensor keeps its values on
        the host too (``index_tensor``), so ``attend`` compares selections without reading the device. Treat it as
        read-only."""
        key = (tuple(int(x) for x in values), str(device))
        t = self._indices.get(key)
        if t is None:
            if len(self._indices) >= 256:  # a run uses a handful; a long session must not grow without bound
                self._indices.clear()
            t = self._indices[key] = index_tensor(key[0], device)
        return t

    @property
    def progress(self) -> float:
        """Run progress as schedules see it: 0 at the first denoising step, 1 at the last (:attr:`schedule_step`)."""
        step, steps = self.schedule_step
        return step / max(steps - 1, 1)

    @property
    def schedule_step(self) -> tuple[int, int]:
        """``(step, steps)`` of the denoising loop, as schedules count: the model calls of one step (two under the
        midpoint scheduler, ``calls_per_step``) share its value."""
        per = max(1, self.calls_per_step)
        return self.step // per, max(1, -(-self.num_steps // per))

    def _row_list(self, roles: tuple[str, ...] | list[str], batch: int) -> list[int]:
        if self.roles is None:
            return list(range(batch)) if "cond" in roles else []
        if len(self.roles) != batch:
            raise ConfigError(
                f"the run declares {len(self.roles)} batch roles but the attention call has batch {batch}; "
                "pass roles= matching the transformer's batch (e.g. ['uncond', 'cond'] for CFG)"
            )
        return [i for i, r in enumerate(self.roles) if r in roles or r.split("[")[0] in roles]

    def rows_with(self, roles: tuple[str, ...] | list[str], batch: int, device=None) -> torch.Tensor | None:
        """Batch rows whose role is in ``roles`` (``None`` when every row qualifies)."""
        rows = self._row_list(roles, batch)
        return None if len(rows) == batch else self.index(rows, device)

    def _no_prompt_of_its_own(self, row: int, batch: int) -> LayoutError:
        return LayoutError(
            f"batch row {row} ({(self.roles or ['?'] * batch)[row]}) of this call holds the negative prompt's tokens, "
            "and a control's words are found in the prompt's (word controls act on the conditional rows)",
            fix="keep word controls on roles=['cond'] (and 'perturbed'); to map a negative prompt's words, run it as "
                "the prompt")

    def rows_by_prompt(self, roles: tuple[str, ...] | list[str], batch: int, device=None
                       ) -> list[tuple[TokenLayout | None, torch.Tensor | None, list[int]]]:
        """The rows whose role is in ``roles``, grouped by their prompt: ``[(layout, rows, rows as a list)]``.

        One group — the run's layout and :meth:`rows_with` — when the call has one prompt. With several prompts
        (``row_layouts``), one group per prompt; a selected row of no prompt (``uncond``) is an error."""
        picked = self._row_list(roles, batch)
        if self.row_layouts is None:
            if self.own_prompt_rows_only and self.roles is not None:
                for r in picked:
                    if self.roles[r].split("[")[0] == "uncond":
                        raise self._no_prompt_of_its_own(r, batch)
            return [(self.layout, None if len(picked) == batch else self.index(picked, device), picked)]
        groups: dict[int, tuple[TokenLayout, list[int]]] = {}
        for r in picked:
            lay = self.row_layouts[r]
            if lay is None:
                raise self._no_prompt_of_its_own(r, batch)
            groups.setdefault(id(lay), (lay, []))[1].append(r)
        return [(lay, self.index(rs, device), rs) for lay, rs in groups.values()]


def clean_words(words: Sequence[str], field: str, example: str) -> list[str]:
    """A control's words or phrases, stripped; an empty one, or one named twice (compared as the layout compares
    words), is refused — it would map nothing, or act twice on the same tokens."""
    from ..layout import text_words

    out = [w.strip() for w in words]
    if any(not text_words(w) for w in out):
        raise ValueError(f"{field} holds an empty word or only punctuation; give words of the prompt such as "
                         f"{example!r}")
    keys = [" ".join(text_words(w)) for w in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{field} names {', '.join(map(repr, dup))} more than once; list each once")
    return out


def word_columns(layout: TokenLayout | None, words: Sequence[str], segments: Sequence[str] | None,
                 missing: str | None, who: str, noun: str = "word", field: str = "targets", verb: str = "act on"
                 ) -> list[list[int]]:
    """Text-relative token positions of each word or phrase (a phrase: its words' tokens where it stands in the
    prompt, :meth:`TokenLayout.phrase_tokens`) in ``layout``, in the order given; ``[]`` for a word the prompt lacks
    when ``missing == "ignore"`` (``None``: the control has no ``missing`` option). A word the prompt has but its
    tokens lost to truncation is an error whatever ``missing`` says.

    ``who`` (the control's name), ``noun``, ``field`` and ``verb`` phrase the errors: no prompt to read the words
    from, a segment the model does not have, a word not in the prompt (naming the prompt's words, and the
    ``missing='ignore'`` way out where the control has it)."""
    if layout is None or (layout.prompt is None and not any(seg.words for seg in layout.segments)):
        raise LayoutError(
            f"{who} needs the run's prompt to find its {noun}s, and this run has none (only prompt_embeds were "
            "given, or no prompt, or several prompts given to a bare transformer)",
            fix="pass the prompt text instead of prompt_embeds, through attnctl.attach(pipe, ...) or an attnctl "
                "pipeline, or give Controller(..., layout=TokenLayout(...)) with word positions")
    segs = tuple(segments) if segments else None
    check_segments(layout, segs, who)
    out: list[list[int]] = []
    for w in words:
        try:
            out.append(layout.phrase_tokens(w, segs))
        except LayoutError as e:
            if isinstance(e, WordCutOffError):  # the layout's own message says what to do
                raise
            if missing == "ignore":
                out.append([])
                continue
            ignore = f", or pass missing='ignore' to {verb} the ones that are present" if missing is not None else ""
            if e.problem.startswith("the phrase "):  # its words are there, apart: the layout's message says so
                raise LayoutError(f"{who}: {e.problem}", fix=f"{e.fix}{ignore}") from None
            known = ", ".join(layout.words(segs)[:20])  # the words of the segments searched
            # (the layout names the texts the tokens read when they are not the prompt: FLUX's prompt_2)
            where = layout._where(segs) or " in this run's prompt"
            seg_note = f" (segments {', '.join(segs)})" if segs else ""
            has = f"this prompt has: {known}" if known else "this prompt has no words"
            raise LayoutError(
                f"{who}: the {noun} {w!r} is not{where}{seg_note}",
                fix=f"name only words of the prompt in {field} ({has}){ignore}") from None
    return out


def check_segments(layout: TokenLayout, segments: Sequence[str] | None, who: str) -> None:
    """Refuse tokenizer segments this model's text tokens do not have (FLUX has only ``t5``; SD3 ``clip``, ``t5``)."""
    names = [s.name for s in layout.segments]
    unknown = [s for s in segments or () if s not in names]
    if unknown:
        raise LayoutError(f"{who}: segments {unknown} are not text segments of this {layout.family} model, whose "
                          f"text tokens are {', '.join(names)}",
                          fix=f"give segments from {names}, or leave segments out to read words from all of them")


class ControlConfig(ScalarsOfTheirKind):
    """Base of control configs: strict field names and scalar kinds (no ``"7"`` for 7, no ``true`` for 1.0), JSON
    round trip."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        """``control.config.field = value`` is validated as construction is, and a refusal reads as one."""
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError(_explain(type(self).__name__, e, list(type(self).model_fields))) from None


class Control:
    """Base class of all controls."""

    kind: ClassVar[str] = "control"
    gates: ClassVar[tuple[str, ...]] = ()
    """Config fields whose schedule at 0 on every step leaves the control doing nothing (warned at the run's start)."""

    gates_from_step: ClassVar[int] = 0
    """The first step the gates can act at (isolation's masks come from step 0, so it steers from step 1)."""
    families: ClassVar[tuple[str, ...]] = ("sd3", "flux")
    Config: ClassVar[type[ControlConfig]] = ControlConfig
    named_sites: ClassVar[dict[str, Callable[[list[Site]], list[Site]]]] = {}
    """Site choices by name, beside the selectors (``{"mid": mid_depth_sites}``)."""
    metrics: ClassVar[dict[str, str]] = {}
    """What the control reports to its schedules after each step, by name (an ``Adaptive`` schedule's ``metric``
    and ``reference``), with what each measures."""

    def __init__(self, **kwargs: Any) -> None:
        try:
            self.config = self.Config(**kwargs)
        except ValidationError as e:
            causes = [err.get("ctx", {}).get("error") for err in e.errors()]
            kind = next((type(c) for c in causes if isinstance(c, ConfigError)), ConfigError)
            raise kind(_explain(f"{self.kind} control config", e, list(self.Config.model_fields))) from None
        self.sites: list[Site] = []
        self._site_names: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def prompt_words(self) -> list[str]:
        """The words or phrases the run's prompt must contain for this control to run (a batch file is checked for
        them before its first image); none by default."""
        return []

    def named_words(self) -> list[str]:
        """Every word or phrase this control names, including those it may find missing (``missing="ignore"``)."""
        return self.prompt_words()

    def gate_groups(self) -> list[tuple[str, ...]]:
        """Groups of config fields whose schedules, all at 0 on every step, leave the control doing nothing; by
        default each of :attr:`gates` alone."""
        return [(g,) for g in self.gates]

    # -- lifecycle ----------------------------------------------------------------------------------
    def bind(self, controller: Controller) -> None:
        """Check the model family and resolve the site selection against this model. The controller binds again at
        each run's start, so settings assigned since count. A control acts for one controller at a time: binding it
        to another while the first still follows its pipeline is refused."""
        prev = self.controller
        if prev is not None and prev is not controller and prev.following:
            raise ConfigError(
                f"this {type(self).__name__} is in use by another attnctl controller, still attached to a "
                f"{prev.family} pipeline; one control object steers one pipeline at a time (its sites and run state "
                "are that pipeline's)", fix="give the other pipeline its own control: "
                                            "attnctl.control_from_json(control.to_json()); or leave the first "
                                            "attach first")
        if controller.family not in self.families:
            raise UnsupportedModelError(
                f"{type(self).__name__} supports {', '.join(self.families)} models, not {controller.family}; "
                "remove it from the controls of this pipeline"
            )
        self.sites = self.select_sites(controller.sites)
        self._site_names = frozenset(s.name for s in self.sites)
        self._controller = weakref.ref(controller)
        self.check_adaptive()

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle of a control is unbound: its weak reference to the controller is left out (pickle
        refuses one), and the next controller binds it again."""
        return {k: v for k, v in vars(self).items() if k != "_controller"}

    @property
    def controller(self) -> Controller | None:
        """The controller this control was last bound to, while it exists."""
        ref = getattr(self, "_controller", None)
        return ref() if ref is not None else None

    def schedules(self) -> list[Schedule]:
        """The schedules this control evaluates (its settings' and its own), once each."""
        from ..schedules import Schedule

        fields = [getattr(self.config, name) for name in type(self.config).model_fields]
        found = {id(v): v for v in [*fields, *vars(self).values()] if isinstance(v, Schedule)}
        return list(found.values())

    def check_adaptive(self) -> None:
        """Refuse an ``Adaptive`` schedule that would never change: on a control that reports no metric, or reading
        a metric this control does not report."""
        from ..errors import ScheduleError
        from ..schedules import adaptive_parts

        name = type(self).__name__
        known = ", ".join(f"{k!r} ({v})" for k, v in self.metrics.items())
        parts = [a for s in self.schedules() for a in adaptive_parts(s)]
        for part in parts:
            if not self.metrics:
                raise ScheduleError(f"{name} reports no metric, so the Adaptive schedule {part!r} would never change",
                                    fix="give it a fixed schedule; Adaptive rules follow what AttentionRegulation, "
                                        "LayoutGuidance and IsolationAttention report")
            needs = [] if callable(part.rule) else [part.metric, *([part.reference] if part.rule == "balance" else [])]
            missing = [m for m in needs if m not in self.metrics]
            if missing:
                raise ScheduleError(f"{name} reports no metric {missing[0]!r}, which the Adaptive schedule reads "
                                    f"(it reports {known})", fix=f"give metric= one of {list(self.metrics)}")
        self._adaptive = bool(parts)

    def report(self, values: dict[str, float]) -> None:
        """Give this step's metrics to the control's schedules (their ``Adaptive`` parts read them next step). A
        control calls it from :meth:`end_step` when :attr:`adaptive` — reading a value waits for the device."""
        for schedule in self.schedules():
            for name, value in values.items():
                schedule.report(name, float(value))

    @property
    def adaptive(self) -> bool:
        """Some schedule of this control is ``Adaptive``: it wants :meth:`report` after each step."""
        return getattr(self, "_adaptive", False)

    def select_sites(self, sites: list[Site]) -> list[Site]:
        """The sites of the model this control acts at: its config's ``sites``, either a name of
        :attr:`named_sites` (such as ``"mid"``) or a selector of :mod:`attnctl.sites`."""
        sel = getattr(self.config, "sites", "all")
        if isinstance(sel, str) and sel in self.named_sites:
            return self.named_sites[sel](sites)
        return select_sites(sites, sel)

    def applies_to(self, site: Site) -> bool:
        return site.name in self._site_names

    def begin_run(self, state: RunState) -> None:
        """A new pipeline call starts (reset per-run state, resolve words with ``state.layout``)."""

    def end_step(self, state: RunState) -> None:
        """The transformer forward of ``state.step`` finished."""

    def contribute(self, call: SiteCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   state: RunState) -> list[Contribution]:
        raise NotImplementedError

    def summary(self) -> str | None:
        """One line on what the control did in the last run (shown by the UI and the CLI), or None."""
        return None

    # -- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"kind": self.kind, **self.config.model_dump(mode="json")}

    @classmethod
    def from_json(cls, data: dict) -> Control:
        data = dict(data)
        data.pop("kind", None)
        return cls(**data)


def _explain(what: str, err: ValidationError, fields: Sequence[str] = ()) -> str:
    """One line for pydantic's errors; a misspelt setting (one of ``fields`` misspelt) gets the setting meant."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 and fields:
            close = difflib.get_close_matches(loc, fields, n=1)
            msg = (f"no such setting (did you mean {close[0]!r}?)" if close
                   else f"no such setting; the settings are {', '.join(fields)}")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what} — " + "; ".join(parts)


CONTROL_TYPES: dict[str, type[Control]] = {}


def register(cls: type[Control]) -> type[Control]:
    """Make a control loadable from JSON by its ``kind``."""
    CONTROL_TYPES[cls.kind] = cls
    return cls


def config_fields(kind: Any) -> frozenset[str]:
    """The config field names of the control ``kind`` (empty for an unknown kind): what a caller may fill in for it,
    such as the words or boxes of each prompt item."""
    cls = CONTROL_TYPES.get(kind) if isinstance(kind, str) else None
    return frozenset(cls.Config.model_fields) if cls is not None else frozenset()


def unknown_kind_fix(kind: Any) -> str:
    """The way out of an unknown control kind: the kind meant, when ``kind`` is a near miss, and the known ones."""
    close = difflib.get_close_matches(kind, list(CONTROL_TYPES), n=1) if isinstance(kind, str) else []
    known = ", ".join(sorted(CONTROL_TYPES))
    return f"did you mean {close[0]!r}? The known kinds: {known}" if close else f"give one of the known kinds: {known}"


def control_from_json(data: dict | str | bytes) -> Control:
    """A control from its JSON: a dict with its ``kind``, or that dict's JSON text."""
    if isinstance(data, str | bytes):
        import json

        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ConfigError(f"the control's JSON text is not valid JSON ({e.msg} at column {e.colno})",
                              fix='write it as {"kind": "probe", ...}') from None
    if not isinstance(data, dict):
        raise ConfigError(f"a control's JSON is an object with a kind, not {type(data).__name__}",
                          fix='write it as {"kind": "probe", ...}')
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in CONTROL_TYPES:
        raise ConfigError(f"unknown control kind {kind!r}", fix=unknown_kind_fix(kind))
    return CONTROL_TYPES[kind].from_json(data)
