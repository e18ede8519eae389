"""Value sharing: an edit's target branch attends with the source branch's values at late sites and early steps.

After the feature sharing of RF-Solver-Edit ("Taming Rectified Flow for Inversion and Editing", Wang et al., 2024).
Their FLUX.1 code stores the value tensors of the inversion's forward passes in the single blocks 20–37 and, during
the first few denoising steps, runs those blocks of the edit with the stored values in place of its own. The queries
and keys stay the target's, so where each token looks follows the new prompt, and what it reads there is the source
image's: the layout and the appearance hold, while the words still steer.

attnctl runs it on the edit's two branches (:mod:`attnctl.editing`). At a sharing step the source rows, which
otherwise only replay the inversion path, are run through the model beside the target rows on their path latent
``z^s_t`` (the latent the source branch is at on that call), and at every selected site each target row's values
become its source row's (same role: the unconditional target reads the unconditional source under CFG)::

    v^t ← v^t + w_t · (v^s − v^t)         (w_t = 1: RF-Solver-Edit's replacement)

on every token (``tokens="all"``, as RF-Solver-Edit) or the image tokens only (``tokens="image"``: the target prompt's
text values stay its own). The source rows' outputs are dropped: the source branch still returns the path's
velocity. Unlike the stored tensors of the original, the shared values are the source's at the same latent and
timestep as the call (the original pairs a step with the inversion's forward one step away on the grid), nothing is
stored, and the cost is one more forward of the source rows at the sharing steps only.

Default sites (``"late"``): the last 18/57 of the joint sites by depth — on FLUX.1 exactly single blocks 20–37,
RF-Solver-Edit's choice; on SD3 / SD3.5 (which RF-Solver-Edit does not cover) the same share of the joint blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from ..errors import ConfigError, SiteError
from ..processors.contributions import Selection, SharedValues
from ..schedules import bounded
from ..sites import Site
from .base import Control, ControlConfig, RunState, register
from .regulation import JOINT_KINDS

LATE_SHARE = 18 / 57
"""The share of the joint sites, deepest first, RF-Solver-Edit shares on FLUX.1 (single blocks 20–37 of 19 + 38)."""


def late_sites(sites: list[Site]) -> list[Site]:
    """The deepest ``LATE_SHARE`` of the joint (image-text) sites, at least one: FLUX.1's single blocks 20–37."""
    joint = [s for s in sites if s.kind in JOINT_KINDS]
    if not joint:
        return []
    keep = max(1, int(len(joint) * LATE_SHARE + 0.5))
    return joint[len(joint) - keep:]


class ValueSharingConfig(ControlConfig):
    weight: bounded(0, 1) = Field(
        "window(1, 0, 0.15)", description="schedule of w over the denoising steps: the share of the source's values "
                                          "the target reads (1: replace; 0: no sharing, no extra forward)")
    sites: str | list[str] = Field("late", description="site selector; 'late': the deepest 18/57 of the joint sites "
                                                       "(FLUX.1 single blocks 20-37)")
    tokens: Literal["all", "image"] = Field("all", description="the tokens whose values are shared: all (as "
                                                               "RF-Solver-Edit), or the image tokens only")


@register
class ValueSharing(Control):
    """The target branch of an edit reads the source branch's attention values at late sites during the first steps
    (module doc). Runs inside :func:`attnctl.edit` (``share=ValueSharing()``), or attached beside a
    :class:`~attnctl.controls.unify_edit.UnifyEdit` whose source is set."""

    kind = "value_sharing"
    Config = ValueSharingConfig
    named_sites = {"late": late_sites}
    in_gradient_pass = True  # an edit's gradient pass runs the target through the same shared values

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pairs: tuple[list[int], list[int], float] | None = None
        self.shared_steps: list[int] = []  # denoising steps the last run shared values at (for tests and logs)

    def select_sites(self, sites):
        return [s for s in super().select_sites(sites) if s.kind in JOINT_KINDS]

    def bind(self, controller) -> None:
        super().bind(controller)
        from .unify_edit import UnifyEdit

        if not any(isinstance(c, UnifyEdit) for c in controller.controls):
            raise ConfigError("ValueSharing gives an edit's target branch the source branch's attention values, and "
                              "this run has no edit (no UnifyEdit control)",
                              fix="use attnctl.edit(pipe, image, source_prompt, target_prompt, "
                                  "share=ValueSharing()), or attach it beside UnifyEdit().set_source(path)")
        if not self.sites:
            raise SiteError(f"ValueSharing: the sites {self.config.sites!r} have no image-text attention",
                            fix="select joint sites, e.g. sites='late' or 'all'")

    def begin_run(self, state: RunState) -> None:
        self.config.weight.reset()  # read from the config at use: a weight assigned after construction counts
        self._pairs = None
        self.shared_steps = []

    def weight_at(self, step: int, num_steps: int) -> float:
        """``w`` at denoising step ``step`` of ``num_steps`` (0: the step runs without sharing)."""
        return float(self.config.weight(step, num_steps))

    @contextlib.contextmanager
    def pairing(self, targets: Sequence[int], sources: Sequence[int], weight: float, step: int) -> Iterator[None]:
        """For one forward: the batch rows ``targets`` read the values of the rows ``sources`` (paired in order) with
        ``weight``; ``step`` is the denoising step, recorded in :attr:`shared_steps`."""
        if len(targets) != len(sources) or not targets:
            raise ConfigError(f"value sharing pairs {len(targets)} target rows with {len(sources)} source rows",
                              fix="run it through attnctl.edit(...), which lays out the two branches")
        self._pairs = (list(targets), list(sources), float(weight))
        if not self.shared_steps or self.shared_steps[-1] != step:
            self.shared_steps.append(step)
        try:
            yield
        finally:
            self._pairs = None

    def contribute(self, call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RunState) -> list:
        if self._pairs is None:
            return []  # a call without the source rows beside the target's: nothing to share
        targets, sources, weight = self._pairs
        if max(*targets, *sources) >= call.batch:
            raise ConfigError(f"value sharing expects rows {sorted({*targets, *sources})} and "
                              f"{call.site.name} has a batch of {call.batch}",
                              fix="run it through attnctl.edit(...), which lays out the two branches")
        tokens = None if self.config.tokens == "all" else call.image_slice()
        where = Selection(batch=state.index(targets, q.device), rows=tokens)
        return [SharedValues(source=state.index(sources, q.device), weight=weight, where=where)]

    def summary(self) -> str | None:
        if not self.shared_steps:
            return None
        return (f"ValueSharing at {len(self.sites)} sites over {len(self.shared_steps)} denoising steps "
                f"({self.shared_steps[0]}–{self.shared_steps[-1]})")

    # -- JSON ---------------------------------------------------------------------------------------
    def canonical(self, num_steps: int | None = None) -> ValueSharing | None:
        """These settings, or ``None`` when the weight is 0 at every step (of a run of ``num_steps`` denoising steps
        when given, else of any run): nothing is shared then, and the edit is the one without sharing. Batch runs
        hash this, so such settings do not redo an edit."""
        if num_steps is not None:
            return self if any(self.config.weight.values(int(num_steps))) else None
        return None if self.config.weight._range(0.0, 1.0) == (0.0, 0.0) else self

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ValueSharing:
        """The settings of a JSON object (its ``kind``, when given, must be ``"value_sharing"``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"value-sharing settings are a JSON object, got {type(data).__name__}",
                              fix='pass e.g. {"weight": "window(1, 0, 0.15)", "tokens": "image"}, or {} for the '
                                  'defaults')
        if data.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"value-sharing settings have the kind {data['kind']!r}",
                              fix=f'leave "kind" out, or give "{cls.kind}"')
        try:
            return cls(**{k: v for k, v in data.items() if k != "kind"})
        except ConfigError as e:
            if e.fix is not None or "Fix:" in e.problem:
                raise
            raise type(e)(e.problem, fix="give weight as a schedule in [0, 1] (e.g. 'window(1, 0, 0.15)'), sites as "
                                         "'late' or a site selector, and tokens as 'all' or 'image'") from None
