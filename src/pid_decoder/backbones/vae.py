"""flux, sd3, sdxl: diffusers `AutoencoderKL` with an affine latent normalisation (backbones.md §2-4).

Legend: B batch, H/W pixels, h/w = H/8, W/8 latent grid.

PiD latent z = scale·(μ − shift) where μ is the posterior mean; the native decode inverts it,
raw = z/scale + shift. The scale/shift constants are the reference's, and a module whose config says
otherwise (e.g. an SD3 VAE passed as flux) is refused.

This module also holds `load_vae`, the one loader of diffusers VAEs from the files users have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..registry import BACKBONE_INFO, BackboneInfo
from .base import Backbone
from .weights import (
    diffusers_folder,
    find_file,
    hub_offline,
    is_ldm_layout,
    is_wan_2d_layout,
    load_checked,
    missing_file,
    read_config,
    read_state_dict,
)

logger = logging.getLogger(__name__)

# (scale, shift) of z = scale·(μ − shift), backbones.md §0.
KL_NORMALISATION: dict[str, tuple[float, float]] = {
    "flux": (0.3611, 0.1159),
    "sd3": (1.5305, 0.0609),
    "sdxl": (0.13025, 0.0),
}
KL_CONFIG_FILES = {"flux": "flux_vae.json", "sd3": "sd3_vae.json", "sdxl": "sdxl_vae.json"}
SINGLE_FILE_NAMES = ("ae.safetensors", "diffusion_pytorch_model.safetensors", "sdxl_vae.safetensors")


def resolve_device_dtype(
    module: torch.nn.Module | None, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Explicit arguments win; otherwise a given module keeps its own device/dtype; otherwise CPU float32."""
    if module is not None:
        param = next(module.parameters(), None)
        if param is not None:
            device = param.device if device is None else device
            dtype = param.dtype if dtype is None else dtype
    return torch.device(device if device is not None else "cpu"), dtype if dtype is not None else torch.float32


def load_vae(
    info: BackboneInfo,
    class_name: str,
    path: str | Path | None,
    config: str | Path | dict | None,
    default_config: str,
    convert_ldm: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]],
    convert_2d: Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]] | None = None,
) -> torch.nn.Module:
    """Build a diffusers VAE `class_name` from `path`: a diffusers folder, or a single weight file.

    A single file may be in diffusers or BFL/LDM layout; the latter goes through `convert_ldm`. A file in the
    reference's 2-D Wan layout (``QwenImage_VAE_2d.pth``) goes through `convert_2d` when given. Its
    architecture comes from `config` (a dict, JSON file or folder) or the shipped `default_config`.
    `path=None` falls back to `from_pretrained(info.hub_repo, subfolder="vae")`, offline when
    HF_HUB_OFFLINE is set.
    """
    import diffusers

    cls = getattr(diffusers, class_name)
    if path is None:
        logger.info("loading the %s VAE from the hub repo %s (subfolder vae)", info.name, info.hub_repo)
        try:
            local = hub_offline(info.hub_repo, "vae/config.json")
            return cls.from_pretrained(info.hub_repo, subfolder="vae", local_files_only=local)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load the {info.name} VAE from {info.hub_repo}/vae ({err}). Pass path= with "
                f"{info.weight_files}."
            ) from err
    p = Path(path)
    if not p.exists():
        raise missing_file("VAE weights", p, info.name, info.weight_files)
    if p.is_dir():
        folder = diffusers_folder(p)
        if folder is not None:
            found = read_config(folder, default_config).get("_class_name")
            if found not in (None, class_name):
                raise ValueError(
                    f"{str(folder)!r} holds a {found}, but backbone {info.name!r} needs a {class_name} "
                    f"({info.weight_files})."
                )
            logger.info("loading the %s VAE from the diffusers folder %s", info.name, folder)
            return cls.from_pretrained(str(folder), local_files_only=True)
        single = find_file(p, SINGLE_FILE_NAMES)
        if single is None:
            raise missing_file("VAE weights", p, info.name, info.weight_files)
        p = single
    state = read_state_dict(p, info.name, info.weight_files)
    cfg = read_config(config, default_config)
    cfg.pop("_comment", None)
    model = cls.from_config(cfg)
    if convert_2d is not None and is_wan_2d_layout(state):
        logger.info("converting %s from the reference's 2-D layout to the diffusers 3-D layout", p)
        try:
            state = convert_2d(state, model)
        except ValueError as err:
            raise ValueError(f"{str(p)!r}: {err}") from None
    elif is_ldm_layout(state):
        logger.info("converting %s from the BFL/LDM layout to diffusers names", p)
        state = convert_ldm(state, dict(model.config))
    load_checked(model, state, str(p), info.name)
    return model


def convert_ldm_kl(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BFL/LDM `AutoencoderKL` names -> diffusers names (diffusers' own single-file converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, config)


def check_module_class(module: Any, class_name: str, backbone: str) -> None:
    names = [c.__name__ for c in type(module).__mro__]
    if class_name not in names:
        raise ValueError(f"backbone {backbone!r} needs a diffusers {class_name}, got module={type(module).__name__}")


def prepare_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Inference mode on `device` in `dtype`; a module already there is left untouched (no copy, no warning)."""
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        logger.info("casting %s from %s to %s", type(module).__name__, param.dtype, dtype)
        # torch's own `to`: diffusers' override warns about fp32-pinned modules, which these VAEs do not have
        module = torch.nn.Module.to(module, dtype=dtype)
    if param is not None and param.device != device:
        module = module.to(device)
    return module.eval().requires_grad_(False)


class KLBackbone(Backbone):
    """flux / sd3 / sdxl: z = scale·(μ − shift) on an `AutoencoderKL` posterior mean."""

    def __init__(self, name: str, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.info = BACKBONE_INFO[name]
        super().__init__(device, dtype)
        self.scale, self.shift = KL_NORMALISATION[name]
        check_module_class(vae, "AutoencoderKL", name)
        self._check_config(vae.config)
        self.vae = prepare_module(vae, self.device, dtype)

    def _check_config(self, config: Any) -> None:
        channels = config.latent_channels
        if channels != self.latent_channels:
            raise ValueError(
                f"backbone {self.name!r} needs an AutoencoderKL with {self.latent_channels} latent channels, "
                f"got one with {channels} (scaling_factor {config.scaling_factor}). "
                f"{'Use backbone sdxl.' if channels == 4 else ''}"
            )
        scale = config.scaling_factor
        shift = config.shift_factor or 0.0
        if not (math.isclose(scale, self.scale, rel_tol=1e-4) and math.isclose(shift, self.shift, abs_tol=1e-4)):
            match = [n for n, (s, t) in KL_NORMALISATION.items() if math.isclose(scale, s, rel_tol=1e-4)]
            raise ValueError(
                f"backbone {self.name!r} expects a VAE with scaling_factor {self.scale} and shift_factor "
                f"{self.shift}, got {scale} and {shift}. "
                + (f"This looks like the {match[0]} VAE: use backbone {match[0]!r}." if match else "")
            )

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        mu = self.vae.encode(images.to(self.dtype)).latent_dist.mode()  # (B, C, h, w)
        return self.scale * (mu.float() - self.shift)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents / self.scale + self.shift  # (B, C, h, w)
        return self.vae.decode(raw.to(self.dtype)).sample  # (B, 3, H, W)


def load_kl(
    name: str,
    path: str | Path | None = None,
    *,
    module: torch.nn.Module | None = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> KLBackbone:
    if module is None:
        module = load_vae(BACKBONE_INFO[name], "AutoencoderKL", path, config, KL_CONFIG_FILES[name], convert_ldm_kl)
        device, dtype = resolve_device_dtype(None, device, dtype)
    else:
        device, dtype = resolve_device_dtype(module, device, dtype)
    if name == "sdxl" and dtype == torch.float16:
        logger.warning("the SDXL VAE overflows in float16; use bfloat16 or float32")
    return KLBackbone(name, module, device, dtype)
