"""qwenimage: the Qwen-Image (Wan-2.1 style) causal 3-D VAE used with one frame (backbones.md §6).

Legend: B batch, T=1 frame, H/W pixels, h/w = H/8, W/8.

PiD latent z = (μ − mean[c]) / std[c] with the 16-vectors of the diffusers config. For one frame the
causal convolutions only see their last temporal tap, so diffusers' 5-D VAE on x[:, :, None] equals the
reference's 2-D port.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .base import BACKBONE_INFO, Backbone
from .vae import check_module_class, load_vae, prepare_module, resolve_device_dtype
from .weights import shipped_config

logger = logging.getLogger(__name__)

_CONFIG = shipped_config("qwenimage_vae.json")
LATENTS_MEAN: tuple[float, ...] = tuple(_CONFIG["latents_mean"])
LATENTS_STD: tuple[float, ...] = tuple(_CONFIG["latents_std"])


def _refuse_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    raise ValueError(
        "this file is not in the diffusers AutoencoderKLQwenImage layout. The qwenimage backbone loads the "
        "diffusers weights of Qwen/Qwen-Image/vae (folder or diffusion_pytorch_model.safetensors); the reference's "
        "2-D QwenImage_VAE_2d.pth is not supported."
    )


class QwenImageBackbone(Backbone):
    """Qwen-Image: per-channel (μ − mean) / std on the single-frame posterior mean."""

    info = BACKBONE_INFO["qwenimage"]

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        check_module_class(vae, "AutoencoderKLQwenImage", self.name)
        cfg = vae.config
        if cfg.z_dim != self.latent_channels:
            raise ValueError(f"backbone 'qwenimage' needs a VAE with z_dim 16, got {cfg.z_dim}")
        for key, expected in (("latents_mean", LATENTS_MEAN), ("latents_std", LATENTS_STD)):
            got = tuple(getattr(cfg, key))
            if len(got) != len(expected) or any(abs(a - b) > 1e-4 for a, b in zip(got, expected)):
                raise ValueError(
                    f"qwenimage VAE config {key} differs from Qwen-Image's: got {got}, expected {expected}"
                )
        self.mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.vae = prepare_module(vae, self.device, dtype)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        mu = self.vae.encode(images.to(self.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]  # (B, 16, h, w)
        return (mu.float() - self.mean) * self.inv_std  # parity: the reference multiplies by 1/std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents * self.std + self.mean  # (B, 16, h, w)
        return self.vae.decode(raw.to(self.dtype)[:, :, None]).sample[:, :, 0]  # (B, 3, H, W)


def load_qwenimage(
    path: str | Path | None = None,
    *,
    module: torch.nn.Module | None = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> QwenImageBackbone:
    if module is None:
        module = load_vae(
            BACKBONE_INFO["qwenimage"], "AutoencoderKLQwenImage", path, config, "qwenimage_vae.json", _refuse_ldm
        )
        device, dtype = resolve_device_dtype(None, device, dtype)
    else:
        device, dtype = resolve_device_dtype(module, device, dtype)
    return QwenImageBackbone(module, device, dtype)
