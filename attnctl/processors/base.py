"""Shared part of every attnctl processor: ask the controller what is active here, then attend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import compiling
from .attend import attend, fused_attention

if TYPE_CHECKING:
    from ..controller import Controller
    from ..sites import Site


@dataclass(frozen=True)
class SiteCall:
    """Shape facts of one attention call, in the site's own sequence."""

    site: Site
    batch: int
    seq_len: int
    n_text: int | None  # None: not known from the call (FLUX single blocks) — the controller fills it in
    image_first: bool  # SD3: [image, text]; FLUX: [text, image]
    device: torch.device
    dtype: torch.dtype
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # FLUX: the (cos, sin) RoPE tables of the call's tokens
    attn_mask: torch.Tensor | None = None  # the call's attention mask, in the dispatcher's layout (FLUX's padding)

    @property
    def n_image(self) -> int:
        return self.seq_len - (self.n_text or 0)

    def image_slice(self) -> slice:
        n_text = self.n_text or 0
        return slice(0, self.n_image) if self.image_first else slice(n_text, self.seq_len)

    def text_slice(self) -> slice:
        n_text = self.n_text or 0
        return slice(self.n_image, self.seq_len) if self.image_first else slice(0, n_text)

    def grid_slice(self, n_grid: int) -> slice:
        """The generated image's ``n_grid`` tokens: the start of the image stream (a reference image's tokens, which
        FLUX Kontext appends, follow them)."""
        start = self.image_slice().start
        return slice(start, start + n_grid)


class AttnCtlProcessor:
    """Base of the attnctl processors. Without a controller (or with nothing active) it is the stock
    processor: same projections, same ``dispatch_attention_fn`` call with ``_attention_backend``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, site: Site | None = None, controller: Controller | None = None) -> None:
        self.site = site
        self.controller = controller
        self.ip_adapter = None  # the IP-adapter processor replaced here, whose term this one adds (ip_adapter.py)

    def __repr__(self) -> str:
        where = self.site.name if self.site is not None else "unbound"
        return f"{type(self).__name__}({where})"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask, n_text: int | None,
                image_first: bool, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.controller is None or self.site is None or not self.controller.controls:
            return fused_attention(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                   parallel_config=self._parallel_config)
        return self._controlled(q, k, v, attention_mask, n_text, image_first, rotary)

    # Which controls act, and how, depends on the run's step, rows and prompts: Python state that torch.compile
    # would guard on and recompile for at every step. So this part runs eagerly under torch.compile (a graph
    # break); the projections and norms around it, and every stock module between the sites, stay compiled.
    @torch.compiler.disable(reason=compiling.EAGER)
    def _controlled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask, n_text: int | None,
                    image_first: bool, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        call = SiteCall(self.site, q.shape[0], q.shape[1], n_text, image_first, q.device, q.dtype, rotary,
                        attention_mask)
        contributions = self.controller.contributions(call, q, k, v)
        if not contributions:
            return fused_attention(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                   parallel_config=self._parallel_config)
        return attend(q, k, v, contributions, attn_mask=attention_mask, backend=self._attention_backend,
                      parallel_config=self._parallel_config)


class AttnCtlIPProcessor(AttnCtlProcessor, torch.nn.Module):
    """Base of the attnctl processors put where an IP-adapter processor was: they add its term
    (:mod:`attnctl.processors.ip_adapter`) with its weights.

    Like the IP-adapter processor, it is a submodule of its attention module, and it holds the adapter's submodules
    under the adapter's own names (the same objects): while it is installed the transformer's parameters and
    ``state_dict`` keys are the stock ones, and ``.to(...)``, model offloading and ``save_pretrained`` reach the
    adapter's weights. The adapter itself is not a submodule (that would put ``ip_adapter.`` in its weights' names);
    restoring puts it back with the same, moved, weights."""

    def __init__(self, site: Site | None, controller: Controller | None, ip_adapter: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)
        AttnCtlProcessor.__init__(self, site, controller)
        object.__setattr__(self, "ip_adapter", ip_adapter)  # past nn.Module.__setattr__: not registered
        for name, child in ip_adapter.named_children():  # (the supported adapters hold all their weights there)
            self.add_module(name, child)
