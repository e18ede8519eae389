"""What the attnctl pipelines add to the diffusers ones: ``controls=`` per call, with the processors (and the
perturbed branch of guidance controls such as SoftPAG, run in the same batched forward as the CFG branches:
:mod:`attnctl.guidance`) installed for that call and restored after it, also when it raises."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..controller import Controller
from ..controls.base import Control
from ..views import images_per_prompt


class ControlledPipelineMixin:
    """Mixin for diffusers pipelines: ``pipe(prompt, controls=[...], ...)``."""

    _t5_tokenizer_attr = "tokenizer_3"

    def to_json_string(self) -> str:
        """``model_index.json`` as the diffusers pipeline this one extends writes it: attnctl's class adds no saved
        state, so a saved attnctl pipeline is a plain diffusers folder (``DiffusionPipeline.from_pretrained`` and
        other tools load it; ``AttnCtl*Pipeline.from_pretrained`` loads it as before)."""
        data = json.loads(super().to_json_string())
        data["_class_name"] = next(c for c in type(self).__mro__ if c.__module__.startswith("diffusers.")).__name__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, and a toy model's ``attnctl.json`` beside it (its tuned call defaults:
        without it the saved toy would run on diffusers' defaults, guidance 7 and 1024 px, without a word)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        meta = getattr(self, "_attnctl_toy_metadata", None)
        if meta is not None:
            from ..io import atomic_write_text
            from ..toyworld.models import METADATA_NAME

            atomic_write_text(Path(save_directory) / METADATA_NAME, json.dumps(meta, indent=2) + "\n")

    def _default_max_sequence_length(self, kwargs: dict) -> None:
        """Default ``max_sequence_length`` to the T5 tokenizer's length when it is under 256: small models (the toy
        world) are trained on short T5 sequences, and diffusers' defaults (256 for SD3, 512 for FLUX) would pad far
        past them. A real model's tokenizer (512) leaves diffusers' default; a given value is kept."""
        tok = getattr(self, self._t5_tokenizer_attr, None)
        limit = getattr(tok, "model_max_length", None)
        if "max_sequence_length" not in kwargs and isinstance(limit, int) and limit < 256:
            kwargs["max_sequence_length"] = limit

    @staticmethod
    def _default_views(parent_call, args: tuple, kwargs: dict, controls: list[Control]) -> None:
        # An epipolar control's cameras are the images of the prompt: make that many unless the call says otherwise
        # (then check it is a whole number of view sets before any model runs). A reposition call (isolation with
        # references) makes one image per prompt: its prompts are the sets, checked here too.
        epipolar = any(getattr(c, "kind", None) == "epipolar" for c in controls)
        reposition = any(getattr(c, "kind", None) == "isolation" and c.config.references for c in controls)
        if not (epipolar or reposition):
            return
        given = inspect.signature(parent_call).bind_partial(None, *args, **kwargs).arguments
        name = "num_images_per_prompt"
        n = images_per_prompt(controls, given.get(name), ["the reference prompts"] if reposition else None,
                              option=name)
        if epipolar and (name not in given or name in kwargs):
            kwargs[name] = n

    def edit(self, image: Any, source_prompt: str, target_prompt: str, num_inference_steps: int = 28,
             **kwargs: Any) -> Any:
        """Edit a real image by a text change with UnifyEdit: :func:`attnctl.edit` on this pipeline."""
        from ..editing import edit

        return edit(self, image, source_prompt, target_prompt, num_inference_steps, **kwargs)

    def controlled_call(self, parent_call, args: tuple, kwargs: dict[str, Any],
                        controls: Sequence[Control] | Control | None) -> Any:
        self._default_max_sequence_length(kwargs)
        if not controls:
            return parent_call(self, *args, **kwargs)
        controls = [controls] if isinstance(controls, Control) else list(controls)
        self._default_views(parent_call, args, kwargs, controls)
        with Controller(self, controls) as ctl:  # installs the perturbed branch too when a control asks for one
            self.attnctl = ctl
            out = parent_call(self, *args, **kwargs)
            ctl.finish()  # the controls close the run's last step (its metrics, isolation's last masks)
            return out
