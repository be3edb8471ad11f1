"""The one home of rotary application and scaled-dot-product attention.

Legend: B batch, N tokens, h heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .positions import RopeTable


def apply_rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (B, N, h, d) in float32 by the table (N, d/2)."""
    cos, sin = table
    xf = x.float().unflatten(-1, (-1, 2))  # (B, N, h, d/2, 2)
    x0, x1 = xf.unbind(-1)
    cos = cos[:, None, :]  # (N, 1, d/2)
    sin = sin[:, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, N, h, d/2, 2)
    return out.flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal, unmasked) attention. q (B, Nq, h, d), k/v (B, Nk, h, d) -> (B, Nq, h*d)."""
    dtype = v.dtype
    out = F.scaled_dot_product_attention(
        q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
    )  # (B, h, Nq, d)
    return out.transpose(1, 2).flatten(2)  # (B, Nq, h*d)
