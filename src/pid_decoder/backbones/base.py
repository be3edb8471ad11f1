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
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about one latent space (backbones.md §0)."""

    name: str
    latent_channels: int
    down_factor: int  # pixels per latent cell; "virtual" for the RAEs, whose grid is fixed
    noise_frame: str  # "flow" (1-σ)x+σε or "vp" √(1-σ²)x+σε
    grid: int | None  # fixed latent grid side for the RAEs, None for the VAEs
    hub_repo: str  # documented default for path=None
    weight_files: str  # what path= expects, used in error messages


BACKBONE_INFO: dict[str, BackboneInfo] = {
    info.name: info
    for info in [
        BackboneInfo(
            "flux", 16, 8, "flow", None, "black-forest-labs/FLUX.1-dev",
            "the BFL single file ae.safetensors (black-forest-labs/FLUX.1-dev), a diffusers-layout "
            "vae/diffusion_pytorch_model.safetensors, or a diffusers folder (FLUX.1-dev/vae, Z-Image/vae)",
        ),
        BackboneInfo(
            "sd3", 16, 8, "flow", None, "stabilityai/stable-diffusion-3-medium-diffusers",
            "a diffusers folder (stable-diffusion-3-medium-diffusers/vae) or its "
            "diffusion_pytorch_model.safetensors",
        ),
        BackboneInfo(
            "sdxl", 4, 8, "vp", None, "stabilityai/stable-diffusion-xl-base-1.0",
            "sdxl_vae.safetensors (LDM or diffusers layout) or a diffusers folder "
            "(stable-diffusion-xl-base-1.0/vae)",
        ),
        BackboneInfo(
            "flux2", 128, 16, "flow", None, "black-forest-labs/FLUX.2-dev",
            "the BFL single file ae.safetensors (black-forest-labs/FLUX.2-dev, also used by FLUX.2-klein), "
            "a diffusers-layout vae/diffusion_pytorch_model.safetensors, or a diffusers folder (FLUX.2-dev/vae)",
        ),
        BackboneInfo(
            "qwenimage", 16, 8, "flow", None, "Qwen/Qwen-Image",
            "a diffusers folder (Qwen/Qwen-Image/vae) or its diffusion_pytorch_model.safetensors",
        ),
        BackboneInfo(
            "dinov2", 768, 16, "flow", 32, "nyu-visionx/RAE-collections",
            "a folder with the RAE decoder model.pt and stat.pt (nyu-visionx/RAE-collections: "
            "decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt, stats/dinov2/wReg_base/imagenet1k_512/stat.pt) "
            "and the encoder snapshot facebook/dinov2-with-registers-base in encoder/",
        ),
        BackboneInfo(
            "siglip", 1152, 16, "flow", 16, "nyu-visionx/siglip2_decoder",
            "a folder with the Scale-RAE decoder (model.pt or siglip2_sop14_i224_web73M_ganw3_decXL.pt, "
            "nyu-visionx/siglip2_decoder) with its config.json / XL_decoder_config.json, and the encoder "
            "snapshot google/siglip2-so400m-patch14-224 in encoder/",
        ),
    ]
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_INFO)

# Names users know from the LDM side that decode with another backbone's latent space (backbones.md §0).
BACKBONE_ALIASES: dict[str, str] = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "z-image": "flux",
    "z-image-turbo": "flux",
    "boogu": "flux",
    "flux1": "flux",
    "flux2-klein": "flux2",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "qwenimage-2512": "qwenimage",
    "qwen-image": "qwenimage",
    "qwen-image-2512": "qwenimage",
    "rae": "dinov2",
    "scale-rae": "siglip",
}


def resolve_backbone_name(name: str) -> str:
    """Canonical backbone name for `name` or one of its aliases (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in BACKBONE_INFO:
        return key
    if key in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[key]
    raise ValueError(
        f"unknown backbone {name!r}. Expected one of {', '.join(BACKBONES)} "
        f"or an alias ({', '.join(sorted(BACKBONE_ALIASES))})."
    )


def _preset_hint(channels: int) -> str:
    """Which presets accept a latent with `channels` channels, for error messages."""
    from ..presets import presets_for_latent_channels

    presets = presets_for_latent_channels(channels)
    if not presets:
        known = sorted({i.latent_channels for i in BACKBONE_INFO.values()})
        return f"No PiD preset takes {channels}-channel latents (known channel counts: {known})."
    backbones = sorted({p.backbone for p in presets})
    aliases = ", ".join(p.alias for p in presets)
    return f"A {channels}-channel latent belongs to backbone(s) {', '.join(backbones)}: presets {aliases}."


def _presets_of(backbone: str) -> str:
    from ..presets import presets_for_backbone

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
