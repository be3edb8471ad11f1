"""MMDiT patch block: joint text/image attention with separate adaLN, norms and MLPs per stream.

Legend: B batch, L patch tokens, T text tokens, D hidden, h heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import apply_rope, attention
from .layers import Linear, RMSNorm, SwiGLU, modulate
from .positions import RopeTable


class JointAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_x = Linear(dim, 3 * dim, bias=False)
        self.qkv_y = Linear(dim, 3 * dim, bias=False)
        head_dim = dim // num_heads
        self.q_norm_x = RMSNorm(head_dim)
        self.k_norm_x = RMSNorm(head_dim)
        self.q_norm_y = RMSNorm(head_dim)
        self.k_norm_y = RMSNorm(head_dim)
        self.proj_x = Linear(dim, dim)
        self.proj_y = Linear(dim, dim)


class PatchBlock(nn.Module):
    """One MMDiT block. With ``last=True`` the text stream's output is not computed (nothing reads it)."""

    def __init__(self, dim: int, num_heads: int, last: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.last = last
        self.norm_x1 = RMSNorm(dim)
        self.norm_y1 = RMSNorm(dim)
        self.attn = JointAttention(dim, num_heads)
        self.norm_x2 = RMSNorm(dim)
        self.norm_y2 = RMSNorm(dim)
        self.mlp_x = SwiGLU(dim)
        self.mlp_y = SwiGLU(dim)
        # The SiLU of the condition is applied once in the net; the Linear keeps the key `adaLN_modulation_*.0`.
        self.adaLN_modulation_img = nn.Sequential(Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(Linear(dim, 6 * dim))

    def _split(self, t: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        return t.unflatten(-1, (parts, self.num_heads, -1)).unbind(2)  # parts x (B, N, h, d)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, rope_x: RopeTable, rope_y: RopeTable | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D) image tokens, y (B, T, D) text tokens, c (B, 1, D) = silu(t_emb)."""
        attn, D = self.attn, self.dim
        mi = self.adaLN_modulation_img[0](c).chunk(6, dim=-1)  # 6 x (B, 1, D)
        lin_t = self.adaLN_modulation_txt[0]
        if self.last:  # only shift/scale of the attention input are live for the text stream
            mt = F.linear(c.to(lin_t.weight.dtype), lin_t.weight[: 2 * D], lin_t.bias[: 2 * D]).chunk(2, dim=-1)
        else:
            mt = lin_t(c).chunk(6, dim=-1)

        xn = modulate(self.norm_x1(x), mi[0], mi[1])  # (B, L, D)
        yn = modulate(self.norm_y1(y), mt[0], mt[1])  # (B, T, D)
        qx, kx, vx = self._split(attn.qkv_x(xn), 3)  # 3 x (B, L, h, d)
        qx = apply_rope(attn.q_norm_x(qx), rope_x)
        kx = apply_rope(attn.k_norm_x(kx), rope_x)
        if self.last:  # text queries are dead in the last block: compute keys and values only
            ky, vy = self._split(F.linear(yn.to(attn.qkv_y.weight.dtype), attn.qkv_y.weight[D:]), 2)  # 2 x (B, T, h, d)
        else:
            qy, ky, vy = self._split(attn.qkv_y(yn), 3)  # 3 x (B, T, h, d)
            qy = attn.q_norm_y(qy)
        ky = attn.k_norm_y(ky)
        if rope_y is not None:
            ky = apply_rope(ky, rope_y)
            if not self.last:
                qy = apply_rope(qy, rope_y)

        # parity: the joint sequence is [text, image] (text first).
        k = torch.cat([ky, kx], dim=1)  # (B, T+L, h, d)
        v = torch.cat([vy, vx], dim=1)
        T = y.shape[1]
        if self.last:
            ox = attention(qx, k, v)  # (B, L, D)
        else:
            o = attention(torch.cat([qy, qx], dim=1), k, v)  # (B, T+L, D)
            oy, ox = o[:, :T], o[:, T:]
            y = y + mt[2] * attn.proj_y(oy.to(y.dtype))
            y = y + mt[5] * self.mlp_y(modulate(self.norm_y2(y), mt[3], mt[4]))
        x = x + mi[2] * attn.proj_x(ox.to(x.dtype))
        x = x + mi[5] * self.mlp_x(modulate(self.norm_x2(x), mi[3], mi[4]))
        return x, y
