"""Pixel pathway (PiT): per-pixel tokens modulated by their patch token, attention over compressed patches.

Legend: B batch, L patch tokens, N = B*L, P pixels per patch (patch_size^2), C pixel width,
A compressed attention width, D patch hidden size, h heads, d head dim.

Everything here except the attention acts on each patch separately, so it is evaluated in chunks of
patch tokens (``chunk`` tokens at a time): activation memory is bounded by the chunk, not the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import apply_rope, attention
from .layers import Linear, PixelMLP, RMSNorm, modulate
from .positions import RopeTable


def _chunks(n: int, chunk: int | None):
    step = n if not chunk or chunk >= n else chunk
    for start in range(0, n, step):
        yield start, min(start + step, n)


class PixelAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 x (B, L, h, d)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        return self.proj(attention(q, k, v).to(x.dtype))  # (B, L, A)


class PixelModulation(nn.Linear):
    """``Linear(D -> 6*P*C)`` producing the per-pixel adaLN parameters of a PiT block.

    The reference orders the output features (pixel, chunk, channel). Here the rows are stored
    (chunk, pixel, channel), so each of the six chunks is a contiguous row range of the weight and
    can be computed on its own without copies; `state_dict()` and `load_state_dict()` convert, so
    checkpoints keep the reference layout.
    """

    def __init__(self, dim: int, pixels: int, channels: int) -> None:
        super().__init__(dim, 6 * pixels * channels)
        self.pixels, self.channels = pixels, channels
        self.register_load_state_dict_pre_hook(PixelModulation._from_reference)
        self.register_state_dict_post_hook(PixelModulation._to_reference)

    def _reorder(self, t: torch.Tensor, to_reference: bool) -> torch.Tensor:
        P, C = self.pixels, self.channels
        src = (6, P, C) if to_reference else (P, 6, C)
        return t.reshape(*src, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def _from_reference(self, state_dict, prefix, *args) -> None:
        for name in ("weight", "bias"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape == getattr(self, name).shape:
                state_dict[key] = self._reorder(state_dict[key], to_reference=False)

    def _to_reference(self, state_dict, prefix, *args) -> None:
        for name in ("weight", "bias"):
            key = prefix + name
            if key in state_dict and state_dict[key].device.type != "meta":
                state_dict[key] = self._reorder(state_dict[key], to_reference=True)

    def chunks(self, cond: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Chunks ``first .. first+count-1`` of the six, for cond (n, D) -> (n, count, P, C)."""
        rows = slice(first * self.pixels * self.channels, (first + count) * self.pixels * self.channels)
        out = F.linear(cond.to(self.weight.dtype), self.weight[rows], self.bias[rows])  # (n, count*P*C)
        return out.view(-1, count, self.pixels, self.channels)


class PixelBlock(nn.Module):
    def __init__(self, hidden: int, pixel_dim: int, attn_dim: int, num_heads: int, pixels: int) -> None:
        super().__init__()
        self.compress_to_attn = Linear(pixels * pixel_dim, attn_dim)
        self.expand_from_attn = Linear(attn_dim, pixels * pixel_dim)
        self.norm1 = RMSNorm(pixel_dim)
        self.attn = PixelAttention(attn_dim, num_heads)
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = PixelMLP(pixel_dim, 4 * pixel_dim)
        self.adaLN_modulation = nn.Sequential(PixelModulation(hidden, pixels, pixel_dim))

    def forward(
        self, p: torch.Tensor, cond: torch.Tensor, rope: RopeTable, batch: int, chunk: int | None = None
    ) -> torch.Tensor:
        """p (N, P, C) pixel tokens, cond (N, D) patch conditions -> updated pixel tokens (N, P, C).

        Without autograd p is updated in place and returned (no copy of the largest activation); with
        autograd the block input must stay intact for the backward pass, so the residuals go out of place.
        """
        mod = self.adaLN_modulation[0]
        N = p.shape[0]
        compressed = []
        for s, e in _chunks(N, chunk):
            shift, scale = mod.chunks(cond[s:e], 0, 2).unbind(1)  # 2 x (n, P, C)
            xn = modulate(self.norm1(p[s:e]), shift, scale)  # (n, P, C)
            compressed.append(self.compress_to_attn(xn.flatten(1)))  # (n, A)
        xc = torch.cat(compressed) if len(compressed) > 1 else compressed[0]  # (N, A)
        a = self.attn(xc.view(batch, N // batch, -1), rope).flatten(0, 1)  # (N, A)
        in_place = not torch.is_grad_enabled()
        outs = []
        for s, e in _chunks(N, chunk):
            gate_msa, shift, scale, gate_mlp = mod.chunks(cond[s:e], 2, 4).unbind(1)  # 4 x (n, P, C)
            x = p[s:e]  # (n, P, C) float32 view of the residual stream
            attn_out = gate_msa * self.expand_from_attn(a[s:e]).view_as(gate_msa)
            x = x.add_(attn_out) if in_place else x + attn_out
            mlp_out = gate_mlp * self.mlp(modulate(self.norm2(x), shift, scale))
            outs.append(x.add_(mlp_out) if in_place else x + mlp_out)
        return p if in_place else torch.cat(outs)  # (N, P, C)


class PixelEmbedder(nn.Module):
    """Per-pixel Linear(3 -> C) plus the full-image sin-cos position embedding, grouped by patch."""

    def __init__(self, in_channels: int, pixel_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = Linear(in_channels, pixel_dim)

    def forward(self, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, 3, H, W) -> (B*L, P, C) with token = patch row-major, pixel = row-major in the patch."""
        B, _, H, W = x.shape
        ps = self.patch_size
        e = self.proj(x.permute(0, 2, 3, 1)).float()  # (B, H, W, C), float32 residual stream
        col, row = pos  # (W, C/2), (H, C/2)
        half = col.shape[-1]
        e[..., :half] += col[None, None]
        e[..., half:] += row[None, :, None]
        e = e.view(B, H // ps, ps, W // ps, ps, -1).permute(0, 1, 3, 2, 4, 5)  # (B, Hs, Ws, ps, ps, C)
        return e.reshape(B * (H // ps) * (W // ps), ps * ps, -1)  # (N, P, C)


class FinalLayer(nn.Module):
    def __init__(self, pixel_dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(pixel_dim)
        self.linear = Linear(pixel_dim, out_channels)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(p))  # (N, P, 3)
