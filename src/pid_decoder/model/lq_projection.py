"""LQ projection: the conditioning latent -> one feature map per injection point, and sigma-aware gates.

Legend: B batch, c latent channels, h/w latent grid, Hs/Ws patch grid, L = Hs*Ws, K hidden width of
the projection, D patch hidden size, f = patch size / sr_scale LQ pixels per patch token.

The v1.5 auxiliary LQ-RGB head (``lq_aux_rgb_head``) exists only in networks built for training
(``aux_head=True``): it predicts the LQ image from the trunk's tokens for an alignment loss and is never
part of the inference forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LQConfig
from .layers import Conv2d, Float32Params, GroupNorm32, LayerNorm32, Linear


class ResBlock(nn.Module):
    def __init__(self, dim: int, padding_mode: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            GroupNorm32(4, dim, eps=1e-5),
            nn.SiLU(),
            Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
            GroupNorm32(4, dim, eps=1e-5),
            nn.SiLU(),
            Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SigmaGate(Float32Params, nn.Module):
    """``x + sigmoid(content_proj([x, lq]) - exp(log_alpha) * sigma) * lq``.

    ``per_dim=False`` (v1.5): one logit per token; ``per_dim=True`` (v1): one logit per token and channel.
    """

    def __init__(self, dim: int, per_dim: bool) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.content_proj = Linear(2 * dim, dim if per_dim else 1)

    def forward(self, x: torch.Tensor, lq: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x, lq (B, L, D); sigma (B,) float32."""
        logits = self.content_proj(torch.cat([x, lq.to(x.dtype)], dim=-1)).float()  # (B, L, 1 | D)
        logits = logits - self.log_alpha.exp() * sigma.float()[:, None, None]
        gate = torch.sigmoid(logits)
        return x + gate * lq  # float32 residual stream


class LQProjection(nn.Module):
    """Latent -> ``num_heads`` feature maps on the patch grid (plus the PiT feature map for v1.5).

    ``aux_head=True`` (training only, and only where ``cfg.aux_rgb_head``) also builds the LQ-RGB head.
    """

    def __init__(self, cfg: LQConfig, hidden: int, patch_size: int, num_heads: int, aux_head: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        f = cfg.unpatchify_factor
        ratio = cfg.sr_scale * (cfg.latent_down_factor // f) / patch_size  # latent cells -> patch tokens
        self.upsample = ratio > 1
        self.fold = int(round(1 / ratio)) if ratio < 1 else 1
        if ratio > 1 and ratio != int(ratio):
            raise ValueError(f"latent-to-patch ratio {ratio} must be an integer")
        if ratio < 1 and not math.isclose(1 / ratio, self.fold):
            raise ValueError(f"patch-to-latent ratio {1 / ratio} must be an integer")
        in_ch = cfg.conv_latent_channels * self.fold**2
        K, pad = cfg.hidden_dim, cfg.padding_mode
        self.latent_proj = nn.Sequential(
            Conv2d(in_ch, K, 3, padding=1, padding_mode=pad),
            nn.SiLU(),
            Conv2d(K, K, 3, padding=1, padding_mode=pad),
            *[ResBlock(K, pad) for _ in range(cfg.num_res_blocks)],
        )
        self.output_heads = nn.ModuleList(Linear(K, hidden) for _ in range(num_heads))
        self.pit_head = Linear(K, hidden) if cfg.pit_inject else None
        per_dim = cfg.gate_type == "sigma_aware_per_token_per_dim"
        self.gate_modules = nn.ModuleList(SigmaGate(hidden, per_dim) for _ in range(num_heads))
        self.lq_aux_rgb_head = None
        if aux_head and cfg.aux_rgb_head:
            if patch_size % cfg.sr_scale:
                raise ValueError(f"the aux RGB head needs patch_size ({patch_size}) divisible by sr_scale ({cfg.sr_scale})")
            self.aux_factor = patch_size // cfg.sr_scale
            self.lq_aux_rgb_head = nn.Sequential(
                LayerNorm32(K, eps=1e-5), Linear(K, K), nn.SiLU(), Linear(K, 3 * self.aux_factor**2)
            )

    def align(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bring the latent (B, c, h, w) onto the patch grid: unpatchify, then upsample or fold."""
        f = self.cfg.unpatchify_factor
        if f > 1:
            z = F.pixel_shuffle(z, f)  # (B, c/f^2, h*f, w*f)
        Hs, Ws = grid
        if self.upsample:
            # parity: size-based legacy "nearest" (floor(dst * in / out)), not "nearest-exact".
            z = F.interpolate(z, size=(Hs, Ws), mode="nearest")  # (B, c', Hs, Ws)
        elif self.fold > 1:
            F_ = self.fold
            if z.shape[-2:] != (Hs * F_, Ws * F_):
                z = F.interpolate(z, size=(Hs * F_, Ws * F_), mode="bilinear", align_corners=False)
            z = F.pixel_unshuffle(z, F_)  # (B, c'*F^2, Hs, Ws)
        elif z.shape[-2:] != (Hs, Ws):
            z = F.interpolate(z, size=(Hs, Ws), mode="bilinear", align_corners=False)
        return z

    def trunk(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The convolutional trunk: z (B, c, h, w) -> per-token features (B, L, K) on the patch grid."""
        h = self.latent_proj(self.align(z.float(), grid))  # (B, K, Hs, Ws)
        return h.flatten(2).transpose(1, 2)  # (B, L, K)

    def heads(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-token output heads: (B, n, K) -> ([num_heads x (B, n, D)], PiT feature (B, n, D) or None)."""
        feats = [head(tokens) for head in self.output_heads]
        pit = self.pit_head(tokens) if self.pit_head is not None else None
        return feats, pit

    def forward(self, z: torch.Tensor, grid: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """z (B, c, h, w) -> ([num_heads x (B, L, D)], PiT feature (B, L, D) or None)."""
        return self.heads(self.trunk(z, grid))

    def aux_rgb(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Trunk tokens (B, L, K) -> predicted LQ image (B, 3, Hs*f, Ws*f), not clamped (training only)."""
        if self.lq_aux_rgb_head is None:
            raise RuntimeError("this network has no aux LQ-RGB head: build it for training (aux_head=True, v1.5 config)")
        rgb = self.lq_aux_rgb_head(tokens)  # (B, L, 3*f*f)
        rgb = rgb.transpose(1, 2).unflatten(2, grid)  # (B, 3*f*f, Hs, Ws)
        return F.pixel_shuffle(rgb, self.aux_factor)  # (B, 3, Hs*f, Ws*f), channel c*f*f + i*f + j -> (c, i, j)
