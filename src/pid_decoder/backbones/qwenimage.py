"""qwenimage: the Qwen-Image (Wan-2.1 style) causal 3-D VAE used with one frame (backbones.md §6).

Legend: B batch, T=1 frame, H/W pixels, h/w = H/8, W/8.

PiD latent z = (μ − mean[c]) / std[c] with the 16-vectors of the diffusers config. For one frame the
causal convolutions only see their last temporal tap, so diffusers' 5-D VAE on x[:, :, None] equals the
reference's 2-D port; the reference's 2-D weight file (QwenImage_VAE_2d.pth) is converted to the 3-D layout on
load (`state_2d_to_3d`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..keys import listing
from ..registry import BACKBONE_INFO
from .base import Backbone
from .vae import check_module_class, load_vae, prepare_module, resolve_device_dtype
from .weights import shipped_config

logger = logging.getLogger(__name__)

_CONFIG = shipped_config("qwenimage_vae.json")
LATENTS_MEAN: tuple[float, ...] = tuple(_CONFIG["latents_mean"])
LATENTS_STD: tuple[float, ...] = tuple(_CONFIG["latents_std"])


def _refuse_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    raise ValueError(
        "this file is not in the diffusers AutoencoderKLQwenImage layout nor in the reference's 2-D layout "
        "(QwenImage_VAE_2d.pth). The qwenimage backbone loads the diffusers weights of Qwen/Qwen-Image/vae (folder "
        "or diffusion_pytorch_model.safetensors) or the reference's checkpoints/QwenImage_VAE_2d.pth."
    )


# ------------------------------------------------------------------ the reference's 2-D port (backbones.md §8)
_RESIDUAL_2D = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_MID_2D = {"resnets.0.": "middle.0.", "attentions.0.": "middle.1.", "resnets.1.": "middle.2."}


def _residual_2d(rest: str) -> str:
    for name3, name2 in _RESIDUAL_2D:
        if rest.startswith(name3):
            return name2 + rest[len(name3):]
    return rest


def name_2d(key: str, num_res_blocks: int) -> str | None:
    """The reference 2-D port's name of a diffusers `AutoencoderKLQwenImage` key; None for ``time_conv`` (3-D only)."""
    if ".time_conv." in key:
        return None
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
           "decoder.conv_in.": "decoder.conv1.", "encoder.conv_out.": "encoder.head.2.",
           "decoder.conv_out.": "decoder.head.2.", "encoder.norm_out.": "encoder.head.0.",
           "decoder.norm_out.": "decoder.head.0."}
    for name3, name2 in top.items():
        if key.startswith(name3):
            return name2 + key[len(name3):]
    part, _, rest = key.partition(".")  # "encoder" / "decoder"
    if rest.startswith("mid_block."):
        rest = rest[len("mid_block."):]
        for name3, name2 in _MID_2D.items():
            if rest.startswith(name3):
                inner = rest[len(name3):]
                return f"{part}.{name2}{_residual_2d(inner) if name3.startswith('resnets') else inner}"
        return key
    fields = rest.split(".")
    if part == "encoder" and fields[0] == "down_blocks":
        return f"encoder.downsamples.{fields[1]}.{_residual_2d('.'.join(fields[2:]))}"
    if part == "decoder" and fields[0] == "up_blocks":
        level, per_level = int(fields[1]), num_res_blocks + 2  # R + 1 residual blocks and the upsampler
        if fields[2] == "resnets":
            return f"decoder.upsamples.{level * per_level + int(fields[3])}.{_residual_2d('.'.join(fields[4:]))}"
        if fields[2] == "upsamplers":  # upsamplers.0.resample.1.*
            return f"decoder.upsamples.{level * per_level + num_res_blocks + 1}.{'.'.join(fields[4:])}"
    return key


def state_3d_to_2d(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers 3-D state -> the reference's 2-D layout: last temporal tap of each kernel, (C,1,1) RMS gammas."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key2 = name_2d(key, num_res_blocks)
        if key2 is None:
            continue
        if t.ndim == 5:
            t = t[:, :, -1]  # (O, I, kh, kw): a causal conv on one frame only sees its last tap
        elif key2.endswith("gamma") and t.ndim == 4:
            t = t.reshape(t.shape[0], 1, 1)
        out[key2] = t.clone()
    return out


def state_2d_to_3d(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's 2-D state dict -> ``model``'s (an `AutoencoderKLQwenImage`) 3-D state dict.

    Every 2-D key must be used and every 3-D key found (else a ValueError names them, in the file's 2-D names).
    Each 2-D kernel goes in the last temporal tap, the other taps are zero, and ``time_conv`` (never evaluated
    on a single frame) is zero: exact for images (T = 1), which is all PiD decodes.
    """
    expected = model.state_dict()
    blocks = int(model.config.num_res_blocks)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for key, ref in expected.items():
        key2 = name_2d(key, blocks)
        if key2 is None:  # time_conv
            out[key] = torch.zeros_like(ref)
            continue
        if key2 not in state:
            missing.append(key2)
            continue
        used.add(key2)
        t = state[key2]
        if ref.ndim == 5 and t.ndim == 4 and tuple(t.shape) == (ref.shape[0], ref.shape[1], *ref.shape[3:]):
            full = torch.zeros(ref.shape, dtype=t.dtype)
            full[:, :, -1] = t  # (O, I, T, kh, kw): causal padding puts the single frame at the last tap
            t = full
        elif key.endswith("gamma") and t.numel() == ref.numel() and t.ndim != ref.ndim:
            t = t.reshape(ref.shape)
        out[key] = t
    unexpected = [k for k in state if k not in used]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys: {listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {listing(unexpected)}")
        raise ValueError(
            "this file is in the reference's 2-D Qwen-Image VAE layout (QwenImage_VAE_2d.pth) but does not match "
            f"the qwenimage architecture ({'; '.join(problems)}). Is it the VAE of another model?"
        )
    return out


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
            BACKBONE_INFO["qwenimage"], "AutoencoderKLQwenImage", path, config, "qwenimage_vae.json", _refuse_ldm,
            state_2d_to_3d,
        )
        device, dtype = resolve_device_dtype(None, device, dtype)
    else:
        device, dtype = resolve_device_dtype(module, device, dtype)
    return QwenImageBackbone(module, device, dtype)
