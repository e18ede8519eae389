"""FLUX.1 processor for double blocks (``[text, image]`` with separate text projections) and single blocks
(the joint sequence arrives already concatenated in ``hidden_states``, without ``encoder_hidden_states``).

Projections, QK-norm and RoPE follow diffusers' ``FluxAttnProcessor``; attention goes through
``dispatch_attention_fn`` with the processor's backend, like the stock one.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .base import AttnCtlIPProcessor, AttnCtlProcessor
from .ip_adapter import flux_ip_term


def _projections(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq = ek = ev = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return q, k, v, eq, ek, ev
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    return q, k, v, eq, ek, ev


class AttnCtlFluxProcessor(AttnCtlProcessor):
    """Drop-in replacement for ``FluxAttnProcessor``."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ip_hidden_states: list[torch.Tensor] | None = None, ip_adapter_masks: torch.Tensor | None = None):
        query, key, value, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        use_ip = self.ip_adapter is not None and ip_hidden_states is not None
        ip_query = query if use_ip else None  # QK-normed, before RoPE: what an IP-adapter's term reads (only then)

        n_text = None  # single block: the controller knows it from the run's layout
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self._attend(query, key, value, attention_mask, n_text, image_first=False, rotary=image_rotary_emb)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = out.split_with_sizes(
                [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            if use_ip:
                return hidden_states, encoder_hidden_states, flux_ip_term(self.ip_adapter, attn, ip_query,
                                                                          ip_hidden_states)
            return hidden_states, encoder_hidden_states
        return out


class AttnCtlIPFluxProcessor(AttnCtlFluxProcessor, AttnCtlIPProcessor):
    """:class:`AttnCtlFluxProcessor` in place of a ``FluxIPAdapterAttnProcessor``, holding its weights."""
