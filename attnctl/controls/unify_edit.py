"""UnifyEdit: edit a real image by a text change, holding its structure and moving only what the words change.

After "Tuning-Free Image Editing with Fidelity and Editability via Unified Latent Diffusion Model" (UnifyEdit),
moved to the joint attention of MM-DiT (SD3, SD3.5, FLUX.1). ``docs/editing.md`` has the derivation; in short:

The image is inverted under the source prompt (:func:`attnctl.invert`), and two branches run from the inverted
noise in one batch (:mod:`attnctl.editing`): the *source* branch replays the inversion path ``z^s_t`` exactly, the
*target* branch runs under the target prompt and its latent ``z_t`` is moved at the guided steps down two losses
of one gradient pass over ``[source, target]``, at every selected joint site:

- **self-attention preservation** (fidelity): the image→image attention of the target should stay that of the
  source, head-averaged, softmax over the image keys::

      L_SA = Σ_sites Σ_{r,j} w(r,j)·(A^s(r,j) − A^t(r,j))²  /  Σ_sites Σ_{r,j} w(r,j)·A^s(r,j)²

  (relative, so it reads as a fraction whatever the size); ``w = 1`` (``sa_region="all"``), or ``M·Mᵀ`` inside
  the edit mask, or ``(1−M)(1−M)ᵀ`` outside it. Rows go in checkpointed chunks: the ``N_img × N_img`` map is never
  held.
- **cross-attention alignment** (editability): the edit words' map ``A_e`` (their share of the target's text
  attention) should sit inside the edit mask ``M``::

      L_CA = mean_sites,e (1 − μ_in / (μ_in + μ_out))²,   μ_in = mean_{M} A_e,  μ_out = mean_{¬M} A_e

  ``M`` is the Otsu mask of the source's map of the mask words (the source words the edit replaces), averaged
  over the sites, or a box.

**Adaptive balance (attnctl's own formulation; the paper's scheduler is not public).** The two gradients pull
against each other: self-attention dominance under-edits, cross-attention dominance over-edits. Each gradient is
normalised to unit root mean square, and each term is gated by how far it is from being met::

    z ← z − η_t·σ_t·(λ_SA·min(1, L_SA/τ_SA)·ĝ_SA + λ_CA·min(1, L_CA/τ_CA)·ĝ_CA)

A constraint that is met (its loss under its tolerance ``τ``) pushes less, so neither term can take over the step
once the other is satisfied. ``balance="fixed"`` drops the gates (weights ``λ`` only). With ``localise`` (default)
the alignment term moves the latent inside the edit mask only, as MAG-Edit's update does; ``conflict="project"``
removes from each unit gradient its component against the other where they conflict.
"""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, field_validator
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, LayoutError, SiteError
from ..layout import image_grid, text_words
from ..schedules import Schedule, as_schedule, bounded
from ..subject_masks import otsu_masks
from .base import Control, ControlConfig, RunState, register, word_columns
from .layout_guidance import MAP_CHUNK_ELEMS, box_coverage, checked_box, guided_iterations, in_backward, word_maps
from .regulation import JOINT_KINDS, mid_depth_sites

_TINY = 1e-12


class UnifyEditConfig(ControlConfig):
    edit_words: list[str] | None = Field(
        None, description="words of the target prompt the edit is about (their attention is pulled into the edit "
                          "mask); None: the words the target prompt has in place of the source's")
    mask_words: list[str] | None = Field(
        None, description="words of the source prompt whose attention map gives the edit mask; None: the source "
                          "words the target prompt replaces")
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1] (fractions from the top left): the edit "
                                                      "region as a box instead of a mask from the source's map")
    sites: str | list[str] = Field("all", description="site selector; 'all': every joint (image-text) site, "
                                                      "'mid': the middle third by depth")
    scale: bounded(0, None) = Field("window(0.2, 0, 0.5)", description="schedule of the step size η (in units of "
                                                                       "the latent's scale, times σ_t); 0: no step")
    iterations: int = Field(1, description="gradient steps per guided step")
    sa_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="λ_SA: weight of self-attention "
                                                                            "preservation (0: off)")
    ca_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="λ_CA: weight of cross-attention "
                                                                            "alignment (0: off)")
    sa_tolerance: float = Field(0.05, gt=0.0, allow_inf_nan=False,
                                description="τ_SA: relative self-attention change at which preservation pushes fully")
    ca_tolerance: float = Field(0.05, gt=0.0, allow_inf_nan=False,
                                description="τ_CA: alignment loss at which alignment pushes fully")
    balance: Literal["adaptive", "fixed"] = Field("adaptive", description="adaptive: gate each term by min(1, L/τ); "
                                                                          "fixed: the weights λ only")
    localise: bool = Field(True, description="the alignment term moves the latent inside the edit mask only (as "
                                             "MAG-Edit's update); False: everywhere its gradient points")
    conflict: Literal["project", "none"] = Field(
        "none", description="project: where the two unit gradients point against each other, drop from each its "
                            "component along the other (so the step raises neither loss to first order); none: add "
                            "them as they are")
    sa_region: Literal["all", "edit", "outside"] = Field(
        "all", description="pairs of image tokens self-attention preservation holds on: all, both inside the edit "
                           "mask (M·Mᵀ), or both outside it")

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        return guided_iterations(v)

    @field_validator("edit_words", "mask_words")
    @classmethod
    def _words(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        words = [w.strip() for w in v]
        if not words or not all(words):
            raise ValueError("name at least one non-empty word, or leave it None to take the words the two "
                             "prompts differ in")
        return words

    @field_validator("box")
    @classmethod
    def _box(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else checked_box(v, "box")


# --------------------------------------------------------------------------------------------- math


def differing_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """The words the target prompt has in place of the source's: ``(source words, target words)`` of every
    replaced, deleted or inserted run, case-folded (``"a red circle"`` → ``"a green circle"``: ``(["red"],
    ["green"])``)."""
    a, b = text_words(source), text_words(target)
    src, tgt = differing_places(source, target)
    return [a[i] for i in src], [b[j] for j in tgt]


def differing_places(source: str, target: str) -> tuple[list[int], list[int]]:
    """Where :func:`differing_words` stand: their indices among each prompt's words (:func:`text_words`), so that
    a word the prompts also share elsewhere ("red" in "a red circle and a red square" → "… a green square") is
    taken only where it is replaced."""
    a, b = text_words(source), text_words(target)  # punctuation is no word to edit
    src: list[int] = []
    tgt: list[int] = []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            src.extend(range(i0, i1))
            tgt.extend(range(j0, j1))
    return src, tgt


def self_attention_gap(q: torch.Tensor, k: torch.Tensor, row_weight: torch.Tensor | None = None,
                       max_elems: int = MAP_CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w·(A^s − A^t)², Σ w·(A^s)²)`` over the image token pairs, ``A`` the head-averaged softmax over the image
    keys of row 0 (source, no gradient) and row 1 (target) of ``q``, ``k`` ``(2, N_img, heads, d)``.

    ``row_weight`` ``(N_img,)`` gives ``w(r, j) = m(r)·m(j)`` (``None``: 1). Query rows go in chunks of at most
    ``max_elems`` logits, each recomputed in the backward (activation checkpointing): the ``N_img × N_img`` map is
    never held."""
    _, n, h, _ = q.shape
    rows = max(1, max_elems // max(1, 2 * h * n))
    scaled = q.float() * (1.0 / math.sqrt(q.shape[-1]))
    k_t = k.float().permute(0, 2, 3, 1).contiguous()  # (2, heads, d, N_img): laid out once, not per chunk
    m = None if row_weight is None else row_weight.to(k_t.device, torch.float32)
    gap = ref = None
    for r0 in range(0, n, rows):
        wr = None if m is None else m[r0:r0 + rows]
        args = (scaled[:, r0:r0 + rows], k_t, wr, m)
        part = checkpoint(_chunk_gap, *args, use_reentrant=False) if n > rows else _chunk_gap(*args)
        gap = part[0] if gap is None else gap + part[0]
        ref = part[1] if ref is None else ref + part[1]
    return gap, ref


def _chunk_gap(q: torch.Tensor, k_t: torch.Tensor, wr: torch.Tensor | None, wc: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gap's two sums over one chunk of query rows: ``q`` ``(2, rows, heads, d)`` (scaled), ``k_t``
    ``(2, heads, d, N_img)``."""
    with torch.no_grad():
        a_s = torch.matmul(q[0].transpose(0, 1), k_t[0]).softmax(-1).mean(0)
    a_t = torch.matmul(q[1].transpose(0, 1), k_t[1]).softmax(-1).mean(0)
    sq_gap, sq_ref = (a_s - a_t) ** 2, a_s ** 2
    if wr is not None:
        w = wr[:, None] * wc[None, :]
        sq_gap, sq_ref = sq_gap * w, sq_ref * w
    return sq_gap.sum(), sq_ref.sum()


def alignment_loss(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """``mean_e (1 − μ_in/(μ_in + μ_out))²`` of the edit words' maps ``(N_img, E)`` against the mask ``(N_img,)``
    (fractions in [0, 1]); ``None`` when the mask is empty or covers everything (no inside or no outside)."""
    n_in = float(mask.float().sum())  # the one read of a value on the host (on a GPU it waits for the device)
    if n_in <= 0 or n_in >= mask.numel():
        return None
    return _alignment(maps, mask, n_in)


def _alignment(maps: torch.Tensor, mask: torch.Tensor, n_in: float) -> torch.Tensor:
    """:func:`alignment_loss` for a mask known to have ``n_in`` pixels inside, and some outside."""
    inside = mask.to(maps.dtype)
    mu_in = (maps * inside[:, None]).sum(0) / n_in
    mu_out = (maps * (1 - inside)[:, None]).sum(0) / (mask.numel() - n_in)
    return ((1 - mu_in / (mu_in + mu_out).clamp_min(_TINY)) ** 2).mean()


def rms_unit(g: torch.Tensor) -> torch.Tensor:
    """``g`` divided by its root mean square (float32)."""
    g = g.float()
    return g / g.pow(2).mean().sqrt().clamp_min(_TINY)


def deconflict(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"sa": a', "ca": b'}``: when ``a·b < 0``, each with its component along the other removed (``a' = a −
    (a·b/|b|²)·b``, and the same for ``b``), so ``a'·b = 0`` and ``b'·a = 0``; unchanged otherwise."""
    dot = float((a * b).sum())
    if dot >= 0:
        return {"sa": a, "ca": b}
    return {"sa": a - dot / float((b * b).sum()) * b, "ca": b - dot / float((a * a).sum()) * a}


class EditStep(NamedTuple):
    """One guided step's record: the losses before the move and the weights the balance gave the two terms."""

    step: int
    sa_loss: float | None
    ca_loss: float | None
    sa_weight: float
    ca_weight: float


# --------------------------------------------------------------------------------------------- control


@register
class UnifyEdit(Control):
    """Text-driven editing of a real image: the target branch's latent is moved down self-attention preservation
    and cross-attention alignment, balanced step by step (module doc). Runs through :func:`attnctl.edit` (or
    ``attnctl.attach(pipe, [control])`` after :meth:`set_source`, with ``pipe([source, target], latents=...)``)."""

    kind = "unify_edit"
    Config = UnifyEditConfig
    named_sites = {"mid": mid_depth_sites}
    latent_guidance = True  # the controller wraps the forward with the editing branches (make_wrapper)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source_path: list[torch.Tensor] | None = None
        self.source_eta: Schedule | None = None  # RF-Inversion's pull toward the source image (set_source)
        self.reset()

    def reset(self) -> None:
        self._columns: dict[tuple[int, str], tuple[Any, list[list[int]]]] = {}
        self._gap: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._target_maps: list[torch.Tensor] = []
        self._source_maps: list[torch.Tensor] = []
        self._grid: tuple[int, int] | None = None
        self._step = 0
        self.history: list[EditStep] = []
        self.mask: torch.Tensor | None = None  # the last edit mask (h, w), for inspection

    # ------------------------------------------------------------------------------ lifecycle
    def set_source(self, path: list[torch.Tensor], eta: Any = None) -> UnifyEdit:
        """The inversion path of the source image (:func:`attnctl.invert`), which the source branch replays, and
        RF-Inversion's ``eta``: a schedule of the target rows' pull toward the source image (``path[-1]``;
        :mod:`attnctl.rf_inversion`), or ``None`` for none."""
        if not isinstance(path, list | tuple) or len(path) < 2 or not all(isinstance(z, torch.Tensor) for z in path):
            raise ConfigError("UnifyEdit.set_source takes the list of latents attnctl.invert returns",
                              fix="path = attnctl.invert(pipe, image, source_prompt, steps); control.set_source(path)")
        self.source_path = list(path)
        self.source_eta = None if eta is None else as_schedule(eta, 0.0, 1.0)
        return self

    def make_wrapper(self, transformer: torch.nn.Module, controller: Any, pipe: Any) -> Any:
        from ..editing import EditBranches

        return EditBranches(transformer, controller, self, pipe)

    def select_sites(self, sites):
        return [s for s in super().select_sites(sites) if s.kind in JOINT_KINDS]

    def bind(self, controller) -> None:
        super().bind(controller)
        if any(getattr(c, "perturbed_branch", False) for c in controller.controls):
            raise ConfigError("UnifyEdit lays out its own source and target rows, and a guidance control (SoftPAG) "
                              "in the same run would add perturbed rows to them",
                              fix="run UnifyEdit without guidance controls")
        if isinstance(getattr(controller.pipe, "controlnet", None), torch.nn.Module):
            raise ConfigError(
                "UnifyEdit moves the target latent inside the transformer's call, and this pipeline runs its "
                "ControlNet before that call on the unmoved latent, so the edit's steps would mix the two",
                fix="edit with the base pipeline of the same components, e.g. StableDiffusion3Pipeline(**{k: v for "
                    "k, v in pipe.components.items() if k != 'controlnet'}) (FluxPipeline for FLUX)")
        if not self.sites:
            raise SiteError(f"UnifyEdit: the sites {self.config.sites!r} have no image-text attention",
                            fix="select joint sites, e.g. sites='all' or 'mid'")

    def begin_run(self, state: RunState) -> None:
        self.reset()
        self.config.scale.reset()  # read from the config at use: a scale assigned after construction counts
        if self.source_eta is not None:
            self.source_eta.reset()
        if self._weighs_nothing:
            warnings.warn("UnifyEdit does nothing in this run: sa_weight and ca_weight are both 0, so no latent is "
                          "moved (the edit is the plain regeneration of the target prompt); give either a weight, "
                          "or scale=0 to ask for that plainly", UserWarning, stacklevel=2)

    @property
    def _weighs_nothing(self) -> bool:
        """Both terms weigh 0: no latent would move."""
        return self.config.sa_weight == 0 and self.config.ca_weight == 0

    def step_size(self, step: int, num_steps: int) -> float:
        """``η`` at denoising step ``step`` of ``num_steps`` (0: no gradient pass, also when both terms weigh 0)."""
        if self._weighs_nothing:
            return 0.0
        return float(self.config.scale(step, num_steps))

    def _words(self, which: str, source: Any, target: Any) -> list[list[int]]:
        """Text positions of the edit words (``which="edit"``, in the target layout) or the mask words (``"mask"``,
        in the source layout), the defaults taken from where the two prompts differ."""
        layout = target if which == "edit" else source
        key = (id(layout), which)
        kept = self._columns.get(key)
        if kept is not None and kept[0] is layout:
            return kept[1]
        words = self.config.edit_words if which == "edit" else self.config.mask_words
        if words is None:
            if source.prompt is None or target.prompt is None:
                raise LayoutError("UnifyEdit takes its default words from the two prompts, and this run has no "
                                  "prompt text", fix="pass the prompts as text, or give edit_words and mask_words")
            src, tgt = differing_places(source.prompt, target.prompt)
            places = tgt if which == "edit" else src
            if not places:
                field = "edit_words" if which == "edit" else "mask_words (or box)"
                raise LayoutError(
                    f"UnifyEdit: the target prompt {target.prompt!r} adds no word to the source "
                    f"{source.prompt!r} to find the {'edit' if which == 'edit' else 'edit mask'} from",
                    fix=f"name the words in {field}")
            cols = [layout.tokens_of_word_at(i) for i in places]  # each where it stands, not every occurrence
        else:
            noun = "edit word" if which == "edit" else "mask word"
            field = "edit_words" if which == "edit" else "mask_words"
            cols = word_columns(layout, words, None, None, "UnifyEdit", noun=noun, field=field, verb="use")
        self._columns[key] = (layout, cols)
        return cols

    def check_layouts(self, source: Any, target: Any) -> None:
        """Find the words the edit needs in the layouts of its two prompts, as its run will: a word the
        truncation cut off is an error before the inversion, which takes as long as the edit."""
        cfg = self.config
        if cfg.ca_weight > 0:
            self._words("edit", source, target)
        if (cfg.ca_weight > 0 or cfg.sa_region != "all") and cfg.box is None:
            self._words("mask", source, target)

    # ------------------------------------------------------------------------------ per call
    def contribute(self, call, q, k, v, state: RunState):
        if not state.gradient_pass or not call.n_text:
            return []  # the control adds nothing to the attention itself
        if call.batch != 2:
            raise ConfigError(f"UnifyEdit's gradient pass runs [source, target] rows, got a batch of {call.batch}",
                              fix="run it through attnctl.edit(...)")
        source, target = (state.row_layouts or [state.layout, state.layout])[:2]
        grid = image_grid(target, call.n_image, "UnifyEdit", call.site.name)
        self._grid = grid
        qi, ki, kt = q[:, call.image_slice()], k[:, call.image_slice()], k[:, call.text_slice()]
        target_map = source_map = gap = None
        if self.config.ca_weight > 0:
            target_map = word_maps(qi[1:], kt[1:], self._words("edit", source, target))[0]
        if (self.config.ca_weight > 0 or self.config.sa_region != "all") and self.config.box is None:
            with torch.no_grad():
                cols = self._words("mask", source, target)
                source_map = word_maps(qi[:1], kt[:1], cols)[0].sum(-1)
        if self.config.sa_weight > 0:
            weight = None if self.config.sa_region == "all" else self._region(qi.device, source_map)
            gap = self_attention_gap(qi, ki, weight)
        if in_backward():  # a checkpointed block recomputed in the backward: its terms were kept in the forward
            return []
        for kept, value in ((self._target_maps, target_map), (self._source_maps, source_map), (self._gap, gap)):
            if value is not None:
                kept.append(value)
        self._step = state.schedule_step[0]  # the denoising step (the midpoint scheduler's two calls share it)
        return []

    def _edit_mask(self, device) -> torch.Tensor | None:
        """The edit mask ``(N_img,)`` in [0, 1]: the box's cell coverage, or Otsu on the site-averaged source map."""
        if self.config.box is not None:
            return box_coverage([self.config.box], self._grid, device)[:, 0]
        if not self._source_maps:
            return None
        mean = torch.stack(self._source_maps).mean(0)
        return otsu_masks(mean).float()

    def _region(self, device, source_map: torch.Tensor | None) -> torch.Tensor:
        """Row weights ``m`` of the self-attention term for ``sa_region`` ``"edit"`` (the mask) or ``"outside"``.
        With a mask from the maps it is this site's own (the Otsu mask of its source map ``source_map``): the term
        is summed site by site during the pass, before the site-averaged mask exists."""
        if self.config.box is not None:
            m = box_coverage([self.config.box], self._grid, device)[:, 0]
        else:
            m = otsu_masks(source_map).float()
        return m if self.config.sa_region == "edit" else 1 - m

    def edit_losses(self) -> dict[str, torch.Tensor | None]:
        """The two losses of the gradient pass that just ran (``{"sa": L_SA, "ca": L_CA}``, ``None`` for a term that
        is off or has no mask), then cleared."""
        out: dict[str, torch.Tensor | None] = {"sa": None, "ca": None}
        if self._gap:
            out["sa"] = torch.stack([g for g, _ in self._gap]).sum() / torch.stack(
                [r for _, r in self._gap]).sum().clamp_min(_TINY)
        if self._target_maps:
            mask = self._edit_mask(self._target_maps[0].device)
            if mask is not None:
                self.mask = mask.detach().view(*self._grid).cpu()  # kept for the user: the step's one device read
                n_in = float(self.mask.float().sum())  # from that copy, once per step (not per site)
                if 0 < n_in < mask.numel():
                    out["ca"] = torch.stack([_alignment(m, mask, n_in) for m in self._target_maps]).mean()
                else:  # an empty or full mask leaves nothing to align
                    out["ca"] = None
        self._gap, self._target_maps, self._source_maps = [], [], []
        return out

    def direction(self, losses: dict[str, torch.Tensor | None], grads: dict[str, torch.Tensor],
                  latent_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The balanced descent direction ``Σ w·ĝ`` of the two terms (module doc), and a record of it in
        :attr:`history`; ``None`` when no term has a gradient. ``latent_mask`` (broadcasting to the latent, 1 inside
        the edit mask) confines the alignment term when ``localise`` is on."""
        cfg = self.config
        weights = {"sa": cfg.sa_weight, "ca": cfg.ca_weight}
        tol = {"sa": cfg.sa_tolerance, "ca": cfg.ca_tolerance}
        used: dict[str, float] = {"sa": 0.0, "ca": 0.0}
        units = {name: rms_unit(g) for name, g in grads.items()}
        if cfg.localise and latent_mask is not None and "ca" in units:
            units["ca"] = units["ca"] * latent_mask.to(units["ca"])
        if cfg.conflict == "project" and len(units) == 2:
            units = deconflict(units["sa"], units["ca"])
        total = None
        for name, g in units.items():
            w = weights[name]
            if cfg.balance == "adaptive":
                w *= min(1.0, float(losses[name].detach()) / tol[name])
            used[name] = w
            if w > 0:
                total = w * g if total is None else total + w * g
        value = {n: (None if losses.get(n) is None else float(losses[n].detach())) for n in ("sa", "ca")}
        self.history.append(EditStep(self._step, value["sa"], value["ca"], used["sa"], used["ca"]))
        return total

    def summary(self) -> str | None:
        if not self.history:
            return None
        steps = len({h.step for h in self.history})
        last = self.history[-1]

        def fmt(x: float | None) -> str:
            return "–" if x is None else f"{x:.3f}"

        return (f"UnifyEdit over {steps} guided steps; last: L_SA {fmt(last.sa_loss)} (w {last.sa_weight:.2f}), "
                f"L_CA {fmt(last.ca_loss)} (w {last.ca_weight:.2f})")
