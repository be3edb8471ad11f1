"""Names that several layers share: the latent spaces (backbones) with their aliases and static facts, and the
default text encoder. Plain data without torch, so that `weights` (which files to fetch), `backbones` (which
model to build), `text` and the CLI read them from one place without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


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


DEFAULT_TEXT_ENCODER = "Efficient-Large-Model/gemma-2-2b-it"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(model: str) -> bool:
    """Whether ``model`` (a text encoder's folder or hub id) names a hub repo: no such path exists here and it has
    the form ``org/name``."""
    return not Path(model).expanduser().exists() and bool(_HUB_ID.match(model))
