"""Input checks done at the API boundary, before any compute. Every failure is a ValueError that says
what was received and what is expected."""

from __future__ import annotations

import torch

from ..config import NetConfig


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values (shape {_shape(t)}); expected finite values")


def _latent_hint(channels: int) -> str:
    from ..presets import presets_for_latent_channels

    matches = presets_for_latent_channels(channels)
    if not matches:
        return ""
    return " Presets for latents with {} channels: {}.".format(channels, ", ".join(p.alias for p in matches))


def check_size(config: NetConfig, height: int, width: int) -> None:
    ps = config.patch_size
    if height <= 0 or width <= 0 or height % ps or width % ps:
        raise ValueError(
            f"output size {height}x{width} is not supported: height and width must be positive multiples of "
            f"{ps} (e.g. {max(ps, height // ps * ps)}x{max(ps, width // ps * ps)})"
        )


def check_inputs(
    config: NetConfig,
    text: torch.Tensor,
    lq_latent: torch.Tensor | None,
    degrade_sigma: torch.Tensor | float | None,
    height: int,
    width: int,
) -> torch.Tensor | None:
    """Validate text / latent / sigma / output size; returns sigma as a float32 (B,) tensor (or None)."""
    check_size(config, height, width)
    if not torch.is_tensor(text) or text.ndim != 3:
        got = _shape(text) if torch.is_tensor(text) else type(text).__name__
        raise ValueError(f"text must be a tensor (B, T, {config.txt_embed_dim}), got {got}")
    B = text.shape[0]
    if B == 0:
        raise ValueError("empty batch: text has batch size 0; expected at least one item")
    if text.shape[1] == 0 or text.shape[2] != config.txt_embed_dim:
        raise ValueError(
            f"text must have shape (B, T>=1, {config.txt_embed_dim}) (Gemma-2 hidden states), got {_shape(text)}"
        )
    _check_finite("text", text)

    if config.lq is None:
        if lq_latent is not None or degrade_sigma is not None:
            raise ValueError("this network is the text-to-image PixelDiT: lq_latent and degrade_sigma must be None")
        return None
    lq = config.lq
    if lq_latent is None:
        raise ValueError(f"lq_latent is required: a latent (B, {lq.latent_channels}, h, w) for this PiD network")
    if not torch.is_tensor(lq_latent) or lq_latent.ndim != 4:
        got = _shape(lq_latent) if torch.is_tensor(lq_latent) else type(lq_latent).__name__
        raise ValueError(f"lq_latent must be a 4-D tensor (B, {lq.latent_channels}, h, w), got {got}")
    if lq_latent.shape[1] != lq.latent_channels:
        raise ValueError(
            f"this network expects latents with {lq.latent_channels} channels, got {lq_latent.shape[1]} "
            f"(shape {_shape(lq_latent)}).{_latent_hint(lq_latent.shape[1])}"
        )
    if lq_latent.shape[0] != B:
        raise ValueError(f"batch sizes disagree: lq_latent has {lq_latent.shape[0]} items, text has {B}")
    h, w = lq_latent.shape[-2:]
    k = lq.pixels_per_latent
    if (h * k, w * k) != (height, width):
        raise ValueError(
            f"output size {height}x{width} does not match the latent grid {h}x{w}: this network decodes each "
            f"latent cell to {k}x{k} pixels ({lq.latent_down_factor}x VAE x {lq.sr_scale}x super-resolution), "
            f"so the output must be {h * k}x{w * k}"
        )
    if not lq_latent.is_floating_point():
        raise ValueError(f"lq_latent must be a floating-point tensor, got {lq_latent.dtype}")
    _check_finite("lq_latent", lq_latent)

    if degrade_sigma is None:
        raise ValueError("degrade_sigma is required for a PiD network: a float or a (B,) tensor in [0, 1] (0 = clean)")
    sigma = torch.as_tensor(degrade_sigma, dtype=torch.float32)
    if sigma.ndim == 0 or sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(B)
    if sigma.ndim != 1 or sigma.shape[0] != B:
        raise ValueError(f"degrade_sigma must be a float or a ({B},) tensor, got shape {_shape(sigma)}")
    _check_finite("degrade_sigma", sigma)
    if bool(((sigma < 0) | (sigma > 1)).any()):
        raise ValueError(f"degrade_sigma must be in [0, 1], got {sigma.tolist()}")
    return sigma.contiguous()


def check_x_t(config: NetConfig, x: torch.Tensor, t: torch.Tensor, batch: int | None) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != config.in_channels:
        got = _shape(x) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor (B, {config.in_channels}, H, W), got {got}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"batch sizes disagree: x has {x.shape[0]} items, text has {batch}")
    t = torch.as_tensor(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"t must be a scalar or a ({x.shape[0]},) tensor on the 0-1000 scale, got shape {_shape(t)}")
    _check_finite("x", x)


def check_window(config: NetConfig, window, height: int, width: int) -> None:
    ps = config.patch_size
    check_size(config, height, width)
    if window.top % ps or window.left % ps or window.top < 0 or window.left < 0:
        raise ValueError(f"window offset ({window.top}, {window.left}) must be non-negative multiples of {ps}")
    if window.top + height > window.height or window.left + width > window.width:
        raise ValueError(
            f"window {height}x{width} at ({window.top}, {window.left}) does not fit in the "
            f"{window.height}x{window.width} image"
        )
