"""The common protocol of every latent space PiD decodes, plus the checks shared by all of them.

Legend: B batch, C latent channels, h/w latent grid, H/W pixels.

A backbone turns images in [-1, 1] into the latent exactly as PiD was trained on it (the normalised
posterior mean), decodes such a latent with the backbone's own decoder, and forward-noises it in the
frame PiD's LQ branch was trained with (`add_noise`). Nothing here imports diffusers or transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..presets import presets_for_backbone, presets_for_latent_channels
from ..registry import BACKBONE_INFO, BackboneInfo, resolve_backbone_name

logger = logging.getLogger(__name__)


def _preset_hint(channels: int) -> str:
    """Which presets accept a latent with `channels` channels, for error messages."""
    presets = presets_for_latent_channels(channels)
    if not presets:
        known = sorted({i.latent_channels for i in BACKBONE_INFO.values()})
        return f"No PiD preset takes {channels}-channel latents (known channel counts: {known})."
    backbones = sorted({p.backbone for p in presets})
    aliases = ", ".join(p.alias for p in presets)
    return f"A {channels}-channel latent belongs to backbone(s) {', '.join(backbones)}: presets {aliases}."


def _presets_of(backbone: str) -> str:
    return ", ".join(p.alias for p in presets_for_backbone(backbone)) or "none"


def check_latent(
    backbone: str, latent: torch.Tensor, *, grid: int | None = None, channels: int | None = None
) -> None:
    """Raise ValueError unless `latent` is a finite (B, C, h, w) tensor in `backbone`'s latent space.

    `grid` / `channels` override the released geometry (e.g. the fixed 32x32 grid of dinov2) for
    non-standard encoders such as the tiny test models.
    """
    name = resolve_backbone_name(backbone)
    info = BACKBONE_INFO[name]
    if channels is not None:
        info = dataclasses.replace(info, latent_channels=channels)
    if not isinstance(latent, torch.Tensor):
        raise ValueError(f"{name} latent must be a torch.Tensor of shape (B, C, h, w), got {type(latent).__name__}")
    if latent.ndim != 4:
        raise ValueError(
            f"{name} latent must be 4-D (B, {info.latent_channels}, h, w), got shape {tuple(latent.shape)}. "
            "Packed pipeline latents (B, L, C) go through pid_decoder.backbones.latents_from_pipeline first."
        )
    if not latent.is_floating_point():
        raise ValueError(f"{name} latent must be a floating-point tensor, got dtype {latent.dtype}")
    channels = latent.shape[1]
    if channels != info.latent_channels:
        raise ValueError(
            f"backbone {name!r} expects latents with {info.latent_channels} channels (presets {_presets_of(name)}), "
            f"got {channels} channels (shape {tuple(latent.shape)}). {_preset_hint(channels)}"
        )
    side = grid if grid is not None else info.grid
    if side is not None and tuple(latent.shape[2:]) != (side, side):
        raise ValueError(
            f"backbone {name!r} latents have a fixed {side}x{side} grid, got {tuple(latent.shape[2:])} "
            f"(shape {tuple(latent.shape)})"
        )
    if latent.shape[0] == 0 or latent.shape[2] == 0 or latent.shape[3] == 0:
        raise ValueError(f"{name} latent is empty: shape {tuple(latent.shape)}")
    if not torch.isfinite(latent).all():
        n_bad = int((~torch.isfinite(latent)).sum())
        raise ValueError(f"{name} latent contains {n_bad} NaN/inf values (shape {tuple(latent.shape)})")


def check_images(name: str, images: torch.Tensor, multiple: int) -> None:
    """Raise ValueError unless `images` is a finite (B, 3, H, W) float tensor with H, W multiples of `multiple`."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} encode expects a torch.Tensor (B, 3, H, W) in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} encode expects RGB images of shape (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}. "
            "Convert PIL images with pid_decoder.backbones.image_to_tensor."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name} encode expects float images in [-1, 1], got dtype {images.dtype}; map uint8 with x / 127.5 - 1"
        )
    h, w = images.shape[2:]
    if h == 0 or w == 0 or h % multiple or w % multiple:
        raise ValueError(
            f"{name} encode needs H and W to be positive multiples of {multiple}, got {h}x{w} (HxW). "
            f"Centre-crop first, e.g. pid_decoder.backbones.image_to_tensor(image, {multiple}) crops to "
            f"{h - h % multiple}x{w - w % multiple}."
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} encode got images containing NaN/inf values")


def add_noise(
    latents: torch.Tensor, sigma: float, generator: torch.Generator | None = None, *, frame: str = "flow"
) -> torch.Tensor:
    """Forward-noise a normalised latent at level `sigma` (pipelines.md §3).

    frame "flow": (1 - σ)·x + σ·ε; frame "vp": √max(0, 1 - σ²)·x + σ·ε. σ = 0 returns `latents` itself and
    draws nothing. ε is drawn in float32 on the generator's device (so seeds reproduce on any device) and moved
    to the latent's device; the result is float32.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    if frame not in ("flow", "vp"):
        raise ValueError(f"noise frame must be 'flow' or 'vp', got {frame!r}")
    if sigma == 0.0:
        return latents
    noise_device = generator.device if generator is not None else latents.device
    eps = torch.randn(latents.shape, generator=generator, dtype=torch.float32, device=noise_device)
    eps = eps.to(latents.device)
    x0 = latents.float()
    keep = (1.0 - sigma) if frame == "flow" else math.sqrt(max(0.0, 1.0 - sigma * sigma))
    return keep * x0 + sigma * eps


class Backbone:
    """One latent space: `encode` images to PiD latents, `decode` them natively, `add_noise` in its frame.

    Subclasses set the class attribute `info` and implement `_encode` / `_decode`; this class owns the
    input checks so that every error is raised before any compute.
    """

    info: BackboneInfo
    image_multiple: int = 16  # parity: the reference centre-crops every input to a multiple of 16

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        # The RAE backbones take these from their modules (equal to `info` for the released weights).
        self.latent_channels: int = self.info.latent_channels
        self.down_factor: int = self.info.down_factor
        self.grid: int | None = self.info.grid  # fixed latent grid side (RAE backbones) or None (any size)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def noise_frame(self) -> str:
        return self.info.noise_frame

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an H x W image."""
        if self.grid is not None:
            return (self.latent_channels, self.grid, self.grid)
        return (self.latent_channels, height // self.down_factor, width // self.down_factor)

    def native_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Pixel size (H, W) of the native decode of a latent with grid `latent_hw`."""
        return (latent_hw[0] * self.down_factor, latent_hw[1] * self.down_factor)

    def check_latent(self, latent: torch.Tensor) -> None:
        check_latent(self.name, latent, grid=self.grid, channels=self.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) float32 latent, normalised as PiD expects (posterior mean)."""
        check_images(self.name, images, self.image_multiple)
        return self._encode(images.to(self.device, torch.float32)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) PiD latent -> (B, 3, H, W) float32 image in [-1, 1] from the backbone's own decoder."""
        self.check_latent(latents)
        return self._decode(latents.to(self.device, torch.float32)).float().clamp(-1.0, 1.0)

    def add_noise(self, latents: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise `latents` at `sigma` in this backbone's frame; see `pid_decoder.backbones.base.add_noise`."""
        return add_noise(latents, sigma, generator, frame=self.noise_frame)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, latent_channels={self.latent_channels}, "
            f"down_factor={self.down_factor}, device={self.device}, dtype={self.dtype})"
        )
