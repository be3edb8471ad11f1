"""Latents as diffusers pipelines hand them over -> the PiD latent and its degrade sigma.

Legend: B batch, L tokens, C channels, h/w latent grid, H/W pixels of the LDM image.

What `output_type="latent"` returns, and what `callback_on_step_end` sees in `callback_kwargs["latents"]`
(backbones.md §9, pipelines.md §2):

| pipeline                   | final output                               | step callback                        |
|----------------------------|--------------------------------------------|--------------------------------------|
| FluxPipeline               | packed (B, (h/2)(w/2), 64), normalised     | same                                 |
| QwenImagePipeline          | packed (B, (h/2)(w/2), 64), normalised     | same                                 |
| Flux2Pipeline              | (B, (H/16)(W/16), 128), BN-normalised      | same                                 |
| Flux2KleinPipeline         | raw (B, 32, H/8, W/8) (BN undone)          | like Flux2Pipeline                   |
| StableDiffusion3Pipeline   | (B, 16, h, w), normalised                  | same                                 |
| ZImagePipeline             | (B, 16, h, w), normalised (FLUX.1 VAE)     | same                                 |
| StableDiffusionXLPipeline  | (B, 4, h, w), normalised                   | same, in the Euler VE frame x0 + σε  |

Flux/Qwen packed channel index = c·4 + 2·py + px for each 2x2 patch; FLUX.2's 128 channels are the
2x2 patchify of its 32 with the same order, and its sequence is the raster scan of the (H/16, W/16) grid.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..registry import BACKBONE_INFO

logger = logging.getLogger(__name__)

# Pipeline class name -> latent kind. Subclasses (img2img, inpaint, ...) resolve through their MRO.
PIPELINE_KINDS: dict[str, str] = {
    "FluxPipeline": "flux",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2-klein",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
    "QwenImagePipeline": "qwenimage",
    "ZImagePipeline": "zimage",
}
# Latent kind -> PiD backbone; the kinds also accept the backbone aliases users type.
KIND_BACKBONE: dict[str, str] = {
    "flux": "flux",
    "zimage": "flux",
    "flux2": "flux2",
    "flux2-klein": "flux2",
    "sd3": "sd3",
    "sdxl": "sdxl",
    "qwenimage": "qwenimage",
}
_KIND_ALIASES = {
    "zimage-turbo": "zimage",
    "z-image": "zimage",
    "z-image-turbo": "zimage",
    "flux2-klein-4b": "flux2-klein",
    "flux2-klein-9b": "flux2-klein",
    "klein": "flux2-klein",
    "qwenimage-2512": "qwenimage",
    "qwen-image": "qwenimage",
}
_CLASS_PREFIXES = (
    ("Flux2Klein", "flux2-klein"),
    ("Flux2", "flux2"),
    ("Flux", "flux"),
    ("StableDiffusion3", "sd3"),
    ("StableDiffusionXL", "sdxl"),
    ("QwenImage", "qwenimage"),
    ("ZImage", "zimage"),
)
VAE_SCALE_FACTOR = 8  # every supported pipeline's `vae_scale_factor`
FLUX2_BN_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# Pure reshapes
# ---------------------------------------------------------------------------------------------


def patchify_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, 4C, h, w); channel c·4 + 2·py + px (FLUX.2's `_patchify_latents` order)."""
    b, c, hh, ww = x.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"2x2 patchify needs an even latent grid, got {hh}x{ww} (shape {tuple(x.shape)})")
    x = x.reshape(b, c, hh // 2, 2, ww // 2, 2)  # (B, C, h, py, w, px)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, py, px, h, w)
    return x.reshape(b, c * 4, hh // 2, ww // 2)  # (B, 4C, h, w)


def unpatchify_2x2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify_2x2`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c4, h, w = x.shape
    if c4 % 4:
        raise ValueError(f"2x2 unpatchify needs a channel count divisible by 4, got {c4} (shape {tuple(x.shape)})")
    x = x.reshape(b, c4 // 4, 2, 2, h, w)  # (B, C, py, px, h, w)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (B, C, h, py, w, px)
    return x.reshape(b, c4 // 4, h * 2, w * 2)  # (B, C, 2h, 2w)


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h·w, C), raster order (FLUX.2's `_pack_latents`)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)  # (B, L, C)


def unpack_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h·w, C) raster-order tokens -> (B, C, h, w)."""
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"{n} tokens cannot fill a {h}x{w} latent grid (expected {h * w}); check height/width")
    return x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): the FLUX.1 / Qwen-Image packed layout."""
    return pack_tokens(patchify_2x2(x))


def unpack_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 4C) packed tokens -> (B, C, h, w)."""
    return unpatchify_2x2(unpack_tokens(x, h // 2, w // 2))


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def pipeline_kind(pipe_or_kind: Any) -> str:
    """The latent kind ("flux", "flux2", "flux2-klein", "sd3", "sdxl", "qwenimage", "zimage") of a pipeline,
    a pipeline class, a class name, or a kind / alias string."""
    if isinstance(pipe_or_kind, str):
        key = pipe_or_kind.strip()
        if key in PIPELINE_KINDS:
            return PIPELINE_KINDS[key]
        key = key.lower()
        key = _KIND_ALIASES.get(key, key)
        if key in KIND_BACKBONE:
            return key
        raise ValueError(
            f"unknown pipeline kind {pipe_or_kind!r}; expected a pipeline object or one of "
            f"{', '.join(sorted(KIND_BACKBONE))} (or a class name: {', '.join(PIPELINE_KINDS)})"
        )
    cls = pipe_or_kind if isinstance(pipe_or_kind, type) else type(pipe_or_kind)
    for base in cls.__mro__:
        if base.__name__ in PIPELINE_KINDS:
            return PIPELINE_KINDS[base.__name__]
    # Variants (img2img, inpaint, ControlNet, Kontext, Edit) are not subclasses but share the latent layout.
    for prefix, kind in _CLASS_PREFIXES:
        if cls.__name__.startswith(prefix):
            logger.debug("treating %s as a %s pipeline", cls.__name__, kind)
            return kind
    raise ValueError(
        f"no PiD latent space is known for pipeline {cls.__name__}; supported: {', '.join(PIPELINE_KINDS)}. "
        "For other pipelines capture the latent handed to vae.decode and normalise it yourself."
    )


def sdxl_to_vp(latents: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
    """Euler VE frame x0 + σε (σ up to ~14.6) -> PiD's VP frame: divide latent and σ by √(σ² + 1)."""
    if sigma == 0.0:
        return latents, 0.0
    c = math.sqrt(sigma * sigma + 1.0)
    return latents / c, sigma / c


def capture_sigma(scheduler: Any, step_index: int) -> float:
    """σ of the latent a step callback sees after step `step_index` (0-based): `scheduler.sigmas[i + 1]`.

    The final x0 sits at `sigmas[-1]` (0.0 for every supported scheduler). For SDXL this is the Euler VE σ;
    `latents_from_pipeline` converts it.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no `sigmas`; cannot label the captured latent")
    idx = min(int(step_index) + 1, len(sigmas) - 1)
    return float(sigmas[idx])


def _flux2_bn_stats(source: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(running_mean, √(running_var + eps)) from a pipeline, an AutoencoderKLFlux2, or a flux2 backbone."""
    for candidate in (source, getattr(source, "vae", None)):
        bn = getattr(candidate, "bn", None)
        if bn is not None and hasattr(bn, "running_mean"):
            eps = getattr(getattr(candidate, "config", None), "batch_norm_eps", FLUX2_BN_EPS)
            return bn.running_mean.float(), torch.sqrt(bn.running_var.float() + eps)
    raise ValueError(
        "Flux2KleinPipeline returns raw (B, 32, H/8, W/8) latents; normalising them needs the FLUX.2 VAE's "
        "batch-norm statistics. Pass the pipeline itself, or vae=pipe.vae (or a flux2 backbone)."
    )


def latents_from_pipeline(
    pipe_or_kind: Any,
    latents: torch.Tensor,
    *,
    height: int,
    width: int,
    sigma: float = 0.0,
    vae: Any = None,
) -> tuple[torch.Tensor, float]:
    """Turn a diffusers pipeline's latent into PiD's (B, C, h, w) latent and its degrade sigma.

    Args:
        pipe_or_kind: the pipeline (or its class / class name), or a kind string: flux, zimage, flux2,
            flux2-klein, sd3, sdxl, qwenimage (aliases like zimage-turbo, flux2-klein-4b accepted).
        latents: what `pipe(..., output_type="latent")` returned (`.images`) or what a step callback got as
            `callback_kwargs["latents"]`.
        height, width: the LDM image size in pixels passed to the pipeline (needed to unpack tokens).
        sigma: the scheduler σ of `latents`: 0.0 for the final output, `capture_sigma(pipe.scheduler, i)` in a
            step callback. For SDXL this is the Euler VE σ, converted here to PiD's VP frame.
        vae: only for raw Flux2KleinPipeline output given with a kind string: the FLUX.2 VAE (or flux2
            backbone) whose batch-norm statistics normalise it.

    Returns:
        (latent, sigma): float32 latent (B, C, h, w) on the input's device, normalised as PiD expects, and
        σ in PiD's frame for the backbone (flow matching, or VP for sdxl).
    """
    kind = pipeline_kind(pipe_or_kind)
    if not isinstance(latents, torch.Tensor):
        if isinstance(latents, (list, tuple)) and latents and all(isinstance(t, torch.Tensor) for t in latents):
            latents = torch.stack(list(latents))
        else:
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0.0:
        raise ValueError(f"sigma must be a finite value >= 0, got {sigma}")
    if kind != "sdxl" and sigma > 1.0:
        raise ValueError(f"{kind} pipelines use flow-matching σ in [0, 1], got {sigma}")
    height, width = int(height), int(width)
    multiple = VAE_SCALE_FACTOR * 2
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"height and width must be the LDM image size, positive multiples of {multiple}, got {height}x{width}"
        )
    h, w = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
    x = latents.float()
    shape = tuple(latents.shape)

    n_tokens = (h // 2) * (w // 2)
    if kind in ("flux", "qwenimage"):
        if x.ndim == 5 and kind == "qwenimage" and x.shape[2] == 1:  # (B, 16, 1, h, w) unpacked
            x = x[:, :, 0]
        if x.ndim == 3:
            _expect(tuple(x.shape[1:]) == (n_tokens, 64), kind, shape, f"(B, {n_tokens}, 64)")
            x = unpack_2x2(x, h, w)  # (B, 16, h, w)
    elif kind in ("flux2", "flux2-klein"):
        if x.ndim == 3:
            _expect(tuple(x.shape[1:]) == (n_tokens, 128), kind, shape, f"(B, {n_tokens}, 128)")
            x = unpack_tokens(x, h // 2, w // 2)  # (B, 128, h/2, w/2)
        elif x.ndim == 4 and x.shape[1] == 32:
            # Flux2KleinPipeline's final output: BN already undone and unpatchified (backbones.md §5).
            mean, std = _flux2_bn_stats(vae if vae is not None else pipe_or_kind)
            x = patchify_2x2(x)  # (B, 128, h/2, w/2)
            x = (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(x.device).view(1, -1, 1, 1)
    elif kind == "sdxl":
        x, sigma = sdxl_to_vp(x, sigma)

    info = BACKBONE_INFO[KIND_BACKBONE[kind]]
    lat_h, lat_w = height // info.down_factor, width // info.down_factor
    if x.ndim != 4 or x.shape[1] != info.latent_channels or tuple(x.shape[2:]) != (lat_h, lat_w):
        raise ValueError(
            f"{kind} pipeline latent of shape {shape} does not match a {height}x{width} image: expected "
            f"{_expected_layouts(kind, h, w)}"
        )
    return x, sigma


def _expect(ok: bool, kind: str, shape: tuple, expected: str) -> None:
    if not ok:
        raise ValueError(f"{kind} packed latent has shape {shape}, expected {expected} for the given height/width")


def _expected_layouts(kind: str, h: int, w: int) -> str:
    n = (h // 2) * (w // 2)
    return {
        "flux": f"packed (B, {n}, 64) or (B, 16, {h}, {w})",
        "zimage": f"(B, 16, {h}, {w})",
        "qwenimage": f"packed (B, {n}, 64) or (B, 16, [1,] {h}, {w})",
        "flux2": f"packed (B, {n}, 128) or (B, 128, {h // 2}, {w // 2})",
        "flux2-klein": f"raw (B, 32, {h}, {w}), packed (B, {n}, 128) or (B, 128, {h // 2}, {w // 2})",
        "sd3": f"(B, 16, {h}, {w})",
        "sdxl": f"(B, 4, {h}, {w})",
    }[kind]
