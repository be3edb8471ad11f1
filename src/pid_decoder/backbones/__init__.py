"""The latent spaces PiD decodes: one thin layer over diffusers / transformers per backbone.

    backbone = load_backbone("flux", "ae.safetensors")         # or module=pipe.vae
    z = backbone.encode(image_to_tensor(pil, backbone.image_multiple))   # (1, 16, H/8, W/8)
    z_noisy = backbone.add_noise(z, 0.2, torch.Generator().manual_seed(5))
    baseline = backbone.decode(z_noisy)                         # (1, 3, H, W) in [-1, 1]

    latent, sigma = latents_from_pipeline(pipe, out.images, height=512, width=512)

Importing this package is cheap: diffusers and transformers are imported when a backbone is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..registry import BACKBONE_ALIASES, BACKBONE_INFO, BACKBONES, BackboneInfo, resolve_backbone_name
from .base import Backbone, add_noise, check_latent
from .images import image_to_tensor, tensor_to_image
from .packing import capture_sigma, latents_from_pipeline, patchify_2x2, pipeline_kind, sdxl_to_vp, unpatchify_2x2

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BACKBONE_ALIASES",
    "BACKBONE_INFO",
    "Backbone",
    "BackboneInfo",
    "add_noise",
    "capture_sigma",
    "check_latent",
    "image_to_tensor",
    "latents_from_pipeline",
    "load_backbone",
    "make_backbone",
    "patchify_2x2",
    "pipeline_kind",
    "resolve_backbone_name",
    "sdxl_to_vp",
    "tensor_to_image",
    "unpatchify_2x2",
]


def load_backbone(
    name: str,
    path: str | Path | None = None,
    *,
    module: Any = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Build the backbone `name` (flux, sd3, sdxl, flux2, qwenimage, dinov2, siglip, or an alias).

    Args:
        name: backbone or alias (zimage, zimage-turbo -> flux; flux2-klein-4b/-9b -> flux2;
            qwenimage-2512 -> qwenimage).
        path: the weights users have (docs/backbones.md): a BFL `ae.safetensors` (flux, flux2), a single
            diffusers-layout `.safetensors`, a diffusers VAE folder (or a pipeline folder with vae/), or the
            RAE folder (dinov2, siglip). None: `from_pretrained` of the documented hub repo (VAEs only),
            offline when HF_HUB_OFFLINE=1.
        module: an already built model instead of `path`: `pipe.vae` (a diffusers VAE), an `AutoencoderRAE`
            (dinov2), or `(SiglipVisionModel, RAEDecoder)` (siglip).
        config: the architecture of a single weight file (dict, JSON file or folder with config.json);
            defaults to the published config shipped in `backbones/configs/`.
        device, dtype: where the model runs. Defaults: a given `module` keeps its own device and dtype;
            loaded weights go to CPU float32.
    """
    canonical = resolve_backbone_name(name)
    if module is not None and path is not None:
        raise ValueError("pass either path= or module=, not both")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if device is not None:
        device = resolve_device(device)  # "cuda" without CUDA: a ValueError naming the devices there are
    kwargs = dict(module=module, config=config, device=device, dtype=dtype)
    if canonical in ("flux", "sd3", "sdxl"):
        from .vae import load_kl

        backbone = load_kl(canonical, path, **kwargs)
    elif canonical == "flux2":
        from .flux2 import load_flux2

        backbone = load_flux2(path, **kwargs)
    elif canonical == "qwenimage":
        from .qwenimage import load_qwenimage

        backbone = load_qwenimage(path, **kwargs)
    elif canonical == "dinov2":
        from .rae import load_dinov2

        backbone = load_dinov2(path, **kwargs)
    else:
        from .siglip import load_siglip

        backbone = load_siglip(path, **kwargs)
    logger.info("loaded %r", backbone)
    return backbone


def make_backbone(name: str | None, source: Any, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Backbone | None:
    """A backbone from what a caller holds: None/False (none), a backbone object (as is), a diffusers module
    (``module=``) or a weight path, the last two loaded as `name`."""
    if source is None or source is False:
        return None
    if hasattr(source, "encode") and hasattr(source, "add_noise") and hasattr(source, "check_latent"):
        return source  # already a backbone
    if name is None:
        raise ValueError("a backbone path/module was given but the latent space is unknown; pass backbone_name=")
    if isinstance(source, (str, os.PathLike)):
        return load_backbone(name, source, device=device, dtype=dtype)
    return load_backbone(name, module=source, device=device, dtype=dtype)
