"""What the attnctl pipelines add to the diffusers ones: ``controls=``, processors restored after every
call (also when the call raises), and the perturbed branch of guidance controls (SoftPAG) run in the same
batched forward as the CFG branches (:mod:`attnctl.guidance`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..controller import Controller
from ..controls.base import Control
from ..guidance import PerturbedBranch, perturbed_branches


class ControlledPipelineMixin:
    """Mixin for diffusers pipelines: ``pipe(prompt, controls=[...], ...)``."""

    _t5_tokenizer_attr = "tokenizer_3"

    def _default_max_sequence_length(self, kwargs: dict) -> None:
        # Small models (the toy world) are trained on short T5 sequences; diffusers' defaults are 256/512.
        tok = getattr(self, self._t5_tokenizer_attr, None)
        limit = getattr(tok, "model_max_length", None)
        if "max_sequence_length" not in kwargs and isinstance(limit, int) and limit < 256:
            kwargs["max_sequence_length"] = limit

    def _cfg_scale_fn(self, parent_call, args: tuple, kwargs: dict) -> Callable[[list[str]], float]:
        """``roles -> s``: the CFG scale the diffusers loop applies to a transformer call's cond rows."""
        raise NotImplementedError

    def controlled_call(self, parent_call, args: tuple, kwargs: dict[str, Any],
                        controls: Sequence[Control] | Control | None) -> Any:
        self._default_max_sequence_length(kwargs)
        if not controls:
            return parent_call(self, *args, **kwargs)
        with Controller(self, controls) as ctl:
            self.attnctl = ctl
            branches = perturbed_branches(ctl.controls)
            if branches is None:
                return parent_call(self, *args, **kwargs)
            branch = PerturbedBranch(self.transformer, ctl, branches, self._cfg_scale_fn(parent_call, args, kwargs))
            with branch:
                return parent_call(self, *args, **kwargs)
