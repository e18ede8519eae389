"""The IP-adapter term of a joint-attention layer, computed with the weights of the IP-adapter processor that
attnctl's processor replaced, so an IP-adapter keeps working under attnctl controls.

The term is a second, separate attention of the image queries over the adapter's image-feature tokens, added to
the image stream; controls act on the joint attention only and leave it alone. The math follows diffusers'
``SD3IPAdapterJointAttnProcessor2_0`` and ``FluxIPAdapterAttnProcessor`` step by step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

SUPPORTED = ("SD3IPAdapterJointAttnProcessor2_0", "FluxIPAdapterAttnProcessor")
"""The IP-adapter processors whose term attnctl's processors can compute."""


def sd3_ip_term(ip: Any, attn: Any, img_q: torch.Tensor, img_k: torch.Tensor, img_v: torch.Tensor,
                ip_hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """SD3 / SD3.5: image queries attend over ``[image keys, adapter keys]`` (the adapter's own QK norms), times
    ``ip.scale``. ``img_*``: the image projections before the layer's QK norm, ``(batch, tokens, heads, dim)``.
    Returns ``(batch, image tokens, heads·dim)``, to add before the output projection."""
    b, _, heads, dim = img_q.shape
    features = ip.norm_ip(ip_hidden_states, temb=temb)
    ip_k = ip.to_k_ip(features).view(b, -1, heads, dim).transpose(1, 2)
    ip_v = ip.to_v_ip(features).view(b, -1, heads, dim).transpose(1, 2)
    query = ip.norm_q(img_q.transpose(1, 2))
    key = torch.cat([ip.norm_k(img_k.transpose(1, 2)), ip.norm_ip_k(ip_k)], dim=2)
    value = torch.cat([img_v.transpose(1, 2), ip_v], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim).to(query.dtype) * ip.scale


def flux_ip_term(ip: Any, attn: Any, ip_query: torch.Tensor, ip_hidden_states: list[torch.Tensor]) -> torch.Tensor:
    """FLUX double blocks: for each loaded adapter, image queries (QK-normed, before RoPE) attend over its tokens;
    the results, each times its scale, are summed. Returns ``(batch, image tokens, heads·dim)``, which the block
    adds to the image stream after its gate (diffusers' third attention output)."""
    b = ip_query.shape[0]
    total = torch.zeros(b, ip_query.shape[1], attn.heads * attn.head_dim, dtype=ip_query.dtype,
                        device=ip_query.device)
    for features, scale, to_k, to_v in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip, strict=False):
        key = to_k(features).view(b, -1, attn.heads, attn.head_dim)
        value = to_v(features).view(b, -1, attn.heads, attn.head_dim)
        out = dispatch_attention_fn(ip_query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=ip._attention_backend, parallel_config=ip._parallel_config)
        total = total + scale * out.reshape(b, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
    return total
