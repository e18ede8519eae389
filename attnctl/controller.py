"""The controller: per-run state, processor installation, and the link between controls and processors.

Two ways to use it::

    with attnctl.attach(pipe, [AttentionProbe(words=["circle"])]) as ctl:   # install, run, restore
        image = pipe("a red circle").images[0]
    maps = ctl.controls[0].word_maps()

    ctl = attnctl.Controller(pipe, controls)                 # the design card's plain-script usage
    pipe.transformer.set_attn_processor(ctl.processors())
    image = pipe("a red circle").images[0]
    ctl.restore()                         # the processors it replaced come back; the tracking hooks go

With a stock diffusers pipeline the controller follows the run by itself: a forward pre-hook on the
transformer reads the step from the scheduler, the image grid and text length from the inputs, and the
batch roles from the pipeline's guidance settings; a wrapper around ``check_inputs`` (the first thing a diffusers
pipeline call does) marks where each call starts, and one around ``encode_prompt`` records the call's prompt so
controls can name words. When a control asks for a perturbed branch (SoftPAG), the transformer's forward is
wrapped too (:class:`~attnctl.guidance.PerturbedBranch`): every call then runs the perturbed rows and returns the
guided predictions. :meth:`Controller.close` removes these; :meth:`Controller.restore` (and leaving ``attach``) also
puts back the processors the controller's replaced.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from . import compiling
from .controls.base import Control, RunState
from .errors import ConfigError, LayoutError, UnsupportedModelError
from .guidance import PerturbedBranch, perturbed_branches
from .latent_guidance import LatentGuidance, StopForward, check_scheduler
from .layout import TokenLayout, layout_for_pipeline
from .processors import AttnCtlProcessor, processor_for
from .processors.base import AttnCtlIPProcessor, SiteCall
from .processors.flux import AttnCtlIPFluxProcessor
from .processors.ip_adapter import SUPPORTED as IP_ADAPTERS
from .processors.sd3 import AttnCtlIPJointProcessor
from .sites import Site, family_of, list_sites, uncompiled


class Controller:
    """Holds the controls and the state of the current run for one pipeline or transformer."""

    def __init__(self, target: Any, controls: Sequence[Control] = (), *, roles: Sequence[str] | None = None,
                 layout: TokenLayout | None = None) -> None:
        if any(c.__name__ == "ModularPipeline" for c in type(target).__mro__):
            raise UnsupportedModelError(
                f"{type(target).__name__} is one of diffusers' modular pipelines, which attnctl does not follow yet: "
                "it reads a run's prompt and its CFG rows from the classic pipelines' encode_prompt and batch, "
                "which modular pipelines split into blocks and guider calls (controls would act on the wrong rows)",
                fix="load the classic pipeline (FluxPipeline / StableDiffusion3Pipeline.from_pretrained, or "
                    "attnctl.pipelines.AttnCtlFluxPipeline / AttnCtlSD3Pipeline) from the same weights")
        self.pipe = target if hasattr(target, "transformer") else None
        # a torch.compile wrapper calls into the module it compiles: processors and wrappers go on that module
        self.transformer = uncompiled(target.transformer if self.pipe is not None else target)
        self.family = family_of(self.transformer)
        self.sites: list[Site] = list_sites(self.transformer)
        controls = [controls] if isinstance(controls, Control) else list(controls or ())  # a generator: read once
        for c in controls:
            if not isinstance(c, Control):
                raise ConfigError(f"{c!r} is not an attnctl control; build controls from attnctl.controls")
        twice = sorted({type(c).__name__ for c in controls if sum(d is c for d in controls) > 1})
        if twice:
            raise ConfigError(f"the same {', '.join(twice)} object is in the controls twice; it would act twice on "
                              "every call", fix="list each control once (for a second one with other settings, make "
                                                "a second object)")
        self.controls: list[Control] = controls
        for c in self.controls:
            c.bind(self)
        self._fixed_roles = roles is not None
        self._fixed_layout = layout is not None
        # layouts and roles read from a pipeline's call: its uncond rows hold the negative prompt's tokens
        self.state = RunState(roles=list(roles) if roles is not None else None, layout=layout,
                              own_prompt_rows_only=self.pipe is not None and layout is None and roles is None)
        self._saved: dict[str, Any] | None = None
        self._entered = False  # inside this controller's with-block (see __enter__)
        self._installed: dict[str, AttnCtlProcessor] = {}  # the processors made last, by processor key
        self._mine: list[tuple[torch.nn.Module, AttnCtlProcessor, str]] = []  # bound sites' modules, processors
        self._hooks: list[Any] = []
        self._wrappers: dict[str, Any] = {}  # attnctl's wrappers put on the pipeline object, by method name
        self._replaced: dict[str, Any] = {}  # the user's own methods on the pipeline object they wrap, by name
        self._prompt: tuple[Any, Any, Any] | None = None  # the call's prompt, SD3's prompt_2 (CLIP-G), T5's prompt
        self._negative_embeds: torch.Tensor | None = None
        self._forwards = 0  # transformer forwards since the last encode_prompt
        self._row_layout_cache: tuple[tuple, list[TokenLayout]] | None = None
        self._layout_key: tuple | None = None  # what the run's layout was made from (its texts, lengths, grid)
        self._ids_seen: tuple[Any, int | None, tuple[tuple[int, int], int]] | None = None  # FLUX ids read, see _grid_of
        self._new_run = True
        self._branches = perturbed_branches(self.controls)  # checked here, before anything is installed
        self._check_branch_roles(roles)
        self._branch: PerturbedBranch | None = None  # the perturbed-branch wrapper while tracking, if one is needed
        self._latent_control = self._latent_guidance_control()
        self._latent: Any = None  # the latent-guidance wrapper while tracking, if one is needed
        self._stop_site = self._deepest_site(self._latent_control)

    def _check_branch_roles(self, roles: Sequence[str] | None) -> None:
        """Refuse ``roles=`` with a perturbed-branch control (SoftPAG) on a pipeline: with roles given the controller
        leaves the rows to the caller, and a pipeline's call has no perturbed rows, so the guidance would silently do
        nothing. (On a bare transformer the caller lays out the rows, or wraps the forward with PerturbedBranch.)"""
        if self._branches is None or roles is None or self.pipe is None:
            return
        names = ", ".join(sorted({type(c).__name__ for c in self.controls if getattr(c, "perturbed_branch", False)}))
        raise ConfigError(
            f"{names} needs perturbed batch rows, and with roles={list(roles)!r} attnctl leaves the rows of "
            f"{type(self.pipe).__name__}'s calls as they are: they have none, so the guidance would do nothing",
            fix="leave roles= out on a pipeline (attnctl reads the rows from the call and adds the perturbed ones); "
                "roles= is for a transformer you call yourself")

    def _latent_guidance_control(self) -> Control | None:
        found = [c for c in self.controls if getattr(c, "latent_guidance", False)]
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(type(c).__name__ for c in found)
            raise ConfigError(f"{len(found)} latent-guidance controls in one run ({names}); each would move the "
                              "latents on its own", fix="use one, and give it all the words and boxes")
        if self.pipe is None:
            raise ConfigError(
                f"{type(found[0]).__name__} moves the latents between steps, so it needs the pipeline (its "
                "scheduler), not a bare transformer",
                fix="pass the pipeline: attnctl.attach(pipe, ...), Controller(pipe, ...) or an attnctl pipeline")
        check_scheduler(self.pipe, type(found[0]).__name__)
        return found[0]

    def _deepest_site(self, control: Control | None) -> str | None:
        if control is None or not control.sites:
            return None
        order = {s.name: i for i, s in enumerate(self.sites)}
        return max(control.sites, key=lambda s: order[s.name]).name

    @contextlib.contextmanager
    def gradient_pass(self, rows: Sequence[int]) -> Iterator[None]:
        """A forward for latent guidance's loss on the batch ``rows`` of the current call (conditional rows): only
        the latent-guidance control acts, and the forward stops after its deepest site (:class:`StopForward`).
        Under torch.compile the pass's graphs keep their saved buffers, so a loss may be differentiated more than
        once (:func:`attnctl.compiling.differentiable_more_than_once`)."""
        with self.row_subset(rows, role="cond", gradient_pass=True), compiling.differentiable_more_than_once():
            yield

    @contextlib.contextmanager
    def row_subset(self, rows: Sequence[int], *, role: str | None = None, gradient_pass: bool = False
                   ) -> Iterator[None]:
        """A forward of the batch ``rows`` of the current call only: the run state's roles and per-row prompts are
        those rows' (every role ``role`` when given) until the block ends."""
        state = self.state
        saved = state.roles, state.row_layouts, state.gradient_pass
        if role is not None or state.roles is None:
            state.roles = [role or "cond"] * len(rows)
        else:
            state.roles = [state.roles[i] for i in rows]
        if state.row_layouts is not None:
            state.row_layouts = [state.row_layouts[i] for i in rows]
        state.gradient_pass = gradient_pass
        try:
            yield
        finally:
            state.roles, state.row_layouts, state.gradient_pass = saved

    # ------------------------------------------------------------------------------ processors
    def processors(self) -> dict[str, AttnCtlProcessor]:
        """One attnctl processor per site, keyed for ``transformer.set_attn_processor``.

        Each new processor keeps the attention backend of the processor it replaces, and the controller
        starts following runs of the pipeline (see the module docstring). Only the processors of sites some
        control acts at consult the controller. The processors they replace are remembered: :meth:`restore`
        puts them back. Called again before :meth:`restore` (to look at them, or to install them again), it returns
        the same processors."""
        self._check_alone()
        for c in self.controls:  # bound to another controller since (which has been left): bound here again
            if c.controller is not self:
                c.bind(self)
        self._branches = perturbed_branches(self.controls)  # (a copied or unpickled controller keeps none)
        if self._saved is not None:  # made before and not restored since: restore and the checks know these
            self._track()
            return dict(self._installed)
        current = self.transformer.attn_processors
        procs = {}
        for site in self.sites:
            # a site no control acts at gets a processor without the controller: the stock computation, with no
            # per-call lookup (and whole in the graph under torch.compile)
            ctl = self if any(c.applies_to(site) for c in self.controls) else None
            old = current.get(site.processor_key)
            if "IPAdapter" in type(old).__name__:
                if type(old).__name__ not in IP_ADAPTERS:
                    raise UnsupportedModelError(
                        f"site {site.name} runs {type(old).__name__}, an IP-adapter processor attnctl cannot carry "
                        f"over (it carries {', '.join(IP_ADAPTERS)})",
                        fix="unload it first (pipe.unload_ip_adapter()) or generate without attnctl controls")
                # its term is added by the new processor, which holds the adapter's weights under their own names
                carrier = AttnCtlIPFluxProcessor if site.family == "flux" else AttnCtlIPJointProcessor
                proc = carrier(site, ctl, old)
            else:
                proc = processor_for(site, ctl)
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(old, attr, None) is not None:
                    setattr(proc, attr, getattr(old, attr))
            procs[site.processor_key] = proc
        self._saved = dict(current)
        self._installed = dict(procs)
        modules = dict(self.transformer.named_modules())
        self._mine = [(modules[site.name], procs[site.processor_key], site.name) for site in self.sites
                      if procs[site.processor_key].controller is self]
        self._track()
        return procs

    def _check_installed(self) -> None:
        """Refuse a forward whose attention modules no longer run this controller's processors: something replaced
        them while it is attached (``fuse_qkv_projections``, ``load_ip_adapter``, ``set_attn_processor``), and the
        controls would silently stop acting there."""
        for module, proc, name in self._mine:
            now = getattr(module, "processor", None)
            if now is not proc:
                raise UnsupportedModelError(
                    f"the attention processor attnctl put at {name} was replaced by {type(now).__name__} while the "
                    "controller is attached (by fuse_qkv_projections, unfuse_qkv_projections, load_ip_adapter or "
                    "set_attn_processor inside attnctl.attach); the controls would silently stop acting there",
                    fix="do that before attaching (attnctl then carries it over), or after the with-block")

    @property
    def following(self) -> bool:
        """The controller follows the pipeline's runs (its processors were made and it is not closed)."""
        return bool(self._hooks)

    def _check_alone(self) -> None:
        """Refuse a second controller on a transformer another one follows: each would take the run's prompt, rows
        and forward for its own, and the controls of one would act on the other's rows."""
        ref = vars(self.transformer).get("_attnctl_controller")
        other = ref() if ref is not None else None
        if other is not None and other is not self:
            raise ConfigError(
                "another attnctl controller is already attached to this pipeline (attnctl.attach, an attnctl "
                "pipeline call's controls=, or set_attn_processor(ctl.processors())); two would each follow the run "
                f"(attached: {', '.join(type(c).__name__ for c in other.controls) or 'no controls'})",
                fix="put all the controls in one list — attnctl.attach(pipe, [a, b]) or pipe(..., controls=[a, b]) — "
                    "or leave the other one first (its with-block, or ctl.restore())")

    def install(self) -> Controller:
        """Install the processors, remembering the current ones for :meth:`restore`."""
        self.transformer.set_attn_processor(self.processors())
        return self

    def restore(self) -> None:
        """Put back the processors that were installed before :meth:`install` (or before :meth:`processors` made
        this controller's), and stop tracking.

        What the user changed meanwhile stays: an attention backend set on attnctl's processors passes to the
        processors put back, a processor that replaced attnctl's (``fuse_qkv_projections``, ``load_ip_adapter``)
        stays where it is, and diffusers' record for ``unfuse_qkv_projections`` gets the processors put back in
        place of attnctl's."""
        self._entered = False  # restored inside its with-block: that block is over for the controller
        if self._saved is not None:
            installed, saved = self._installed, self._saved
            back = {}
            for key, now in self.transformer.attn_processors.items():
                # replaced inside the block (fuse, unfuse, an IP-adapter): the user's choice stays; diffusers' PAG
                # processors, set for the length of a PAG call, are left only by a call that raised
                if installed.get(key) is not now and not type(now).__name__.startswith("PAG"):
                    back[key] = now
                    continue
                old = saved[key]
                for attr in ("_attention_backend", "_parallel_config"):  # set_attention_backend inside the block
                    if getattr(now, attr, None) is not getattr(old, attr, None):
                        setattr(old, attr, getattr(now, attr, None))
                back[key] = old
            self.transformer.set_attn_processor(back)
            originals = getattr(self.transformer, "original_attn_processors", None)
            if isinstance(originals, dict):  # fuse_qkv_projections inside the block saved attnctl's for its unfuse
                self.transformer.original_attn_processors = {
                    key: saved.get(key, proc) if installed.get(key) is proc else proc
                    for key, proc in originals.items()}
            self._saved = None
        self.close()

    @property
    def attached(self) -> bool:
        """Its processors are installed (made and not restored) or it follows the pipeline's runs."""
        return self._saved is not None or self.following

    def __deepcopy__(self, memo: dict) -> Controller:
        if self.attached:
            raise ConfigError(
                "a pipeline or transformer cannot be copied while an attnctl controller is attached to it: the copy's "
                "processors and hooks would follow this controller, not the copy's runs",
                fix="copy it before attnctl.attach, or after the with-block (or ctl.restore())")
        # a finished controller (an attnctl pipeline's pipe.attnctl) is copied with the pipeline, its controls too
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__getstate__().items():
            setattr(twin, name, copy.deepcopy(value, memo))
        for control, copied in zip(self.controls, twin.controls, strict=True):  # a copied control is unbound
            if control.controller is self:
                copied._controller = weakref.ref(twin)
        return twin

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.attached:
            raise ConfigError(
                "a pipeline or transformer cannot be pickled (torch.save, multiprocessing) while an attnctl controller "
                "is attached to it: its processors and hooks hold the controller's run state",
                fix="save it before attnctl.attach or after the with-block (ctl.restore()); pipe.save_pretrained "
                    "works inside the block")
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or a pickle of a finished controller keeps: not the cache of the last image positions read
        (a weak reference, which pickle refuses; the next run reads them again), nor the processors it made, which
        were taken off (the next :meth:`processors` makes new ones), nor the perturbed branches, whose weights read
        these controls (the next :meth:`processors` makes them from the copy's)."""
        return {**vars(self), "_ids_seen": None, "_installed": {}, "_mine": [], "_branches": None}

    def close(self) -> None:
        """Remove the tracking hooks and wrappers. The processors stay (they then act at step 0 of an unknown run,
        for a caller that drives runs by hand with :meth:`begin_run`); :meth:`restore` removes them too. While they
        hold the pipeline's IP-adapters, ``set_ip_adapter_scale``'s wrapper stays, so that the scale still acts."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        ref = vars(self.transformer).get("_attnctl_controller")
        if ref is not None and ref() is self:
            del self.transformer._attnctl_controller
        if self._latent is not None:
            self._latent.__exit__(None, None, None)
            self._latent = None
        if self._branch is not None:
            self._branch.__exit__(None, None, None)
            self._branch = None
        # set_ip_adapter_scale keeps its wrapper while attnctl's processors hold the adapters (closed, not restored)
        holding = any(isinstance(p, AttnCtlIPProcessor) for p in self.transformer.attn_processors.values())
        for name in ("check_inputs", "encode_prompt") + (() if holding else ("set_ip_adapter_scale",)):
            self._unwrap(name)

    def __enter__(self) -> Controller:
        if self._entered:
            raise ConfigError(
                "this attnctl controller's with-block is already open: entered again, the inner block's end would "
                "put the stock processors back and the rest of the outer block would run without its controls",
                fix="leave out the inner `with`: the controls act until the first with-block of the controller ends")
        installed = self.install()
        self._entered = True
        return installed

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._entered = False
        self.restore()
        clearer = compiling.fullgraph_error(exc) if exc is not None else None
        if clearer is not None:
            raise clearer from exc

    # ------------------------------------------------------------------------------ run state
    def begin_run(self, num_steps: int, *, layout: TokenLayout | None = None,
                  roles: Sequence[str] | None = None, first_step: int = 0) -> None:
        """Start a run: reset the controls' per-run state. The transformer's pre-forward hook calls it at a run's
        first forward; ``first_step`` is where the run starts (an img2img run part way through the schedule).
        The controls are bound again first (:meth:`rebind`): settings assigned since count from this run."""
        self.rebind()
        if layout is not None:
            self.state.layout = layout
        if roles is not None:
            self.state.roles = list(roles)
        self.state = dataclasses.replace(self.state, step=int(first_step), num_steps=max(1, int(num_steps)),
                                         reports={})
        for c in self.controls:
            for schedule in c.schedules():  # adaptive parts forget the last run
                schedule.reset()
            c.begin_run(self.state)
            _warn_if_never_on(c, *self.state.schedule_step[::-1])
        self._new_run = False

    def rebind(self) -> None:
        """Bind the controls again, so that settings assigned since the last run (``sites``, SoftPAG's ``heads``, an
        ``Adaptive`` schedule) count, as on a new controller; then remake what follows from the binding: the
        gradient pass's last site, the perturbed branches, and the controller's link at newly selected sites."""
        for c in self.controls:
            c.bind(self)
        self._stop_site = self._deepest_site(self._latent_control)
        self._branches = perturbed_branches(self.controls)
        if self._branch is not None and self._branches is not None:
            self._branch.branches = self._branches
        self._follow_selected_sites()

    def _follow_selected_sites(self) -> None:
        """Give the controller to the installed processor of each site a control now acts at: :meth:`processors`
        gave it only to the sites selected then. The processor objects stay the same, so :meth:`restore` still
        puts back exactly the processors they replaced."""
        if self._saved is None:  # no processors made (or restored): the next processors() reads the selection
            return
        added = False
        modules: dict[str, torch.nn.Module] | None = None
        for site in self.sites:
            proc = self._installed.get(site.processor_key)
            if proc is None or proc.controller is self or not any(c.applies_to(site) for c in self.controls):
                continue
            proc.controller = self
            modules = modules if modules is not None else dict(self.transformer.named_modules())
            self._mine.append((modules[site.name], proc, site.name))
            added = True
        if added and self.following:  # a processor replaced meanwhile at a new site: refused, as at the others
            self._check_installed()

    def set_step(self, step: int, timestep: float | torch.Tensor | None = None,
                 sigma: float | torch.Tensor | None = None) -> None:
        """The model call of ``step`` (the scheduler's step index) starts: the controls close the call before it."""
        if step != self.state.step:
            for c in self.controls:
                c.end_step(self.state)
        self.state.step, self.state.timestep, self.state.sigma = int(step), timestep, sigma

    def finish(self) -> None:
        """The run ended: let the controls close their last step."""
        for c in self.controls:
            c.end_step(self.state)
        self._new_run = True

    def contributions(self, call: SiteCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list:
        active = [c for c in self.controls if c.applies_to(call.site)]
        if self.state.gradient_pass:  # the loss's control, and any that shapes the forward the loss reads
            active = [c for c in active if c is self._latent_control or getattr(c, "in_gradient_pass", False)]
        if not active:
            return []
        if call.n_text is None:
            if call.site.kind == "flux_single":
                if self.state.layout is None:
                    raise LayoutError(
                        f"{call.site.name} is a FLUX single block, whose attention does not receive the text "
                        "length; run through attnctl.attach(pipe, ...) or an attnctl pipeline, or call "
                        "controller.begin_run(layout=...) before calling the transformer"
                    )
                call = dataclasses.replace(call, n_text=self.state.layout.text_len)
            else:
                call = dataclasses.replace(call, n_text=0)
        out = []
        for c in active:
            out.extend(c.contribute(call, q, k, v, self.state) or ())
        if self.state.gradient_pass and call.site.name == self._stop_site:
            raise StopForward  # every map of the loss is recorded: the rest of the model is not needed
        return out

    # ------------------------------------------------------------------------------ tracking
    def _track(self) -> None:
        if self._hooks:
            return
        self.transformer._attnctl_controller = weakref.ref(self)  # see _check_alone
        # the run's bookkeeping, run eagerly under torch.compile; a bound method, so that copying or pickling the
        # transformer reaches the controller, which refuses
        self._hooks.append(self.transformer.register_forward_pre_hook(self._pre_forward_eager, with_kwargs=True))
        if self.pipe is not None and hasattr(self.pipe, "check_inputs"):
            self._wrap_check_inputs()
        if self.pipe is not None and hasattr(self.pipe, "encode_prompt"):
            self._wrap_encode_prompt()
        if self.pipe is not None and hasattr(self.pipe, "set_ip_adapter_scale"):
            self._wrap_set_ip_adapter_scale()
        if self._branches is not None and not self._fixed_roles:
            # A guidance control (SoftPAG) needs its perturbed rows in every call; with roles given by the caller,
            # the caller lays out the rows (and may wrap the forward with PerturbedBranch itself).
            self._branch = PerturbedBranch(self.transformer, self, self._branches).__enter__()
        if self._latent_control is not None:  # outside the perturbed branch: it moves the latents of every row
            make = getattr(self._latent_control, "make_wrapper", None)  # a control with its own branches (edits)
            self._latent = (make(self.transformer, self, self.pipe) if make is not None
                            else LatentGuidance(self.transformer, self, self._latent_control, self.pipe))
            self._latent.__enter__()

    def _method_to_wrap(self, name: str) -> Any:
        """The pipeline's ``name`` as a call would find it: the user's own, set on the pipeline object (prompt
        weighting in ``encode_prompt``, say), when there is one (remembered for :meth:`_unwrap`), else the class's."""
        own = vars(self.pipe).get(name)
        if own is not None and own is self._wrappers.get(name):  # ours, kept by close(): wrap what it wraps
            own = self._replaced.get(name)
        if own is None:
            self._replaced.pop(name, None)
            return getattr(type(self.pipe), name).__get__(self.pipe)
        self._replaced[name] = own
        return own

    def _put_wrapper(self, name: str, wrapper: Any) -> None:
        self._wrappers[name] = wrapper
        setattr(self.pipe, name, wrapper)

    def _unwrap(self, name: str) -> None:
        """Take attnctl's wrapper of ``name`` off the pipeline object and put back the user's own method it wrapped;
        a method the user set over the wrapper meanwhile stays."""
        wrapper = self._wrappers.pop(name, None)
        own = self._replaced.pop(name, None)
        if self.pipe is None or wrapper is None or vars(self.pipe).get(name) is not wrapper:
            return
        if own is None:
            delattr(self.pipe, name)
        else:
            setattr(self.pipe, name, own)

    def _wrap_check_inputs(self) -> None:
        """Every diffusers pipeline call checks its inputs first: a new call starts there, whatever the previous one
        did (a call that raised before its first forward, or an ``encode_prompt`` the caller made outside a call)."""
        original = self._method_to_wrap("check_inputs")
        ctl = self

        def check_inputs(*args: Any, **kwargs: Any):
            ctl._prompt, ctl._negative_embeds, ctl._forwards, ctl._new_run = None, None, 0, True
            return original(*args, **kwargs)

        self._put_wrapper("check_inputs", check_inputs)

    def _wrap_set_ip_adapter_scale(self) -> None:
        """diffusers' ``set_ip_adapter_scale`` sets the scale on the IP-adapter processors among the transformer's;
        while attached, those are held by attnctl's processors, so it runs with the adapters put back for its
        length. The scale stays on the adapters: it acts inside the block and after it, as without attnctl."""
        original = self._method_to_wrap("set_ip_adapter_scale")
        transformer = self.transformer

        def set_ip_adapter_scale(*args: Any, **kwargs: Any):
            ours = transformer.attn_processors
            if not any(isinstance(proc, AttnCtlIPProcessor) for proc in ours.values()):
                return original(*args, **kwargs)  # put back by hand meanwhile: nothing of attnctl's holds them
            transformer.set_attn_processor({key: proc.ip_adapter if isinstance(proc, AttnCtlIPProcessor) else proc
                                            for key, proc in ours.items()})
            try:
                return original(*args, **kwargs)
            finally:
                transformer.set_attn_processor(ours)

        self._put_wrapper("set_ip_adapter_scale", set_ip_adapter_scale)

    def _wrap_encode_prompt(self) -> None:
        """Record the call's prompt (the first ``encode_prompt`` of a call) and FLUX's negative embeddings (a second
        one before any forward, true CFG). An ``encode_prompt`` after the call's forwards (a step-end callback that
        switches the prompt) keeps the run, its prompt and its negative rows: word controls keep the token
        positions of the call's prompt. Without ``check_inputs`` to mark a call's start, it starts a new call."""
        original = self._method_to_wrap("encode_prompt")
        ctl = self

        def encode_prompt(*args: Any, **kwargs: Any):
            for wrapper in (ctl._branch, ctl._latent):  # a pipeline call starts: model offload may have dropped
                if wrapper is not None:  # the wrappers (in this order: latent guidance stays outside)
                    wrapper.ensure()
            result = original(*args, **kwargs)
            prompt = kwargs.get("prompt", args[0] if args else None)
            t5_name, t5_pos = ("prompt_3", 2) if ctl.family == "sd3" else ("prompt_2", 1)
            prompt_t5 = kwargs.get(t5_name, args[t5_pos] if len(args) > t5_pos else None)
            clip2 = kwargs.get("prompt_2", args[1] if len(args) > 1 else None) if ctl.family == "sd3" else None
            marks_calls = "check_inputs" in ctl._wrappers  # check_inputs started the call and cleared _prompt
            if ctl._prompt is None or (ctl._forwards > 0 and not marks_calls):  # a new pipeline call
                ctl._prompt = (prompt, clip2, prompt_t5)
                ctl._negative_embeds = None
                ctl._forwards = 0
                ctl._new_run = True
            elif ctl._forwards == 0:  # a second call before any forward: FLUX encodes the negative prompt (true CFG)
                ctl._negative_embeds = result[0]
            return result

        self._put_wrapper("encode_prompt", encode_prompt)

    def _infer_layout(self, kwargs: dict, hidden: torch.Tensor) -> TokenLayout | None:
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            return self.state.layout
        text_len = ehs.shape[1]
        reference = 0
        if self.family == "sd3":
            p = self.transformer.config.patch_size
            grid = (hidden.shape[-2] // p, hidden.shape[-1] // p)
        else:
            ids = kwargs.get("img_ids")
            if ids is None:
                return self.state.layout
            if ids.device.type == "meta":  # shape-only run: the positions are not known, assume a square
                side = int(round(hidden.shape[1] ** 0.5))
                grid = (side, side) if side * side == hidden.shape[1] else (1, hidden.shape[1])
            else:
                grid, reference = self._grid_of(ids)
        texts = self._prompt_texts()
        one = texts[0] if texts is not None and len(set(texts)) == 1 else (None, None, None)  # several: per row
        key = (one, text_len, grid, reference)
        if self.state.layout is not None and self._layout_key == key:
            return self.state.layout
        self._layout_key = key
        if self.pipe is None:
            return TokenLayout(self.family, text_len, grid, reference_tokens=reference)
        prompt, clip2, t5 = one
        return layout_for_pipeline(self.pipe, prompt, text_len, grid, t5, reference, clip2)

    def _prompt_texts(self) -> list[tuple[str, str, str]] | None:
        """Per prompt of the call, the texts its tokens read: ``(prompt, CLIP-G's, T5's)`` (SD3's ``prompt_2`` and
        ``prompt_3``, FLUX's ``prompt_2`` for T5); ``None`` without a prompt. diffusers' rule decides where the
        prompt stands in: ``prompt_2 or prompt``, so an empty text or list is the prompt, while an empty text
        inside a list is read as it is (an empty text)."""
        prompt, clip2, t5 = self._prompt or (None, None, None)
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)

        def each(texts: Any) -> list[Any]:
            texts = texts or prompt  # diffusers' own rule, on the argument as a whole
            if isinstance(texts, str):
                return [texts] * len(prompts)
            return list(texts) if len(texts) == len(prompts) else list(prompts)  # diffusers refuses it

        return list(zip(prompts, each(clip2), each(t5), strict=True))

    def _grid_of(self, img_ids: torch.Tensor) -> tuple[tuple[int, int], int]:
        """The generated image's grid and the number of reference-image tokens, from FLUX's image positions. Read
        once per ids tensor: the pipelines pass the same one at every step, and on a GPU each read of its values
        waits for the device."""
        seen = self._ids_seen
        # (an inference-mode tensor keeps no version counter: it is known by its identity alone)
        version = None if img_ids.is_inference() else img_ids._version
        if seen is not None and seen[0]() is img_ids and seen[1] == version:
            return seen[2]
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        generated = ids[:, 0] == 0  # FLUX Kontext appends its input image's tokens with a first position of 1
        reference = int(ids.shape[0] - generated.sum())
        ids = ids[generated] if reference else ids
        found = (int(ids[:, 1].max() - ids[:, 1].min()) + 1, int(ids[:, 2].max() - ids[:, 2].min()) + 1), reference
        self._ids_seen = (weakref.ref(img_ids), version, found)
        return found

    def _infer_row_layouts(self, batch: int) -> list[TokenLayout | None] | None:
        """Per batch row, the layout of its prompt, when this call has several different prompts (else None).

        diffusers repeats each prompt ``num_images_per_prompt`` times in order, so the ``k``-th conditional row
        belongs to prompt ``k // (rows / prompts)``; the ``k``-th perturbed row copies the ``k``-th conditional
        row. Other rows (``uncond``: the negative prompts) get None."""
        texts = self._prompt_texts()
        shared = self.state.layout
        if self.pipe is None or shared is None or texts is None or len(set(texts)) <= 1:
            return None
        key = (tuple(texts), shared.text_len, shared.grid, shared.reference_tokens)
        if self._row_layout_cache is None or self._row_layout_cache[0] != key:
            made: dict[tuple, TokenLayout] = {}  # one layout per distinct prompt
            for p, c, t in texts:
                if (p, c, t) not in made:
                    made[(p, c, t)] = layout_for_pipeline(self.pipe, p, shared.text_len, shared.grid, t,
                                                          shared.reference_tokens, c)
            self._row_layout_cache = (key, [made[x] for x in texts])
        per_prompt = self._row_layout_cache[1]
        roles = self.state.roles or ["cond"] * batch
        out: list[TokenLayout | None] = [None] * batch
        for base in ("cond", "perturbed"):
            rows = [i for i, r in enumerate(roles) if r.split("[")[0] == base]
            if rows and len(rows) % len(per_prompt) == 0:
                each = len(rows) // len(per_prompt)
                for k, i in enumerate(rows):
                    out[i] = per_prompt[k // each]
        return out

    def _infer_roles(self, kwargs: dict, batch: int) -> list[str]:
        if self.pipe is None or kwargs.get("skip_layers") is not None:  # SD3's skip-layer pass: conditional rows
            return ["cond"] * batch
        if self.family == "sd3":
            cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
            if cfg and batch % 2 == 0:
                return ["uncond"] * (batch // 2) + ["cond"] * (batch // 2)
            return ["cond"] * batch
        ehs = kwargs.get("encoder_hidden_states")
        if self._negative_embeds is not None and ehs is self._negative_embeds:
            return ["uncond"] * batch
        return ["cond"] * batch

    def _check_pipeline(self) -> None:
        """Refuse a forward called by another pipeline object that shares this transformer (``from_pipe``,
        ``type(pipe)(**pipe.components)``): the controller reads prompts and CFG rows from the pipeline it is
        attached to, so it would steer the other pipeline's call with those. The nearest pipeline on the call
        stack is the caller; a transformer called by hand has none, and is left alone."""
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                caller = frame.f_locals.get("self")
                if isinstance(caller, DiffusionPipeline):
                    if caller is not self.pipe:
                        raise ConfigError(
                            f"this transformer is attached (attnctl) to another {type(self.pipe).__name__} object "
                            f"than the {type(caller).__name__} now calling it (a pipeline sharing its components, "
                            "from from_pipe or type(pipe)(**pipe.components)); its controls would act on the "
                            "attached pipeline's prompt and rows",
                            fix="attach the pipeline you call — attnctl.attach(that_pipe, [...]) — or call the "
                                "attached one")
                    return
            frame = frame.f_back

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return
        if self.pipe is not None:
            self._check_pipeline()
        if self.pipe is not None and getattr(self.pipe, "do_perturbed_attention_guidance", False):
            name = type(self.pipe).__name__
            raise UnsupportedModelError(
                f"{name} is running diffusers' PAG (pag_scale > 0): during the call it puts its own processors on "
                "its PAG layers, so attnctl's controls would silently stop acting there, and it adds a perturbed "
                "batch row attnctl cannot tell from the conditional ones",
                fix=f"call {name} with pag_scale=0, or use the plain pipeline (StableDiffusion3Pipeline) with "
                    "attnctl.SoftPAG(u=1.0, target='identity', scale=<your pag_scale>, heads=...), which is PAG at "
                    "u = 1 and combines with the other controls (docs/softpag.md)")
        self._check_installed()  # (after the PAG check: its message says more)
        sched = getattr(self.pipe, "scheduler", None) if self.pipe is not None else None
        timesteps = getattr(sched, "timesteps", None)
        num_steps = len(timesteps) if timesteps is not None else self.state.num_steps
        step = getattr(sched, "step_index", None) if sched is not None else None
        if step is None and sched is not None:  # before the loop's first scheduler step: where it will begin (an
            step = getattr(sched, "begin_index", None) or 0  # img2img run starts part way, at its begin_index)
        step = int(step) if step is not None else self.state.step
        if not self._fixed_layout:
            self.state.layout = self._infer_layout(kwargs, hidden)
        if not self._fixed_roles:
            self.state.roles = self._infer_roles(kwargs, hidden.shape[0])
        if not self._fixed_layout:
            self.state.row_layouts = self._infer_row_layouts(hidden.shape[0])
        self.state.skip_layer_pass = kwargs.get("skip_layers") is not None
        self._forwards += 1
        self.state.calls_per_step = max(1, int(getattr(sched, "order", 1) or 1)) if sched is not None else 1
        if self._new_run or num_steps != self.state.num_steps or (step == 0 and self.state.step > 0):
            self.begin_run(num_steps, first_step=step)
        sigma = None  # timestep and sigma stay tensors until a control reads them (RunState.timestep)
        if sched is not None and getattr(sched, "sigmas", None) is not None and step < len(sched.sigmas):
            sigma = sched.sigmas[step]
        self.set_step(step, kwargs.get("timestep"), sigma)

    # the run's bookkeeping is Python: under torch.compile it runs eagerly (attnctl.compiling)
    _pre_forward_eager = torch.compiler.disable(_pre_forward, reason=compiling.EAGER)


def _warn_if_never_on(control: Control, steps: int, first: int = 0) -> None:
    """Warn when the schedules that gate a control (:meth:`Control.gate_groups`) are 0 at every step of this run, as
    a window that falls between two steps is (``window(1, 0.45, 0.55)`` over 6 steps), or one that closes before an
    img2img run's ``first`` step, and when the run is shorter than the steps a control needs before it acts
    (:attr:`Control.gates_from_step`): the control would do nothing without a word. A constant 0 is the user's plain
    choice, and a schedule that needs the noise level cannot be told here. The schedules are read on fresh copies
    (:meth:`~attnctl.schedules.Schedule.values`): an ``Adaptive`` one keeps its run state untouched."""
    from .schedules import Constant, Schedule, ScheduleError

    start = first + control.gates_from_step  # a control that needs a step's maps first acts from the run's second
    if start >= steps:
        warnings.warn(f"{type(control).__name__} does nothing in this run: it acts from the run's step "
                      f"{control.gates_from_step + 1} on (the steps before make what it needs), and the run has "
                      f"{steps - first} step{'s' if steps - first != 1 else ''}; run more steps", UserWarning,
                      stacklevel=2)
        return

    def never_on(schedule: Any) -> bool:
        if not isinstance(schedule, Schedule) or isinstance(schedule, Constant):
            return False
        try:
            return all(v == 0 for v in schedule.values(steps)[start:])
        except (ScheduleError, TypeError, ValueError):
            return False

    for group in control.gate_groups():
        schedules = [getattr(control.config, name, None) for name in group]
        if all(never_on(s) for s in schedules):
            said = " and ".join(f"its {name} {s}" for name, s in zip(group, schedules, strict=True))
            verb = "is" if len(group) == 1 else "are"
            at = f"every one of the run's {steps} steps" if not start else \
                f"every step it can act at (from step {start + 1} of {steps})"
            why = "a window that ends before an img2img run starts?" if first and first >= control.gates_from_step \
                else "a window between two steps?"
            warnings.warn(f"{type(control).__name__} does nothing in this run: {said} {verb} 0 at {at} ({why}); "
                          "widen it or run more steps", UserWarning, stacklevel=2)
            return


def attach(target: Any, controls: Sequence[Control] | Control = (), **kwargs: Any) -> Controller:
    """Install attnctl processors with ``controls`` on a pipeline (or transformer) for a ``with`` block;
    the previous processors come back on exit, also when the block raises."""
    if isinstance(controls, Control):
        controls = [controls]
    return Controller(target, controls, **kwargs)
