"""The LQ image of a training sample: the reference's one fixed degradation, a /4 bicubic downsample.

Legend: B batch, H/W HQ pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DOWNSCALE = 4.0


def lq_size(height: int, width: int, downscale: float = DOWNSCALE) -> tuple[int, int]:
    """The LQ image size of an HQ ``height x width`` image: ``(int(H / 4), int(W / 4))`` (truncation)."""
    return int(height / downscale), int(width / downscale)


def downsample_lq(hq: torch.Tensor) -> torch.Tensor:
    """HQ (B, 3, H, W) in [-1, 1] -> LQ (B, 3, int(H/4), int(W/4)) float32, clamped to [-1, 1].

    Bicubic (Keys a = -0.5) with antialiasing, ``align_corners=False``: the reference's only degradation,
    equal to PIL ``BICUBIC`` on float images. Deterministic.
    """
    if hq.ndim != 4 or hq.shape[1] != 3:
        raise ValueError(f"downsample_lq expects an HQ image batch (B, 3, H, W), got shape {tuple(hq.shape)}")
    if not hq.is_floating_point():
        raise ValueError(f"downsample_lq expects a float image in [-1, 1], got dtype {hq.dtype}")
    size = lq_size(hq.shape[-2], hq.shape[-1])
    if min(size) < 1:
        raise ValueError(f"HQ image {hq.shape[-2]}x{hq.shape[-1]} is too small for a /4 downsample (needs >= 4 px)")
    lq = F.interpolate(hq.float(), size=size, mode="bicubic", align_corners=False, antialias=True)  # (B, 3, h, w)
    return lq.clamp_(-1.0, 1.0)
