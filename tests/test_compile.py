"""attnctl on a torch.compile'd transformer: the same images as uncompiled, no recompile from step to step, the
wrapped forward still compiled, and a clear error for fullgraph=True.

dynamo runs here with its "eager" / "aot_eager" backends: they trace and split the model exactly as inductor does
(which graphs, which guards, which breaks) without generating code, so the tests stay fast; bench/compile.py times
inductor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo

import attnctl
from attnctl import AttentionProbe, AttentionRegulation, LayoutGuidance, SoftPAG, UnifyEdit, ValueSharing, edit
from attnctl.errors import ConfigError
from attnctl.sites import family_of, list_sites, uncompiled
from attnctl.toyworld.models import default_call_kwargs

PROMPT = "a red circle and a blue square"
BOXES = {"circle": [0.0, 0.0, 0.5, 0.5], "square": [0.5, 0.5, 1.0, 1.0]}
CONTROLS: dict[str, Callable[[], list]] = {
    # processors only (the probe records, regulation changes the attention)
    "probe+regulation": lambda: [AttentionProbe(words=["circle"]), AttentionRegulation(targets=["circle", "square"])],
    "softpag": lambda: [SoftPAG(heads="all", scale=2.0)],  # a forward wrapper: the perturbed rows in the batch
    "layout": lambda: [LayoutGuidance(boxes=BOXES, scale=0.5, iterations=1)],  # a gradient pass before each step
}


class CountingBackend:
    """dynamo's eager backend, counting the runs of the graphs it made."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def generate(pipe, controls: list, steps: int = 4) -> torch.Tensor:
    kw = {**default_call_kwargs(pipe), "num_inference_steps": steps}
    return pipe(PROMPT, controls=controls, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kw).images


def compile_transformer(pipe, how: str, backend) -> None:
    if how == "torch.compile":
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    elif how == "in place":
        pipe.transformer.compile(backend=backend)
    else:
        pipe.transformer.compile_repeated_blocks(backend=backend)


@pytest.fixture
def fresh_pipe(request):
    """A toy pipeline of its own (compiling changes the transformer), and dynamo's caches cleared after the test."""
    from attnctl.toyworld.models import load_pipeline

    torch._dynamo.reset()
    yield lambda name: load_pipeline(name)
    torch._dynamo.reset()


def test_a_compiled_wrapper_is_seen_through():
    from attnctl.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    inner = pipe.transformer
    pipe.transformer = torch.compile(inner, backend="eager")
    assert uncompiled(pipe.transformer) is inner and family_of(pipe.transformer) == "flux"
    assert [s.name for s in list_sites(pipe.transformer)] == [s.name for s in list_sites(inner)]
    ctl = attnctl.Controller(pipe, [AttentionProbe(tokens=[0])])
    assert ctl.transformer is inner  # processors and wrappers go on the module the compiled one calls


@pytest.mark.parametrize(("model", "how"), [("toy-sd3", "torch.compile"), ("toy-flux", "regional")])
def test_controls_on_a_compiled_transformer_give_the_uncompiled_images_and_no_recompiles(fresh_pipe, model, how):
    pipe = fresh_pipe(model)
    stock = generate(pipe, [], steps=3)
    expected = {name: (generate(pipe, make(), steps=3), generate(pipe, make(), steps=5))
                for name, make in CONTROLS.items()}
    for name, (three, _) in expected.items():  # every control changes the image, so an idle one would be caught
        assert (three - stock).abs().max() > 1e-3, name
    compile_transformer(pipe, how, "eager")
    for name, make in CONTROLS.items():
        assert torch.equal(generate(pipe, make(), steps=3), expected[name][0]), name
        # other steps, a new control object: the compiled code from 3 steps serves 5 without a recompile, so no
        # guard of the compiled model depends on the step, the schedule or the control
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(generate(pipe, make(), steps=5), expected[name][1]), name


def test_isolation_and_epipolar_on_a_compiled_transformer_give_the_uncompiled_images(fresh_pipe):
    """The controls with extra rows in the call: reference prompts (isolation) and the views of a rig (epipolar
    attention reads the other views' keys block-sparsely)."""
    from attnctl import Camera, EpipolarAttention, IsolationAttention

    pipe = fresh_pipe("toy-flux")
    kw = {**default_call_kwargs(pipe), "num_inference_steps": 2, "output_type": "pt"}
    cams = [Camera.look_at([0, 0, 0], [0, 0, 1], size=(32, 32)),
            Camera.look_at([0.3, 0, 0], [0.3, 0, 1], size=(32, 32), up=[1.0, 0.0, 0.0])]
    cases = {
        "isolation": (lambda: [IsolationAttention(subjects=["red circle", "blue square"], references=True)],
                      {"prompt": ["a red circle", "a blue square", PROMPT]}),
        "epipolar": (lambda: [EpipolarAttention(cameras=cams)], {"prompt": PROMPT, "num_images_per_prompt": 2}),
    }

    def run(make, args):
        return pipe(controls=make(), generator=torch.Generator().manual_seed(0), **args, **kw).images

    expected = {name: run(make, args) for name, (make, args) in cases.items()}
    for name, (_, args) in cases.items():
        assert (expected[name] - run(list, args)).abs().max() > 1e-3, name  # the control does something
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    for name, (make, args) in cases.items():
        assert torch.equal(run(make, args), expected[name]), name
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(run(make, args), expected[name]), name


def test_the_forward_a_wrapper_calls_is_still_compiled(fresh_pipe):
    pipe = fresh_pipe("toy-sd3")
    backend = CountingBackend()
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    generate(pipe, [], steps=2)
    backend.runs = 0
    generate(pipe, [], steps=2)
    assert backend.runs == 2  # the stock model: one graph per step
    generate(pipe, [AttentionProbe(words=["circle"])], steps=2)
    backend.runs = 0
    generate(pipe, [AttentionProbe(words=["circle"])], steps=2)
    per_step = backend.runs / 2
    assert per_step > 2  # split at every controlled site, each piece still compiled
    generate(pipe, [SoftPAG(heads="all", scale=2.0)], steps=2)
    backend.runs = 0
    generate(pipe, [SoftPAG(heads="all", scale=2.0)], steps=2)
    # the wrapper's own code runs eagerly, the transformer it calls runs the same compiled pieces
    assert backend.runs / 2 == per_step
    backend.runs = 0
    generate(pipe, [], steps=2)
    assert backend.runs > 2  # the documented limit: a stock run now takes the split code of the controlled runs
    torch._dynamo.reset()  # ... and the documented way back to one graph
    generate(pipe, [], steps=2)
    backend.runs = 0
    generate(pipe, [], steps=2)
    assert backend.runs == 2


def test_an_edit_on_a_compiled_transformer_equals_the_uncompiled_edit(fresh_pipe, scene):
    pipe = fresh_pipe("toy-flux")
    source, target = PROMPT, "a green circle and a blue square"

    def run():  # the gradient pass, the two branches and value sharing's source rows: all through the model
        return edit(pipe, scene, source, target, 4, control=UnifyEdit(sites="mid"), share=ValueSharing(),
                    output_type="latent").edited

    expected = run()
    # regional: blocks compiled in place, called by the wrapper's eager code; aot_eager: autograd through compiled
    # pieces, each loss differentiated alone (in place on toy-sd3: tests/test_cli.py, attnctl edit --compile)
    compile_transformer(pipe, "regional", "aot_eager")
    assert torch.allclose(run(), expected, atol=1e-5, rtol=0)


def test_fullgraph_is_refused_with_the_way_out(fresh_pipe):
    pipe = fresh_pipe("toy-sd3")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    generate(pipe, [], steps=1)  # no control: the stock processors, one graph
    with pytest.raises(ConfigError, match="fullgraph=True.*Fix: compile without fullgraph"):
        generate(pipe, [AttentionProbe(words=["circle"])], steps=1)
    with pytest.raises(ConfigError, match="fullgraph=True"), attnctl.attach(pipe, [SoftPAG(heads="all", scale=2.0)]):
        pipe(PROMPT, **{**default_call_kwargs(pipe), "num_inference_steps": 1})
    assert type(uncompiled(pipe.transformer).transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"
