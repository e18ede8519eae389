"""Strength schedules: every control strength is a function of how far the run has got.

A schedule is evaluated once per denoising step, ``schedule(step, num_steps)``, and returns a float.
Progress runs from 0.0 at the first step to 1.0 at the last::

    progress = step / max(num_steps - 1, 1)

Kinds (frozen pydantic models with a ``kind`` tag, so they round-trip through JSON):

===================================  ==============================================================
``Constant(value)``                  value
``Linear(start, end)``               start + (end - start) * p
``Cosine(start, end)``               end + (start - end) * (1 + cos(pi * p)) / 2
``Window(value, start, stop)``       value (a number or a schedule) for start <= p < stop, else ``off``
``Piecewise(points, interpolation)`` through ``(progress, value)`` points, "linear" or "step"
``Adaptive(base, rule, ...)``        the base value reshaped by metrics the control reports each step
``Scaled(inner, factor)``            factor * inner (also written ``factor * schedule``)
===================================  ==============================================================

Wherever a strength is expected, :func:`as_schedule` accepts a number, a schedule, its JSON dict, or a
shorthand string: ``"0.7"``, ``"linear(1, 0)"``, ``"cosine(0.5, 0)"``, ``"window(2.0, 0, 0.5)"``,
``"window(linear(1, 0), 0, 0.5, rescale=True)"``, ``"2 * cosine(1, 0)"``. ``str(schedule)`` writes
that shorthand back.

A control declares its valid range with ``schedule.checked(lo, hi)`` (or a pydantic field typed
``bounded(lo, hi)``): values are checked when the schedule is built wherever they are known ahead of
time, and every value is checked again when it is evaluated.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from .errors import AttnCtlError, ScheduleError
from .json_types import wrong_scalar_in_fields

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Window",
    "Piecewise",
    "Adaptive",
    "Scaled",
    "ScheduleSpec",
    "ScheduleField",
    "bounded",
    "as_schedule",
    "parse_schedule",
    "from_json",
    "progress_of",
    "RULES",
    "KINDS",
]

RULES = ("ratio", "threshold", "balance")
"""Names of the built-in rules of :class:`Adaptive`."""

_ACCEPTED = (
    "pass a number (0.7), a schedule (Linear(1, 0)), its JSON dict ({'kind': 'linear', 'start': 1, "
    "'end': 0}) or a string such as '0.7', 'linear(1, 0)', 'cosine(0.5, 0)', 'window(2.0, 0, 0.5)', "
    "'piecewise([(0, 1), (0.5, 0.2)])'"
)
_TOL = 1e-9  # evaluation may land this close (relative) outside [lo, hi] through rounding; it is clamped


# ---------------------------------------------------------------------------------------------- helpers


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if isinstance(x, Schedule):
        return str(x)
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, tuple):  # Piecewise points
        items = [f"({', '.join(map(_fmt, p))})" if isinstance(p, tuple) else _fmt(p) for p in x]
        return f"[{', '.join(items)}]"
    if callable(x):
        return getattr(x, "__qualname__", None) or repr(x)
    return repr(x)


def _fmt_range(lo: float | None, hi: float | None) -> str:
    left = "(-inf" if lo is None else f"[{lo!r}"
    right = "inf)" if hi is None else f"{hi!r}]"
    return f"{left}, {right}"


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _lerp(a: float, b: float, t: float) -> float:
    """a at t=0, b at t=1 exactly, never outside [min(a, b), max(a, b)]."""
    return _clamp((1.0 - t) * a + t * b, min(a, b), max(a, b))


def _hull(*ranges: tuple[float, float] | None) -> tuple[float, float] | None:
    if any(r is None for r in ranges):
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _times(r: tuple[float, float] | None, f0: float, f1: float) -> tuple[float, float] | None:
    """Range of x * f for x in r and f in [f0, f1]."""
    if r is None:
        return None
    products = [r[0] * f0, r[0] * f1, r[1] * f0, r[1] * f1]
    return min(products), max(products)


def _as_index(x: Any, name: str) -> int:
    if isinstance(x, bool):
        raise ScheduleError(f"{name}={x!r} is a bool, not an integer", fix=f"pass {name} as an int")
    try:
        return operator.index(x)
    except TypeError:
        raise ScheduleError(f"{name}={x!r} is not an integer", fix=f"pass {name} as an int") from None


def _short(x: Any, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[: n - 3] + "..."


def _schedule_error(err: ValidationError, where: str) -> AttnCtlError:
    """Turn a pydantic ValidationError into one ScheduleError (or the attnctl error raised inside it)."""
    errors = err.errors()
    for e in errors:
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, AttnCtlError):
            return inner
    problems = []
    for e in errors[:4]:
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown field {loc!r}")
        elif e["type"] == "missing":
            problems.append(f"missing field {loc!r}")
        else:
            problems.append(f"{loc}: {e['msg']} (got {_short(e['input'])})")
    if len(errors) > 4:
        problems.append(f"and {len(errors) - 4} more")
    return ScheduleError(
        f"invalid {where}: " + "; ".join(problems),
        fix="check the field names and values against the schedule kinds in attnctl.schedules, "
        "e.g. Linear(start, end), Window(value, start, stop)",
    )


@dataclass(frozen=True)
class _Point:
    step: int
    num_steps: int
    progress: float
    sigma: float | None = None


def _point(step: Any, num_steps: Any, sigma: Any = None) -> _Point:
    step = _as_index(step, "step")
    n = _as_index(num_steps, "num_steps")
    if n < 1:
        raise ScheduleError(
            f"num_steps={n}: a run has at least one step", fix="pass the number of denoising steps"
        )
    if not 0 <= step < n:
        raise ScheduleError(
            f"step {step} is outside a run of {n} steps", fix=f"pass a step index in 0..{n - 1}"
        )
    if sigma is not None:
        sigma = float(sigma)
        if not math.isfinite(sigma):
            raise ScheduleError(
                f"sigma={sigma!r} is not finite", fix="pass the scheduler's finite sigma or None"
            )
    return _Point(step, n, step / max(n - 1, 1), sigma)


def progress_of(step: int, num_steps: int) -> float:
    """Run progress of ``step``: 0.0 at the first step, 1.0 at the last (``step / max(num_steps - 1, 1)``)."""
    return _point(step, num_steps).progress


# ------------------------------------------------------------------------------------------- base class


class Schedule(BaseModel):
    """Base of all schedules: a frozen model mapping run progress to a float.

    Evaluate with ``schedule(step, num_steps, sigma=None, report=None)``. ``lo``/``hi`` are optional
    bounds on the values (set them with :meth:`checked`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    _positional: ClassVar[tuple[str, ...]] = ()

    lo: float | None = None
    hi: float | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        cls = type(self)
        if cls is Schedule:
            kinds = ", ".join(c.__name__ for c in KINDS.values())
            raise ScheduleError("Schedule is the abstract base", fix=f"build one of {kinds}")
        names = cls._positional
        if len(args) > len(names):
            raise ScheduleError(
                f"{cls.__name__} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                f"got {len(args)}",
                fix="pass the other fields by name",
            )
        for name, arg in zip(names, args, strict=False):
            if name in kwargs:
                raise ScheduleError(f"{cls.__name__} got {name!r} twice", fix="pass it once")
            kwargs[name] = arg
        try:
            super().__init__(**kwargs)
        except ValidationError as err:
            raise _schedule_error(err, cls.__name__) from None

    # ---- what subclasses provide

    def _eval(self, pt: _Point) -> float:
        raise NotImplementedError

    def _range(self, a: float, b: float) -> tuple[float, float] | None:
        """(min, max) of the values over progress in [a, b], or None when not known ahead of time."""
        raise NotImplementedError

    def _check_own(self) -> None:
        """Structural checks of one kind (run at construction, after the finiteness check)."""

    def _children(self) -> list[Schedule]:
        return [v for _, v in self if isinstance(v, Schedule)]

    # ---- validation

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """``true`` or ``"1"`` where a number belongs is a mistake (pydantic alone would take it as 1.0), as is
        ``"no"`` for a flag (:mod:`attnctl.json_types`)."""
        wrong = wrong_scalar_in_fields(cls, data)
        if wrong:
            raise ScheduleError(f"{cls.__name__} {wrong}", fix="write numbers without quotes and flags as true / "
                                                               "false (True / False in a schedule's shorthand)")
        return data

    @model_validator(mode="after")
    def _validate_schedule(self) -> Schedule:
        for name, value in self:
            _require_finite(self, name, value)
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ScheduleError(
                f"{type(self).__name__}: lo={self.lo!r} is above hi={self.hi!r}",
                fix="give bounds with lo <= hi",
            )
        self._check_own()
        if self.lo is not None or self.hi is not None:
            known = self._range(0.0, 1.0)
            if known is not None:
                for v in known:
                    self._check_value(v, None)
        return self

    def _check_value(self, v: float, pt: _Point | None) -> float:
        when = "" if pt is None else f" at step {pt.step} of {pt.num_steps}"
        if not math.isfinite(v):
            raise ScheduleError(
                f"{self} gave {v!r}{when}", fix="make the schedule (or its rule) return finite values"
            )
        lo, hi = self.lo, self.hi
        if lo is not None and v < lo:
            if v >= lo - _TOL * max(1.0, abs(lo)):
                return lo
        elif hi is not None and v > hi:
            if v <= hi + _TOL * max(1.0, abs(hi)):
                return hi
        else:
            return v
        fix = f"keep the schedule's values inside {_fmt_range(lo, hi)}, the range this strength accepts"
        if isinstance(self, Window) and v == self.off:
            fix += f" (the window gives off={self.off!r} outside start..stop: set off= inside the range)"
        raise ScheduleError(
            f"{self} reaches {v!r}{when}, outside the allowed range {_fmt_range(lo, hi)}", fix=fix
        )

    # ---- public API

    def __call__(
        self,
        step: int,
        num_steps: int,
        *,
        sigma: float | None = None,
        report: Mapping[str, float] | None = None,
    ) -> float:
        """Value at ``step`` of a run of ``num_steps``; ``report`` records metrics first (:meth:`report`)."""
        pt = _point(step, num_steps, sigma)
        if report is not None:
            if not isinstance(report, Mapping):
                raise ScheduleError(
                    f"report={_short(report)} is not a mapping", fix="pass report={'name': value}"
                )
            for name, value in report.items():
                self.report(name, value)
        return self._evaluate(pt)

    def _evaluate(self, pt: _Point) -> float:
        return self._check_value(float(self._eval(pt)), pt)

    def report(self, name: str, value: float) -> None:
        """Record a metric for the adaptive parts of this schedule (nothing to do for fixed ones).

        Report once per step (aggregate over sites first): every call is kept in the history.
        """
        for child in self._children():
            child.report(name, value)

    def reset(self) -> None:
        """Forget the state of a run (adaptive parts); call before a new run."""
        for child in self._children():
            child.reset()

    def values(self, num_steps: int) -> list[float]:
        """The value at every step of a run of ``num_steps``, e.g. for a plot.

        Adaptive parts are evaluated on a fresh copy with no reports, so the state of this schedule is
        not touched.
        """
        n = _point(0, num_steps).num_steps
        fresh = self._clone()
        return [fresh._evaluate(_point(i, n)) for i in range(n)]

    def checked(self, lo: float | None = None, hi: float | None = None) -> Schedule:
        """A copy bounded to ``[lo, hi]`` (None: open), validated now wherever the values are known.

        Existing bounds are intersected with the new ones. Raises :class:`ScheduleError` naming the
        schedule, the offending value and the range.
        """
        for name, b in (("lo", lo), ("hi", hi)):
            if b is not None and not (_is_real(b) and math.isfinite(b)):
                raise ScheduleError(
                    f"checked({name}={b!r}): a bound must be a finite number or None",
                    fix="pass finite numbers",
                )
        new_lo = lo if self.lo is None else self.lo if lo is None else max(self.lo, lo)
        new_hi = hi if self.hi is None else self.hi if hi is None else min(self.hi, hi)
        if new_lo is not None and new_hi is not None and new_lo > new_hi:
            raise ScheduleError(
                f"{self} is bounded to {_fmt_range(self.lo, self.hi)}, which does not overlap "
                f"{_fmt_range(lo, hi)}",
                fix="give bounds that overlap",
            )
        return self._replace(lo=new_lo, hi=new_hi)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON dict (``kind`` first), the inverse of :meth:`from_json`."""
        for node in self._walk():
            if isinstance(node, Adaptive) and callable(node.rule):
                raise ScheduleError(
                    f"{node} uses the Python callable {_fmt(node.rule)} as its rule; a callable cannot be "
                    "written to JSON",
                    fix=f"use a named rule ({', '.join(map(repr, RULES))}) or keep it in Python code",
                )
        return _kind_first(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | bytes) -> Schedule:
        """Build a schedule from its JSON dict (or JSON text)."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ScheduleError(f"schedule JSON does not parse: {e}", fix="pass valid JSON") from None
        if not isinstance(data, Mapping):
            raise ScheduleError(
                f"a schedule's JSON form is a dict with a 'kind', got {_short(data)}", fix=_ACCEPTED
            )
        kind = data.get("kind")
        if kind not in KINDS:
            what = "has no 'kind'" if kind is None else f"has unknown kind {kind!r}"
            raise ScheduleError(
                f"schedule JSON {_short(dict(data))} {what}",
                fix=f"set 'kind' to one of {', '.join(map(repr, KINDS))}",
            )
        try:
            sched = _SPEC.validate_python(dict(data))
        except ValidationError as err:
            raise _schedule_error(err, f"{kind!r} schedule JSON") from None
        if not isinstance(sched, cls):
            raise ScheduleError(
                f"{cls.__name__}.from_json got a {kind!r} schedule",
                fix="use Schedule.from_json to accept any kind",
            )
        return sched

    def __mul__(self, factor: Any) -> Schedule:
        if not _is_real(factor):
            return NotImplemented
        return Scaled(self, factor)

    __rmul__ = __mul__

    def __str__(self) -> str:
        cls = type(self)
        args = [_fmt(getattr(self, n)) for n in cls._positional]
        for name, info in cls.model_fields.items():
            value = getattr(self, name)
            if name == "kind" or name in cls._positional or value == info.default:
                continue
            args.append(f"{name}={_fmt(value)}")
        return f"{self.kind}({', '.join(args)})"

    def __repr_args__(self) -> Iterator[tuple[str, Any]]:
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if name != "kind" and (info.is_required() or value != info.default):
                yield name, value

    # ---- internals

    def _walk(self) -> Iterator[Schedule]:
        yield self
        for child in self._children():
            yield from child._walk()

    def _replace(self, **changes: Any) -> Schedule:
        return type(self)(**{**dict(self), **changes})

    def _clone(self) -> Schedule:
        """Same configuration, fresh run state all the way down."""
        return self._replace(**{n: v._clone() for n, v in self if isinstance(v, Schedule)})


def _require_finite(owner: Schedule, name: str, value: Any) -> None:
    if isinstance(value, tuple):
        for v in value:
            _require_finite(owner, name, v)
    elif _is_real(value) and not math.isfinite(value):
        raise ScheduleError(
            f"{type(owner).__name__}: {name} contains {value!r}",
            fix="use finite numbers; NaN and inf are not allowed in a schedule",
        )


def _kind_first(x: Any) -> Any:
    if isinstance(x, dict):
        out = {"kind": x["kind"]} if "kind" in x else {}
        out.update((k, _kind_first(v)) for k, v in x.items() if k != "kind")
        return out
    if isinstance(x, list):
        return [_kind_first(v) for v in x]
    return x


def _coerce_schedule(v: Any) -> Any:
    """Field input → something the ScheduleSpec union validates (numbers become Constant)."""
    if isinstance(v, Schedule):
        return v
    if isinstance(v, Mapping):
        return dict(v)
    return as_schedule(v)


def _coerce_value(v: Any) -> Any:
    """Like _coerce_schedule, but a plain number stays a number (Window.value)."""
    return v if _is_real(v) else _coerce_schedule(v)


# ------------------------------------------------------------------------------------------ fixed kinds


class Constant(Schedule):
    """The same value at every step."""

    _positional: ClassVar[tuple[str, ...]] = ("value",)
    kind: Literal["constant"] = "constant"
    value: float

    def _eval(self, pt: _Point) -> float:
        return self.value

    def _range(self, a: float, b: float) -> tuple[float, float]:
        return self.value, self.value


class _Ramp(Schedule):
    """From ``start`` at the first step to ``end`` at the last; subclasses give the shape ``_at``."""

    _positional: ClassVar[tuple[str, ...]] = ("start", "end")
    start: float
    end: float

    def _at(self, p: float) -> float:
        raise NotImplementedError

    def _eval(self, pt: _Point) -> float:
        return self._at(pt.progress)

    def _range(self, a: float, b: float) -> tuple[float, float]:
        va, vb = self._at(a), self._at(b)
        return min(va, vb), max(va, vb)


class Linear(_Ramp):
    """From ``start`` at the first step to ``end`` at the last, linear in progress."""

    kind: Literal["linear"] = "linear"

    def _at(self, p: float) -> float:
        return _lerp(self.start, self.end, p)


class Cosine(_Ramp):
    """Half a cosine from ``start`` to ``end``: flat at both ends, steepest in the middle.

    value = start + (end - start) * (1 - cos(pi * p)) / 2
    """

    kind: Literal["cosine"] = "cosine"

    def _at(self, p: float) -> float:
        return _lerp(self.start, self.end, (1.0 - math.cos(math.pi * p)) / 2.0)


class Window(Schedule):
    """``value`` while ``start <= progress < stop``, ``off`` (0.0) elsewhere.

    ``value`` is a number or an inner schedule. ``start`` and ``stop`` are fractions of the run in
    [0, 1] -- not step indices -- compared with the progress ``step / (steps - 1)`` (diffusers' guiders
    compare ``step / steps``, which can differ by a step at an edge; to act on the first k of n steps,
    use ``stop=k/n``). ``stop=1.0`` includes the last step. The inner schedule sees the progress of the
    whole run; with ``rescale=True`` it sees progress within the window instead (0 at ``start``,
    1 at ``stop``), so ``Window(Linear(1, 0), 0, 0.5, rescale=True)`` falls from 1 to 0 over the
    first half.
    """

    _positional: ClassVar[tuple[str, ...]] = ("value", "start", "stop")
    kind: Literal["window"] = "window"
    value: Union[float, ScheduleSpec]
    start: float = 0.0
    stop: float = 1.0
    off: float = 0.0
    rescale: bool = False

    _coerce = field_validator("value", mode="before")(lambda cls, v: _coerce_value(v))

    def _check_own(self) -> None:
        for name in ("start", "stop"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ScheduleError(
                    f"Window {name}={v!r} is not a fraction of the run",
                    fix="give start and stop as fractions in [0, 1] (stop=0.5: the first half; the first k "
                    "of n steps: stop=k/n), not step indices",
                )
        if self.start >= self.stop:
            raise ScheduleError(
                f"Window start={self.start!r} is not before stop={self.stop!r}, so it is never on",
                fix="give start < stop",
            )

    def _active(self, p: float) -> bool:
        return self.start <= p < self.stop or (self.stop >= 1.0 and p >= self.start)

    def _local(self, p: float) -> float:
        return (p - self.start) / (self.stop - self.start) if self.rescale else p

    def _eval(self, pt: _Point) -> float:
        if not self._active(pt.progress):
            return self.off
        if isinstance(self.value, Schedule):
            if self.rescale:
                pt = _Point(pt.step, pt.num_steps, self._local(pt.progress), pt.sigma)
            return self.value._evaluate(pt)
        return self.value

    def _range(self, a: float, b: float) -> tuple[float, float] | None:
        parts: list[tuple[float, float] | None] = []
        lo, hi = max(a, self.start), min(b, self.stop)
        if lo < hi or (lo == hi and self._active(lo)):
            if isinstance(self.value, Schedule):
                parts.append(self.value._range(self._local(lo), self._local(hi)))
            else:
                parts.append((self.value, self.value))
        if a < self.start or (b >= self.stop and self.stop < 1.0):
            parts.append((self.off, self.off))
        return _hull(*parts)


class Piecewise(Schedule):
    """Through ``points = [(progress, value), ...]`` (progress in [0, 1], increasing).

    ``interpolation="linear"`` joins the points with straight lines; ``"step"`` holds each value until
    the next point. Before the first point the first value holds, after the last point the last.
    """

    _positional: ClassVar[tuple[str, ...]] = ("points", "interpolation")
    kind: Literal["piecewise"] = "piecewise"
    points: tuple[tuple[float, float], ...]
    interpolation: Literal["linear", "step"] = "linear"

    def _check_own(self) -> None:
        if not self.points:
            raise ScheduleError("Piecewise has no points", fix="give at least one (progress, value) point")
        xs = [x for x, _ in self.points]
        bad = [x for x in xs if not 0.0 <= x <= 1.0]
        if bad:
            raise ScheduleError(
                f"Piecewise point progress {bad[0]!r} is outside [0, 1]",
                fix="give each point's progress as a fraction of the run in [0, 1]",
            )
        for x0, x1 in zip(xs, xs[1:], strict=False):
            if x1 <= x0:
                raise ScheduleError(
                    f"Piecewise points are not in increasing progress ({x0!r} then {x1!r})",
                    fix="list the points once each, in increasing progress",
                )

    def _at(self, p: float) -> float:
        pts = self.points
        if p <= pts[0][0]:
            return pts[0][1]
        if p >= pts[-1][0]:
            return pts[-1][1]
        i = bisect_right([x for x, _ in pts], p) - 1  # pts[i].x <= p < pts[i + 1].x
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        if self.interpolation == "step":
            return y0
        return _lerp(y0, y1, (p - x0) / (x1 - x0))

    def _eval(self, pt: _Point) -> float:
        return self._at(pt.progress)

    def _range(self, a: float, b: float) -> tuple[float, float]:
        vs = [self._at(a), self._at(b)] + [y for x, y in self.points if a < x < b]
        return min(vs), max(vs)


class Scaled(Schedule):
    """``factor * inner``; ``2 * Linear(1, 0)`` builds one."""

    _positional: ClassVar[tuple[str, ...]] = ("inner", "factor")
    kind: Literal["scaled"] = "scaled"
    inner: ScheduleSpec
    factor: float

    _coerce = field_validator("inner", mode="before")(lambda cls, v: _coerce_schedule(v))

    def _eval(self, pt: _Point) -> float:
        return self.factor * self.inner._evaluate(pt)

    def _range(self, a: float, b: float) -> tuple[float, float] | None:
        return _times(self.inner._range(a, b), self.factor, self.factor)


# ---------------------------------------------------------------------------------------------- adaptive


@dataclass
class _RunState:
    num_steps: int | None = None
    step: int | None = None
    value: float | None = None
    pending: dict[str, list[float]] = field(default_factory=dict)  # reported since the last new step
    smoothed: dict[str, float] = field(default_factory=dict)  # per metric, over steps (momentum)
    history: dict[str, list[float]] = field(default_factory=dict)  # every report of the run, in order
    trace: list[tuple[int, float]] = field(default_factory=list)  # (step, value) this run
    latched: bool = False


_RULE_FIELDS = {
    "ratio": {"metric", "target", "goal", "min_factor", "max_factor", "momentum"},
    "threshold": {"metric", "threshold", "goal", "momentum", "latch", "off"},
    "balance": {"metric", "reference", "min_factor", "max_factor", "momentum"},
    "callable": set(),
}
_ALL_RULE_FIELDS = set().union(*_RULE_FIELDS.values())


class Adaptive(Schedule):
    """The ``base`` schedule reshaped, step by step, by metrics a control reports.

    The control reports with ``schedule.report(name, value)`` after it acts, or passes
    ``report={name: value}`` when it evaluates the schedule. The value is computed at the first
    evaluation of each step, from everything reported before it, and then held for that step, so every
    attention site sees the same value; reports made later in the step shape the next step.
    Call :meth:`reset` before a new run. ``m`` below is the value of ``metric`` reported in the last
    step (the mean of its reports, when a step makes several), smoothed over steps when
    ``momentum > 0``: m = momentum * m_prev + (1 - momentum) * m_new.

    Rules:

    - ``"ratio"``: base * clamp(target / m, min_factor, max_factor) -- push harder while the metric is
      below ``target``, ease off above it (a metric <= 0 gives max_factor). Factor 1 before any report.
      With ``goal="lower"`` (a loss the control lowers) the factor is m / target instead: push harder
      while the loss is above its target.
    - ``"threshold"``: base while m < ``threshold``, ``off`` (0.0) once m >= threshold: the control has
      raised the metric far enough. With ``goal="lower"``: off once m <= threshold, the loss is low
      enough. With ``latch=True`` it stays off for the rest of the run. Base before any report.
    - ``"balance"``: base * clamp(m_reference / m, min_factor, max_factor), with ``reference`` another
      reported metric -- keeps one loss term in step with another. Factor 1 until both are reported.
    - a callable ``f(progress, base_value, history) -> float``, ``history`` mapping each reported name
      to its values this run, oldest first. Such a schedule works in Python but cannot go to JSON.

    Named rules know their range ahead of time, so ``checked`` validates them at construction; a
    callable is checked at every evaluation.
    """

    _positional: ClassVar[tuple[str, ...]] = ("base", "rule")
    kind: Literal["adaptive"] = "adaptive"
    base: ScheduleSpec
    rule: Union[Literal["ratio", "threshold", "balance"], SkipJsonSchema[Callable[..., float]]]
    metric: str = "value"
    target: float | None = None
    threshold: float | None = None
    reference: str | None = None
    goal: Literal["raise", "lower"] = "raise"
    min_factor: float = 0.5
    max_factor: float = 2.0
    momentum: float = 0.0
    latch: bool = False
    off: float = 0.0

    _state: _RunState = PrivateAttr(default_factory=_RunState)

    _coerce = field_validator("base", mode="before")(lambda cls, v: _coerce_schedule(v))

    @field_validator("rule", mode="before")
    @classmethod
    def _known_rule(cls, v: Any) -> Any:
        if callable(v) or v in RULES:
            return v
        raise ScheduleError(
            f"Adaptive rule {_short(v)} is unknown",
            fix=f"use one of {', '.join(map(repr, RULES))} or a callable f(progress, base, history)",
        )

    @field_serializer("rule", when_used="json")
    def _rule_to_json(self, rule: Any) -> str:
        if callable(rule):
            raise ScheduleError(
                f"Adaptive rule {_fmt(rule)} is a Python callable and cannot be written to JSON",
                fix=f"use a named rule ({', '.join(map(repr, RULES))})",
            )
        return rule

    @property
    def _rule_name(self) -> str:
        return "callable" if callable(self.rule) else self.rule

    def _check_own(self) -> None:
        rule = self._rule_name
        fields = type(self).model_fields
        unused = sorted(
            n for n in _ALL_RULE_FIELDS - _RULE_FIELDS[rule] if getattr(self, n) != fields[n].default
        )
        if unused:
            uses = "; ".join(f"{r}: {', '.join(sorted(f))}" for r, f in _RULE_FIELDS.items() if f)
            raise ScheduleError(
                f"Adaptive rule {_fmt(self.rule)} does not use {', '.join(unused)}",
                fix=f"remove them or pick the rule that uses them ({uses})",
            )
        if rule == "ratio" and (self.target is None or self.target <= 0):
            raise ScheduleError(
                f"Adaptive rule 'ratio' needs target > 0, got {self.target!r}",
                fix="give target=<the metric value to aim for>",
            )
        if rule == "threshold" and self.threshold is None:
            raise ScheduleError(
                "Adaptive rule 'threshold' needs threshold=", fix="give threshold=<metric value>"
            )
        if rule == "balance" and not self.reference:
            raise ScheduleError(
                "Adaptive rule 'balance' needs reference=", fix="give reference=<metric name>"
            )
        if not 0.0 <= self.min_factor <= self.max_factor:
            raise ScheduleError(
                f"Adaptive factors min_factor={self.min_factor!r}, max_factor={self.max_factor!r}",
                fix="give 0 <= min_factor <= max_factor",
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ScheduleError(
                f"Adaptive momentum={self.momentum!r} is outside [0, 1)", fix="give 0 <= momentum < 1"
            )

    def _range(self, a: float, b: float) -> tuple[float, float] | None:
        rule = self._rule_name
        if rule in ("ratio", "balance"):
            return _times(self.base._range(a, b), self.min_factor, self.max_factor)
        if rule == "threshold":
            return _hull(self.base._range(a, b), (self.off, self.off))
        return None

    # ---- run state

    def report(self, name: str, value: float) -> None:
        if not isinstance(name, str):
            raise ScheduleError(
                f"report name {name!r} is not a string", fix="report(name: str, value: float)"
            )
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ScheduleError(
                f"reported {name}={_short(value)} is not a number", fix="report a float (e.g. tensor.item())"
            ) from None
        if not math.isfinite(v):
            raise ScheduleError(f"reported {name}={v!r} to {self}", fix="report finite metric values")
        self._state.history.setdefault(name, []).append(v)
        self._state.pending.setdefault(name, []).append(v)
        super().report(name, value)

    def reset(self) -> None:
        self._state = _RunState()
        super().reset()

    @property
    def history(self) -> dict[str, list[float]]:
        """Every value reported this run, per name, oldest first (a copy)."""
        return {k: list(v) for k, v in self._state.history.items()}

    @property
    def trace(self) -> list[tuple[int, float]]:
        """``(step, value)`` for each step evaluated this run (a copy), e.g. for a plot."""
        return list(self._state.trace)

    def _eval(self, pt: _Point) -> float:
        st = self._state
        if st.step is not None:
            if pt.num_steps != st.num_steps or pt.step < st.step:
                raise ScheduleError(
                    f"{self} was at step {st.step} of {st.num_steps} and is now asked for step {pt.step} of "
                    f"{pt.num_steps}",
                    fix="call reset() on the schedule before a new run",
                )
            if pt.step == st.step:
                return st.value
        for name, reported in st.pending.items():
            v = sum(reported) / len(reported)  # a step's several model calls (the midpoint step) report each
            prev = st.smoothed.get(name)
            st.smoothed[name] = v if prev is None else self.momentum * prev + (1.0 - self.momentum) * v
        st.pending.clear()
        base = self.base._evaluate(pt)
        value = self._apply(pt, base)
        st.num_steps, st.step, st.value = pt.num_steps, pt.step, value
        st.trace.append((pt.step, value))
        return value

    def _factor(self, num: float, den: float) -> float:
        if den <= 0.0:
            return self.max_factor
        return _clamp(num / den, self.min_factor, self.max_factor)

    def _apply(self, pt: _Point, base: float) -> float:
        st = self._state
        m = st.smoothed.get(self.metric)
        rule = self._rule_name
        lower = self.goal == "lower"
        if rule == "ratio":
            if m is None:
                return base
            return base * (self._factor(m, self.target) if lower else self._factor(self.target, m))
        if rule == "balance":
            ref = st.smoothed.get(self.reference)
            return base if m is None or ref is None else base * self._factor(ref, m)
        if rule == "threshold":
            if m is not None and (m <= self.threshold if lower else m >= self.threshold):
                st.latched = st.latched or self.latch
                return self.off
            return self.off if st.latched else base
        out = self.rule(pt.progress, base, self.history)
        if not _is_real(out) and not hasattr(out, "__float__"):
            raise ScheduleError(
                f"the rule {_fmt(self.rule)} of {self} returned {_short(out)}", fix="make it return a float"
            )
        return float(out)


# ------------------------------------------------------------------------------------ union and parsing

ScheduleSpec = Annotated[
    Union[Constant, Linear, Cosine, Window, Piecewise, Adaptive, Scaled],
    Field(discriminator="kind"),
]
"""Discriminated union of every schedule kind (tag: ``kind``), for pydantic fields and JSON."""

KINDS: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "window": Window,
    "piecewise": Piecewise,
    "adaptive": Adaptive,
    "scaled": Scaled,
}
"""Schedule classes by ``kind`` (also the shorthand function names)."""

for _cls in KINDS.values():
    _cls.model_rebuild()
_SPEC: TypeAdapter[Schedule] = TypeAdapter(ScheduleSpec)

ScheduleField = Annotated[ScheduleSpec, BeforeValidator(_coerce_schedule), Field(validate_default=True)]
"""Pydantic field type for a strength: accepts every :func:`as_schedule` form, stores a Schedule."""


def adaptive_parts(schedule: Schedule) -> list[Adaptive]:
    """The :class:`Adaptive` schedules in ``schedule`` (itself, or inside a window, a scaling, a piecewise...)."""
    found = [schedule] if isinstance(schedule, Adaptive) else []
    for child in schedule._children():
        found.extend(adaptive_parts(child))
    return found


def bounded(lo: float | None = None, hi: float | None = None) -> Any:
    """Pydantic field type for a strength whose values must stay in ``[lo, hi]``.

    ``class SoftPAGConfig(BaseModel): u: bounded(0, 1) = 0.5`` -- defaults are validated too.
    """
    return Annotated[ScheduleField, AfterValidator(lambda s: s.checked(lo, hi))]


def from_json(data: Mapping[str, Any] | str | bytes) -> Schedule:
    """Build any schedule from its JSON dict or text (same as ``Schedule.from_json``)."""
    return Schedule.from_json(data)


def as_schedule(x: Any, lo: float | None = None, hi: float | None = None) -> Schedule:
    """A schedule from a number, a schedule, a JSON dict or a shorthand string; bounded if lo/hi given."""
    if isinstance(x, Schedule):
        sched = x
    elif _is_real(x):
        sched = Constant(float(x))
    elif isinstance(x, Mapping):
        sched = Schedule.from_json(x)
    elif isinstance(x, str):
        sched = parse_schedule(x)
    else:
        raise ScheduleError(f"cannot make a schedule from {type(x).__name__} {_short(x)}", fix=_ACCEPTED)
    return sched if lo is None and hi is None else sched.checked(lo, hi)


def parse_schedule(text: str) -> Schedule:
    """Read a shorthand string: a number, ``kind(args, name=value)`` calls (nested), ``number * schedule``.

    Kinds are the lowercase class names; positional arguments follow the class (``linear(start, end)``,
    ``window(value, start, stop)``, ``piecewise(points, interpolation)``, ``adaptive(base, rule)``,
    ``scaled(inner, factor)``). JSON text starting with ``{`` is read as the JSON form. Nothing is
    evaluated as Python: the string is parsed and only these forms are accepted.
    """
    s = text.strip()
    if not s:
        raise ScheduleError("empty schedule string", fix=_ACCEPTED)
    if s.startswith("{"):
        return Schedule.from_json(s)
    try:
        node = ast.parse(s, mode="eval").body
    except SyntaxError as e:
        raise ScheduleError(f"cannot parse schedule {text!r}: {e.msg}", fix=_ACCEPTED) from None
    out = _build(node, s)
    if _is_real(out):
        return Constant(out)
    if isinstance(out, Schedule):
        return out
    raise ScheduleError(f"{text!r} is not a schedule", fix=_ACCEPTED)


def _build(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _build(node.operand, text)
        if _is_real(v):
            return -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_build(e, text) for e in node.elts)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = _build(node.left, text), _build(node.right, text)
        if _is_real(left) and _is_real(right):
            return left * right
        if _is_real(left) and isinstance(right, Schedule):
            return Scaled(right, left)
        if isinstance(left, Schedule) and _is_real(right):
            return Scaled(left, right)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = KINDS.get(node.func.id.lower())
        if cls is None:
            raise ScheduleError(
                f"unknown schedule kind {node.func.id!r} in {text!r}", fix=f"use one of {', '.join(KINDS)}"
            )
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise ScheduleError(f"*args/**kwargs are not allowed in {text!r}", fix="write the arguments out")
        args = [_build(a, text) for a in node.args]
        kwargs = {k.arg: _build(k.value, text) for k in node.keywords}
        return cls(*args, **kwargs)
    elif isinstance(node, ast.Name) and node.id.lower() in ("nan", "inf", "infinity"):
        raise ScheduleError(
            f"{node.id!r} in schedule {text!r} is not a finite number",
            fix="use finite numbers; NaN and inf are not allowed in a schedule",
        )
    part = ast.get_source_segment(text, node) or type(node).__name__
    raise ScheduleError(f"cannot read {part!r} in schedule {text!r}", fix=_ACCEPTED)
