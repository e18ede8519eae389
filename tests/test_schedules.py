import json
import math
import pickle

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from attnctl.errors import AttnCtlError, ConfigError, ScheduleError
from attnctl.schedules import (
    Adaptive,
    Constant,
    Cosine,
    Linear,
    Piecewise,
    Scaled,
    Schedule,
    ScheduleField,
    ScheduleSpec,
    Window,
    as_schedule,
    bounded,
    from_json,
    progress_of,
)

N = 5  # steps 0..4: first, middle (2) and last have progress 0, 0.5, 1


def ends(s, n=N):
    return s(0, n), s(n // 2, n), s(n - 1, n)


# ------------------------------------------------------------------------------------------------ values


def test_progress():
    assert [progress_of(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress_of(0, 1) == 0.0
    for step, n in [(5, 5), (-1, 5), (0, 0), (True, 5), (1.5, 5)]:
        with pytest.raises(ScheduleError, match="step"):
            Constant(1.0)(step, n)


def test_constant_linear_cosine():
    assert ends(Constant(0.7)) == (0.7, 0.7, 0.7)
    assert ends(Linear(1, 0)) == (1.0, 0.5, 0.0)
    assert ends(Linear(0.1, 0.7)) == (0.1, pytest.approx(0.4), 0.7)  # ends exact
    assert ends(Cosine(2, 0)) == (2.0, pytest.approx(1.0), 0.0)
    assert Cosine(1, 0)(1, N) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert Linear(3, 1)(0, 1) == 3.0  # a one-step run is at progress 0


def test_window():
    assert Window(2.0, 0.0, 0.5).values(N) == [2.0, 2.0, 0.0, 0.0, 0.0]  # stop excluded
    assert Window(2.0, 0.5, 1.0).values(N) == [0.0, 0.0, 2.0, 2.0, 2.0]  # stop == 1 includes the last step
    assert Window(2.0, 0.25, 0.75, off=1.0).values(N) == [1.0, 2.0, 2.0, 1.0, 1.0]
    # inner schedule on the run's clock, or rescaled to the window
    assert Window(Linear(1, 0), 0.0, 0.5).values(N) == [1.0, 0.75, 0.0, 0.0, 0.0]
    assert Window(Linear(1, 0), 0.0, 0.5, rescale=True).values(N) == [1.0, 0.5, 0.0, 0.0, 0.0]
    # first k of n steps with stop = k/n, as in diffusers guiders
    assert Window(1.0, 0.0, 3 / 10).values(10) == [1.0] * 3 + [0.0] * 7
    for bad, msg in [
        ((1.0, 0.0, 5), "fraction"),
        ((1.0, 0.6, 0.4), "before"),
        ((1.0, -0.1, 0.5), "fraction"),
    ]:
        with pytest.raises(ScheduleError, match=msg):
            Window(*bad)


def test_piecewise_and_scaled():
    pts = [(0.0, 1.0), (0.5, 0.2), (1.0, 0.0)]
    assert ends(Piecewise(pts)) == (1.0, 0.2, 0.0)
    assert Piecewise(pts).values(N)[1] == pytest.approx(0.6)
    assert Piecewise(pts, "step").values(N) == [1.0, 1.0, 0.2, 0.2, 0.0]
    assert Piecewise([(0.25, 3.0), (0.75, 1.0)]).values(N) == [3.0, 3.0, 2.0, 1.0, 1.0]  # holds outside
    assert ends(Scaled(Linear(1, 0), 2.0)) == (2.0, 1.0, 0.0)
    assert 2 * Linear(1, 0) == Linear(1, 0) * 2 == Scaled(Linear(1, 0), 2.0)
    with pytest.raises(ScheduleError, match="increasing"):
        Piecewise([(0.5, 1.0), (0.2, 0.0)])
    with pytest.raises(ScheduleError, match="outside"):
        Piecewise([(0.0, 1.0), (1.5, 0.0)])
    with pytest.raises(ScheduleError, match="no points"):
        Piecewise([])


# ------------------------------------------------------------------------------------------------- JSON

ALL = [
    Constant(0.7),
    Linear(1, 0),
    Cosine(0.5, 0, lo=0, hi=1),
    Window(2.0, 0.0, 0.5),
    Window(Linear(1, 0), 0.0, 0.5, off=0.1, rescale=True),
    Piecewise([(0, 1), (0.5, 0.2), (1, 0)], "step"),
    Scaled(Window(Cosine(1, 0), 0.2, 1.0), 3.0),
    Adaptive(Linear(1, 0.5), "ratio", target=0.3, max_factor=4.0),
    Adaptive(Window(1.0, 0, 0.5), "threshold", threshold=0.9, latch=True),
    Window(Adaptive(Constant(1.0), "balance", reference="sa", metric="ca", momentum=0.5), 0.1, 0.9),
]


@pytest.mark.parametrize("s", ALL, ids=str)
def test_json_round_trip(s):
    data = s.to_json()
    assert next(iter(data)) == "kind"
    text = json.dumps(data)
    back = from_json(json.loads(text))
    assert back == s and type(back) is type(s)
    assert Schedule.from_json(text) == s
    assert back.values(7) == s.values(7)
    assert as_schedule(str(s)) == s  # the shorthand round-trips too
    assert TypeAdapter(ScheduleSpec).validate_python(data) == s


def test_json_schema_and_subclass_from_json():
    assert "adaptive" in json.dumps(TypeAdapter(ScheduleSpec).json_schema())
    assert Linear.from_json({"kind": "linear", "start": 1, "end": 0}) == Linear(1, 0)
    with pytest.raises(ScheduleError, match="Schedule.from_json"):
        Linear.from_json({"kind": "cosine", "start": 1, "end": 0})


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"kind": "spline", "points": []}, "unknown kind 'spline'"),
        ({"start": 1, "end": 0}, "no 'kind'"),
        ({"kind": "linear", "start": 1, "stat": 0}, "unknown field 'stat'"),
        ({"kind": "window", "value": {"kind": "linear", "start": float("nan"), "end": 0}}, "nan"),
        ({"kind": "adaptive", "base": 1.0, "rule": "magic"}, "rule 'magic' is unknown"),
        ("[1, 2", "does not parse"),
        ([1, 2], "dict with a 'kind'"),
        ({"kind": "constant", "value": True}, "value=True is a true/false flag, not a number"),  # not taken as 1.0
        ({"kind": "linear", "start": 1, "end": "0"}, "end='0' is a string, not a number"),
    ],
)
def test_bad_json(data, msg):
    with pytest.raises(ScheduleError, match=msg):
        from_json(data)


# ------------------------------------------------------------------------------------------- as_schedule


def test_as_schedule_forms():
    s = Linear(1, 0)
    assert as_schedule(s) is s
    assert as_schedule(0.7) == as_schedule(" 0.7 ") == Constant(0.7)
    assert as_schedule(2) == Constant(2.0)
    assert as_schedule({"kind": "linear", "start": 1, "end": 0}) == s
    assert as_schedule("linear(1, 0)") == s
    assert as_schedule("cosine(0.5, 0)") == Cosine(0.5, 0)
    assert as_schedule("window(2.0, 0, 0.5)") == Window(2.0, 0, 0.5)
    assert as_schedule("Window(linear(1, -1), stop=0.5, off=-1)") == Window(Linear(1, -1), 0.0, 0.5, off=-1.0)
    assert as_schedule("piecewise([(0, 1), (1, 0)], 'step')") == Piecewise([(0, 1), (1, 0)], "step")
    assert as_schedule("2 * cosine(1, 0)") == Scaled(Cosine(1, 0), 2.0)
    assert as_schedule("adaptive(1, 'ratio', target=0.5)") == Adaptive(Constant(1.0), "ratio", target=0.5)
    assert as_schedule('{"kind": "constant", "value": 3}') == Constant(3.0)
    assert as_schedule("linear(2, 0)", lo=0, hi=2).hi == 2.0


@pytest.mark.parametrize(
    "x, msg",
    [
        (None, "NoneType"),
        (True, "bool"),
        ([0.1, 0.2], "list"),
        ("", "empty"),
        ("nan", "not a finite number"),
        ("1e999", "inf"),
        ("linear(1", "cannot parse"),
        ("spline(1, 0)", "unknown schedule kind 'spline'"),
        ("linear(1, 2, 3)", "at most 2 positional"),
        ("linear(1, 0, start=2)", "twice"),
        ("__import__('os').system('true')", "cannot read"),
        ("'text'", "is not a schedule"),
        ("linear(*[1, 0])", r"\*args"),
    ],
)
def test_as_schedule_bad(x, msg):
    with pytest.raises(ScheduleError, match=msg) as info:
        as_schedule(x)
    assert "Fix:" in str(info.value)


# --------------------------------------------------------------------------------------- finite / bounds


@pytest.mark.parametrize(
    "build",
    [
        lambda: Constant(float("nan")),
        lambda: Linear(1, float("inf")),
        lambda: Cosine(-float("inf"), 0),
        lambda: Window(float("nan"), 0, 0.5),
        lambda: Window(1.0, 0, 0.5, off=float("nan")),
        lambda: Piecewise([(0, 1), (1, float("nan"))]),
        lambda: Scaled(Linear(1, 0), float("inf")),
        lambda: Adaptive(1.0, "ratio", target=float("nan")),
        lambda: Window(Linear(float("nan"), 0), 0, 0.5),
        lambda: Linear(1, 0, lo=float("nan")),
    ],
)
def test_non_finite_rejected_at_construction(build):
    with pytest.raises(ScheduleError, match="nan|inf"):
        build()


def test_checked():
    assert Linear(1, 0).checked(0, 1)(4, N) == 0.0
    with pytest.raises(ScheduleError) as info:
        Linear(1, -0.5).checked(0, 1)
    text = str(info.value)
    assert "linear(1.0, -0.5" in text and "-0.5" in text and "[0.0, 1.0]" in text
    with pytest.raises(ScheduleError, match="1.5"):
        Piecewise([(0, 0), (0.5, 1.5), (1, 0)]).checked(hi=1)
    with pytest.raises(ScheduleError, match="off"):  # a window is 0 outside: not in [0.5, 2]
        Window(1.0, 0.0, 0.5).checked(0.5, 2)
    Window(1.0, 0.0, 1.0).checked(0.5, 2)  # never off
    Window(Linear(1, -1), 0.0, 0.5).checked(0, 1)  # only the part inside the window counts
    with pytest.raises(ScheduleError, match="-1.5"):
        (3 * Linear(1, -0.5)).checked(-1, 3)
    # named adaptive rules know their range: base * [min_factor, max_factor]
    with pytest.raises(ScheduleError, match="reaches 1.6"):
        Adaptive(Constant(0.8), "ratio", target=0.5).checked(0, 1)
    Adaptive(Constant(0.8), "ratio", target=0.5, max_factor=1.25).checked(0, 1)
    # bounds intersect; non-overlapping bounds and bad bounds are errors
    assert Constant(0.5).checked(0, 1).checked(-1, 0.8).hi == 0.8
    with pytest.raises(ScheduleError, match="overlap"):
        Constant(0.5).checked(0, 1).checked(2, 3)
    with pytest.raises(ScheduleError, match="bound"):
        Constant(0.5).checked(float("nan"), 1)
    with pytest.raises(ScheduleError, match="above"):
        Constant(0.5, lo=1, hi=0)


def test_checked_callable_at_evaluation():
    s = Adaptive(Constant(0.5), lambda p, base, hist: base + 2 * p).checked(0, 1)
    assert s(0, 3) == 0.5
    with pytest.raises(ScheduleError, match=r"1\.5.*step 1 of 3.*\[0\.0, 1\.0\]"):
        s(1, 3)
    nan_rule = Adaptive(Constant(0.5), lambda p, base, hist: float("nan"))
    with pytest.raises(ScheduleError, match="nan"):
        nan_rule(0, 3)


# ---------------------------------------------------------------------------------------------- adaptive


def test_ratio_rule_reports_and_reset():
    s = Adaptive(Linear(1.0, 0.5), "ratio", target=0.5, min_factor=0.5, max_factor=3.0)
    assert s(0, 3) == 1.0  # no report yet: the base
    s.report("value", 0.25)  # below target: push harder (x2)
    s.report("other", 7.0)  # other names are kept, not used
    assert s(1, 3) == pytest.approx(0.75 * 2)
    s.report("value", 0.05)  # would be x10: clamped to max_factor
    assert s(1, 3) == pytest.approx(1.5)  # same step: same value, reports wait for the next step
    assert s(2, 3) == pytest.approx(0.5 * 3.0)
    assert s.history == {"value": [0.25, 0.05], "other": [7.0]}
    assert [st for st, _ in s.trace] == [0, 1, 2]
    with pytest.raises(ScheduleError, match="reset"):
        s(0, 3)  # a new run without reset()
    s.reset()
    assert s.history == {} and s(0, 3) == 1.0
    assert s(1, 3, report={"value": 1.0}) == pytest.approx(0.75 * 0.5)  # report= counts at once
    with pytest.raises(ScheduleError, match="reset"):
        s(2, 5)  # different length without reset()


def test_threshold_latch_balance_momentum():
    gate = Adaptive(Constant(2.0), "threshold", threshold=0.8, latch=True)
    got = [gate(i, 5, report={"value": m}) for i, m in enumerate([0.1, 0.5, 0.9, 0.2, 0.3])]
    assert got == [2.0, 2.0, 0.0, 0.0, 0.0]  # latched off once reached
    gate = Adaptive(Constant(2.0), "threshold", threshold=0.8)
    assert [gate(i, 3, report={"value": m}) for i, m in enumerate([0.9, 0.2, 0.3])] == [0.0, 2.0, 2.0]

    bal = Adaptive(Constant(1.0), "balance", metric="ca", reference="sa", max_factor=10)
    assert bal(0, 3, report={"ca": 2.0}) == 1.0  # reference not reported yet
    assert bal(1, 3, report={"sa": 6.0}) == pytest.approx(3.0)
    assert bal(2, 3, report={"ca": 0.0}) == 10.0  # metric <= 0: max_factor

    ema = Adaptive(Constant(1.0), "ratio", target=1.0, momentum=0.5, max_factor=10)
    ema(0, 3, report={"value": 1.0})
    assert ema(1, 3, report={"value": 0.2}) == pytest.approx(1 / 0.6)


def test_a_loss_the_control_lowers_and_several_reports_in_one_step():
    """``goal="lower"``: the threshold switches off once the loss is low enough, and the ratio pushes harder while
    the loss is above its target (the plain rules read a metric the control raises). Several reports in one step
    (the midpoint scheduler's two calls) count as their mean."""
    gate = Adaptive(1.0, "threshold", metric="loss", threshold=0.2, goal="lower")
    assert [gate(i, 4, report={"loss": m}) for i, m in enumerate([0.9, 0.5, 0.1, 0.4])] == [1.0, 1.0, 0.0, 1.0]
    push = Adaptive(1.0, "ratio", metric="loss", target=0.5, goal="lower", max_factor=4)
    assert push(0, 3, report={"loss": 1.0}) == 2.0  # the loss is twice its target: twice the strength
    assert push(1, 3, report={"loss": 0.25}) == 0.5
    mean = Adaptive(1.0, "ratio", metric="loss", target=1.0, goal="lower", max_factor=10)
    mean(0, 2)
    mean.report("loss", 1.0)
    mean.report("loss", 3.0)
    assert mean(1, 2) == 2.0 and mean.history == {"loss": [1.0, 3.0]}
    assert str(from_json(gate.to_json())) == str(gate) and str(gate).endswith("goal='lower')")
    with pytest.raises(ScheduleError, match="does not use goal"):
        Adaptive(1.0, "balance", reference="sa", goal="lower")


def test_scalars_of_the_wrong_kind_are_refused_in_schedules_and_controls():
    """A quoted number, a flag for a number or a number for a flag: pydantic alone took them (``"7"`` → 7,
    ``"no"`` → False), in a schedule's points and flags and in every control's settings."""
    import attnctl

    for data, msg in [({"kind": "piecewise", "points": [["0", 1], [0.5, 0.2]]}, r"points\[0\]\[0\]='0' is a string"),
                      ({"kind": "window", "value": 1, "stop": 0.5, "rescale": "yes"}, "rescale='yes' is a string"),
                      ({"kind": "window", "value": 1, "stop": 0.5, "rescale": 1}, "rescale=1 is int, not true"),
                      ({"kind": "adaptive", "base": 1, "rule": "threshold", "threshold": 1, "latch": "no"}, "latch")]:
        with pytest.raises(ScheduleError, match=msg):
            from_json(data)
    for data, msg in [({"kind": "regulation", "targets": ["circle"], "iterations": "3"}, "iterations='3' is a string"),
                      ({"kind": "regulation", "targets": ["circle"], "keep_best": "no"}, "keep_best='no'"),
                      ({"kind": "layout", "boxes": {"circle": ["0", 0, 1, 1]}}, r"boxes\['circle'\]\[0\]='0'"),
                      ({"kind": "isolation", "subjects": ["a", "b"], "seed": True}, "seed=True is a true/false flag"),
                      ({"kind": "probe", "words": ["circle"], "heads": [True]}, r"heads\[0\]=True"),
                      ({"kind": "epipolar", "rig": {"kind": "stereo", "roll": "90"}}, "roll='90' is a string")]:
        with pytest.raises(ConfigError, match=msg):
            attnctl.control_from_json(data)
    assert attnctl.control_from_json({"kind": "regulation", "targets": ["circle"], "iterations": 3, "lr": 50,
                                      "steps": "window(1, 0, 0.5)"}).config.lr == 50.0  # ints for floats: fine
    import numpy as np
    import torch

    reg = attnctl.AttentionRegulation(targets=["a"], keep_best=np.bool_(False), per_head=torch.tensor(True))
    assert reg.config.keep_best is False  # numpy's and torch's flags are flags
    with pytest.raises(ConfigError, match="lr=np.True_ is a true/false flag, not a number"):
        attnctl.AttentionRegulation(targets=["a"], lr=np.True_)
    with pytest.raises(ConfigError, match=r"sites\[1\]=3 is int, not a string"):  # not "sites=[...] is list"
        attnctl.AttentionProbe(words=["a"], sites=["L1", 3])
    with pytest.raises(ConfigError, match="iterations='2' is a string, not a number; lr='10' is a string"):  # every one
        attnctl.AttentionRegulation(targets=["a"], lr="10", iterations="2")
    with pytest.raises(ConfigError, match="invalid RegulationConfig — lr='5' is a string"):  # assigned: as built
        reg.config.lr = "5"


def test_adaptive_callable_history_and_json_refusal():
    seen = []

    def rule(progress, base, history):
        seen.append((progress, base, history))
        return base * (1 + len(history.get("loss", [])))

    s = Adaptive(Linear(1, 0), rule)
    assert s(0, 3) == 1.0
    s.report("loss", 3.0)
    assert s(1, 3) == pytest.approx(0.5 * 2)
    assert seen[-1] == (0.5, 0.5, {"loss": [3.0]})
    for obj in (s, Window(s, 0, 0.5)):
        with pytest.raises(ScheduleError, match=r"callable.*JSON.*Fix: use a named rule \('ratio'"):
            obj.to_json()


def test_adaptive_state_is_not_touched_by_values_and_is_reset_through_parents():
    inner = Adaptive(Constant(1.0), "ratio", target=1.0, max_factor=4)
    s = Window(inner, 0.0, 1.0)
    assert s(0, 4, report={"value": 0.5}) == 2.0
    assert s.values(4) == [1.0] * 4  # fresh copy, no reports
    assert s(1, 4) == 2.0  # run state intact
    s.reset()
    assert inner.history == {}


def test_adaptive_config_errors():
    with pytest.raises(ScheduleError, match="target > 0"):
        Adaptive(1.0, "ratio")
    with pytest.raises(ScheduleError, match="needs threshold"):
        Adaptive(1.0, "threshold")
    with pytest.raises(ScheduleError, match="needs reference"):
        Adaptive(1.0, "balance")
    with pytest.raises(ScheduleError, match="does not use threshold"):
        Adaptive(1.0, "ratio", target=1.0, threshold=0.5)
    with pytest.raises(ScheduleError, match="min_factor"):
        Adaptive(1.0, "ratio", target=1.0, min_factor=3.0)
    with pytest.raises(ScheduleError, match="momentum"):
        Adaptive(1.0, "ratio", target=1.0, momentum=1.0)
    s = Adaptive(1.0, "ratio", target=1.0)
    with pytest.raises(ScheduleError, match="finite"):
        s.report("value", float("nan"))
    with pytest.raises(ScheduleError, match="not a number"):
        s.report("value", "high")
    with pytest.raises(ScheduleError, match="mapping"):
        s(0, 3, report=[("value", 1.0)])


# ------------------------------------------------------------------------------------- pydantic, errors


def test_field_types_in_a_control_config():
    class Cfg(BaseModel):
        u: bounded(0, 1) = 0.5
        scale: ScheduleField = "linear(3, 1)"

    cfg = Cfg()
    assert cfg.u == Constant(0.5, lo=0.0, hi=1.0) and cfg.scale == Linear(3, 1)
    assert Cfg.model_validate_json(cfg.model_dump_json()) == cfg
    assert Cfg(u="cosine(1, 0)").u(4, N) == 0.0
    with pytest.raises(ValidationError, match="outside the allowed range"):
        Cfg(u=1.5)
    with pytest.raises(ValidationError, match="unknown schedule kind"):
        Cfg(scale="spline(1)")
    with pytest.raises(Exception, match="named rule"):
        Cfg(scale=Adaptive(1.0, lambda p, b, h: b)).model_dump_json()


def test_error_classes():
    e = ScheduleError("value is nan", fix="use a finite number")
    assert isinstance(e, ConfigError) and isinstance(e, AttnCtlError) and isinstance(e, ValueError)
    assert str(e) == "value is nan. Fix: use a finite number"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    assert str(ScheduleError("plain message")) == "plain message"
    with pytest.raises(ScheduleError, match="abstract"):
        Schedule()
