"""flux2: the FLUX.2 VAE (also FLUX.2-klein), diffusers `AutoencoderKLFlux2` (backbones.md §5).

Legend: B batch, H/W pixels, 32 raw channels at H/8, 128 PiD channels at H/16.

PiD latent = BatchNorm_eval(patchify_2x2(μ)) with eps 1e-4 and the VAE's running statistics; diffusers'
`encode` returns only the raw 32-channel posterior, the rest is done here.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..registry import BACKBONE_INFO
from .base import Backbone
from .packing import FLUX2_BN_EPS, patchify_2x2, unpatchify_2x2
from .vae import check_module_class, convert_ldm_kl, load_vae, prepare_module, resolve_device_dtype

logger = logging.getLogger(__name__)


def convert_bfl_flux2(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BFL FLUX.2 `ae.safetensors` -> `AutoencoderKLFlux2` names (backbones.md §5, verified bit-exact).

    The conv stack is the LDM layout; BFL nests the quant convs inside encoder/decoder and stores the
    batch-norm statistics as `bn.*`.
    """
    out = convert_ldm_kl(state, config)
    moves = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    for key, value in state.items():
        for old, new in moves.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
        if key.startswith("bn."):
            out[key] = value
    return out


class Flux2Backbone(Backbone):
    """FLUX.2: patchify the 32-channel posterior mean 2x2 to 128 channels, then batch-norm (eval)."""

    info = BACKBONE_INFO["flux2"]

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        check_module_class(vae, "AutoencoderKLFlux2", self.name)
        if vae.config.latent_channels * 4 != self.latent_channels:
            raise ValueError(
                "backbone 'flux2' needs an AutoencoderKLFlux2 with 32 latent channels, "
                f"got {vae.config.latent_channels}"
            )
        eps = vae.config.batch_norm_eps
        if not math.isclose(eps, FLUX2_BN_EPS, rel_tol=1e-6):
            raise ValueError(f"FLUX.2 VAE batch_norm_eps must be {FLUX2_BN_EPS}, the module has {eps}")
        # The statistics are read before any cast so that a bf16 VAE still normalises with fp32 values.
        bn = vae.bn
        self.bn_mean = bn.running_mean.detach().float().view(1, -1, 1, 1).to(self.device)  # (1, 128, 1, 1)
        self.bn_std = torch.sqrt(bn.running_var.detach().float() + FLUX2_BN_EPS).view(1, -1, 1, 1).to(self.device)
        self.vae = prepare_module(vae, self.device, dtype)

    def _bn_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn_mean, self.bn_std

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        mu = self.vae.encode(images.to(self.dtype)).latent_dist.mode()  # (B, 32, H/8, W/8)
        x = patchify_2x2(mu.float())  # (B, 128, H/16, W/16)
        mean, std = self._bn_stats()
        return (x - mean) / std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_stats()
        raw = unpatchify_2x2(latents * std + mean)  # (B, 32, H/8, W/8)
        return self.vae.decode(raw.to(self.dtype)).sample  # (B, 3, H, W)


def load_flux2(
    path: str | Path | None = None,
    *,
    module: torch.nn.Module | None = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Flux2Backbone:
    if module is None:
        module = load_vae(
            BACKBONE_INFO["flux2"], "AutoencoderKLFlux2", path, config, "flux2_vae.json", convert_bfl_flux2
        )
        device, dtype = resolve_device_dtype(None, device, dtype)
    else:
        device, dtype = resolve_device_dtype(module, device, dtype)
    return Flux2Backbone(module, device, dtype)
