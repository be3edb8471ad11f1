"""Small building blocks: RMSNorm, SwiGLU feed-forward, adaLN modulation, timestep embedding.

Legend: B batch, N tokens, D width.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


class Float32Params:
    """Mixin for small modules whose parameters stay float32 whatever dtype the network is cast to.

    Norm weights and gate scalars are tiny; keeping them float32 avoids casting them on every call.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.restore_float32()
        return self

    def restore_float32(self) -> None:
        for param in self.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()


class Linear(nn.Linear):
    """``nn.Linear`` that casts its input to the weight dtype (bf16 weights, fp32 residual streams)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that casts its input to the weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class GroupNorm32(Float32Params, nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the weight dtype (as CUDA autocast does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm32(Float32Params, nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the weight dtype (as CUDA autocast does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(Float32Params, nn.Module):
    """RMSNorm whose statistics are computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:  # one fused kernel: x * rsqrt(mean(x^2) + eps) * weight
            return F.rms_norm(x, shape, self.weight, self.eps)
        # parity: the reference casts back to the input dtype before multiplying by its float32 weight.
        return F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with hidden width ``int(2 * 4 * dim / 3)`` and no biases."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PixelMLP(nn.Module):
    """Per-pixel MLP of the PiT blocks: Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@functools.lru_cache(maxsize=8)
def _timestep_freqs(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    # float32 on purpose: kept out of the module's buffers so that casting the net to bf16 cannot round it.
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``t`` (on the 0-1000 scale) followed by a two-layer MLP."""

    freq_dim = 256
    # parity: the reference's timestep embedding uses max_period=10 (not 10000) and [cos, sin] order.
    max_period = 10.0

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(self.freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * _timestep_freqs(self.freq_dim // 2, self.max_period, t.device)[None]  # (B, 128)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))  # (B, D)
