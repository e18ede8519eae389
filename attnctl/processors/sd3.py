"""SD3 / SD3.5 processor: the joint ``[image, text]`` attention of ``transformer_blocks.N.attn`` and the
image-only ``attn2`` of SD3.5's dual-attention layers.

Projections follow diffusers' ``JointAttnProcessor2_0`` step by step (QK-norm included when the model has
it, as SD3.5 does), but the attention itself goes through ``dispatch_attention_fn`` so the model's
attention backend (xformers, flash, ...) applies.
"""

from __future__ import annotations

import torch

from .base import AttnCtlIPProcessor, AttnCtlProcessor
from .ip_adapter import sd3_ip_term


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, inner = x.shape
    return x.view(b, s, heads, inner // heads)


class AttnCtlJointProcessor(AttnCtlProcessor):
    """Drop-in replacement for ``JointAttnProcessor2_0``."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, ip_hidden_states: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args, **kwargs):
        # ip_hidden_states / temb are named (diffusers passes a processor only the keywords its signature names).
        n_image = hidden_states.shape[1]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        use_ip = self.ip_adapter is not None and ip_hidden_states is not None and self.ip_adapter.scale != 0
        # before the QK norm: what an IP-adapter's term reads (kept only then: three activations of the layer)
        ip_inputs = (query, key, value) if use_ip else None
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_text = 0
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            eq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            ek = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            ev = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        # The stock SD3 processor ignores `attention_mask`; so do we, to stay equivalent.
        out = self._attend(query, key, value, None, n_text, image_first=True)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        else:
            hidden_states = out
        if ip_inputs is not None:
            hidden_states = hidden_states + sd3_ip_term(self.ip_adapter, attn, *ip_inputs, ip_hidden_states, temb)
            ip_inputs = None
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class AttnCtlIPJointProcessor(AttnCtlJointProcessor, AttnCtlIPProcessor):
    """:class:`AttnCtlJointProcessor` in place of an ``SD3IPAdapterJointAttnProcessor2_0``, holding its weights."""
