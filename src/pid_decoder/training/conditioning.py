"""The LQ condition of a stage-1 training batch, built as the reference builds it (spec training-details.md §2).

Legend: B batch, H/W HQ pixels, C latent channels, h/w latent grid.

    hq (B, 3, H, W) in [-1, 1]
      -> lq_image = downsample_lq(hq)                     (B, 3, H/4, W/4)  bicubic antialiased, clamped
      -> z = encode(lq_image)                             (B, C, h, w)      posterior mean, normalised
      -> z, degrade_sigma = latent_noise(z, ...)          per sample: p 0.75, σ ~ U[0, 0.8), backbone frame
      -> caption_drop ~ Bernoulli(0.1), lq_keep ~ Bernoulli(0.9); z_i <- 0 where dropped

All randomness is drawn from one explicit ``torch.Generator`` in a fixed order (noise apply, σ, ε, caption
dropout, LQ keep), or passed in as tensors, so a test pins every number. The pure pieces (`latent_noise`,
`apply_caption_dropout`) take explicit tensors; `LQConditioner` draws them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .degrade import DOWNSCALE, downsample_lq

logger = logging.getLogger(__name__)

NOISE_PROB = 0.75  # apply_prob (LNZ defaults)
SIGMA_MIN, SIGMA_MAX = 0.0, 0.8  # add_sigma_min / add_sigma_max (TC 117-122)
CAPTION_DROPOUT = 0.1  # pid_caption_lq: caption -> "" (CD conditioner_pid.py)
LQ_DROPOUT = 0.1  # pid_caption_lq: LQ latent -> zeros
# diffusers classes whose PiD normalisation needs the backbone classes (batch-norm, per-channel statistics)
_NEEDS_BACKBONE = {"AutoencoderKLFlux2": "flux2", "AutoencoderKLQwenImage": "qwenimage", "AutoencoderRAE": "dinov2"}
_FRAMES = {"flow": "flow", "flow_matching": "flow", "vp": "vp", "sdxl": "vp"}


def _frame(frame: str) -> str:
    if frame not in _FRAMES:
        raise ValueError(f"noise frame must be 'flow' (flow matching) or 'sdxl'/'vp' (variance preserving), got {frame!r}")
    return _FRAMES[frame]


def latent_noise(
    z: torch.Tensor, *, apply: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor | None, frame: str = "flow"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-noise the LQ latents of the samples selected by ``apply`` (LNZ 228-261).

    Args:
        z: (B, C, h, w) normalised latents.
        apply: (B,) bool, which samples are noised.
        sigma: (B,) σ per sample (its values for unselected samples are ignored).
        eps: noise like ``z``, float32; may be None only when no sample is selected.
        frame: "flow" -> (1 - σ)·z + σ·ε ; "sdxl" (= "vp") -> √max(0, 1 - σ²)·z + σ·ε.

    Returns ``(z_noised, degrade_sigma)``: float32 (B, C, h, w) and float32 (B,) with σ for the selected
    samples and 0 elsewhere. Unselected samples keep their latent exactly.
    """
    frame = _frame(frame)
    b = z.shape[0]
    if apply.shape != (b,) or sigma.shape != (b,):
        raise ValueError(f"apply and sigma must have shape ({b},), got {tuple(apply.shape)} and {tuple(sigma.shape)}")
    z = z.float()
    apply = apply.to(device=z.device, dtype=torch.bool)
    sigma = sigma.to(device=z.device, dtype=torch.float32)
    degrade_sigma = torch.where(apply, sigma, torch.zeros_like(sigma))  # (B,)
    if eps is None:
        if bool(apply.any()):
            raise ValueError("eps is required when any sample is noised")
        return z, degrade_sigma
    if eps.shape != z.shape:
        raise ValueError(f"eps must have the latent's shape {tuple(z.shape)}, got {tuple(eps.shape)}")
    s = sigma.view(b, 1, 1, 1)  # (B, 1, 1, 1)
    keep = (1.0 - s) if frame == "flow" else torch.sqrt(torch.clamp(1.0 - s * s, min=0.0))
    noised = keep * z + s * eps.to(device=z.device, dtype=torch.float32)  # (B, C, h, w)
    return torch.where(apply.view(b, 1, 1, 1), noised, z), degrade_sigma


def draw_latent_noise(
    shape: torch.Size | Sequence[int],
    generator: torch.Generator | None,
    *,
    prob: float = NOISE_PROB,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw ``(apply, sigma, eps)`` for `latent_noise` on the generator's device, in the reference's order.

    apply = U[0,1) < prob per sample; if no sample is selected nothing else is drawn (sigma zeros, eps None);
    else σ = sigma_min + (sigma_max - sigma_min)·U[0,1) for every sample, then ε ~ N(0, I) of ``shape``, float32.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    b = int(shape[0])
    apply = torch.rand(b, generator=generator, device=device) < prob  # (B,)
    if not bool(apply.any()):
        # parity: the reference skips the σ and ε draws when no sample is selected (LNZ 236-256, Q9)
        return apply, torch.zeros(b, device=device), None
    sigma = sigma_min + (sigma_max - sigma_min) * torch.rand(b, generator=generator, device=device)  # (B,)
    eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return apply, sigma, eps


def dropout_mask(batch: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) bool, True where the condition is dropped: U[0,1) < p per sample, drawn from ``generator``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, generator=generator, device=device) < p


def apply_caption_dropout(
    captions: Sequence[str],
    drop: torch.Tensor,
    text: torch.Tensor | None = None,
    empty_text: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor | None]:
    """Replace dropped captions by ``""`` and, with precomputed embeddings, their rows by ``empty_text``.

    ``text`` is (B, T, D) from embedding files; ``empty_text`` (T, D) is the embedding of the empty caption
    (the CHI prompt alone; `pid-decoder embed --dataset` writes it). Without ``text`` the caller encodes the
    returned captions with `pid_decoder.text.TextEncoder`.
    """
    drop_list = [bool(d) for d in drop.tolist()]
    if len(drop_list) != len(captions):
        raise ValueError(f"{len(captions)} captions but a dropout mask of {len(drop_list)}")
    captions = ["" if d else c for c, d in zip(captions, drop_list)]
    if text is None:
        return captions, None
    if empty_text is None:
        raise ValueError("precomputed text embeddings need empty_text (the empty caption's embedding) for dropout")
    if empty_text.shape != text.shape[1:]:
        raise ValueError(f"empty_text must have shape {tuple(text.shape[1:])}, got {tuple(empty_text.shape)}")
    mask = drop.to(device=text.device, dtype=torch.bool).view(-1, 1, 1)  # (B, 1, 1)
    return captions, torch.where(mask, empty_text.to(text), text)


@dataclass
class LQCondition:
    """What a teacher step feeds the network and the losses (spec §0)."""

    lq_image: torch.Tensor  # (B, 3, H/4, W/4) float32 in [-1, 1]: the clean LQ RGB target of the aux loss
    lq_latent: torch.Tensor  # (B, C, h, w) float32: noised, zero where the LQ is dropped
    degrade_sigma: torch.Tensor  # (B,) float32: σ given to the gates (kept for dropped LQs, parity Q8)
    lq_keep: torch.Tensor  # (B,) bool: any(latent != 0), as the reference derives it (PM 422)
    caption_drop: torch.Tensor  # (B,) bool on the generator's device: which captions become ""
    captions: list[str] | None  # captions after dropout (None when none were given)


class LatentEncoder:
    """A user's own VAE (any module) as a PiD latent space: ``z = scaling_factor * (mean - shift_factor)``.

    What the module needs:
      - ``encode(x)`` on (B, 3, H, W) in [-1, 1], returning a tensor (B, C, h, w), or an object with
        ``latent_dist`` (diffusers' ``AutoencoderKLOutput``), or a distribution with ``mode()`` / ``mean``.
        The posterior mean is used, never a sample.
      - the latent channel count and the pixel -> latent down factor: given here, or read from a diffusers
        config (``config.latent_channels``, ``2 ** (len(config.block_out_channels) - 1)``).
      - the normalisation: ``scaling_factor`` / ``shift_factor`` given here or read from ``config``
        (shift 0 when absent). Per-channel statistics (Qwen-Image) or batch-norm (FLUX.2) need the
        `pid_decoder.backbones` classes instead.
      - the noise frame PiD should be trained with: "flow" (flow-matching LDMs) or "sdxl" (VP frame).
    The module runs in its own dtype (cast it to bfloat16 for the reference's precision) under ``no_grad``.
    """

    def __init__(
        self,
        module: Any,
        *,
        latent_channels: int | None = None,
        down_factor: int | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        noise_frame: str = "flow",
        name: str = "custom",
    ):
        if not callable(getattr(module, "encode", None)):
            raise TypeError(f"a custom latent space needs a module with encode(images), got {type(module).__name__}")
        config = getattr(module, "config", None)
        latent_channels = latent_channels if latent_channels is not None else getattr(config, "latent_channels", None)
        if down_factor is None and getattr(config, "block_out_channels", None) is not None:
            down_factor = 2 ** (len(config.block_out_channels) - 1)
        if latent_channels is None or down_factor is None:
            raise ValueError(
                f"custom VAE {type(module).__name__}: pass latent_channels= and down_factor= (its config does not "
                f"say them: latent_channels={latent_channels}, down_factor={down_factor})"
            )
        if scaling_factor is None:
            scaling_factor = getattr(config, "scaling_factor", None)
        if scaling_factor is None:
            raise ValueError(f"custom VAE {type(module).__name__}: pass scaling_factor= (z = scale * (mean - shift))")
        if shift_factor is None:
            shift_factor = getattr(config, "shift_factor", None) or 0.0
        self.module = module
        self.name = name
        self.latent_channels = int(latent_channels)
        self.down_factor = int(down_factor)
        self.scale, self.shift = float(scaling_factor), float(shift_factor)
        self.noise_frame = _frame(noise_frame)
        param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module.encode(images.to(self.device, self.dtype))
        dist = getattr(out, "latent_dist", out)
        if isinstance(dist, torch.Tensor):
            mean = dist
        elif callable(getattr(dist, "mode", None)):
            mean = dist.mode()
        elif isinstance(getattr(dist, "mean", None), torch.Tensor):
            mean = dist.mean
        else:
            raise TypeError(f"custom VAE encode returned {type(out).__name__}: expected a tensor or a latent_dist")
        return self.scale * (mean.float() - self.shift)  # (B, C, h, w)

    def __repr__(self) -> str:
        return (
            f"LatentEncoder({type(self.module).__name__}, latent_channels={self.latent_channels}, "
            f"down_factor={self.down_factor}, scale={self.scale}, shift={self.shift}, frame={self.noise_frame!r})"
        )


class LQConditioner:
    """HQ batch -> `LQCondition`: downsample /4, encode, noise, caption and LQ dropout (spec §2).

    Args:
        backbone: a `pid_decoder.backbones.load_backbone(...)` backbone (load it with ``dtype=torch.bfloat16``
            for the reference's bf16 encode), a `LatentEncoder`, or a diffusers VAE module (wrapped in a
            `LatentEncoder` from its config; pass ``noise_frame="sdxl"`` for a VP-frame LDM).
        net_config: the `NetConfig` (or its ``lq`` part) being trained: its latent channels, latent down
            factor and sr_scale must match the backbone; checked here, once.
        noise_prob, sigma_min, sigma_max: latent noising (reference 0.75, 0, 0.8); noise_prob 0 disables it.
        caption_dropout, lq_dropout: per-sample dropout probabilities (reference 0.1 and 0.1).
        noise_frame: override the backbone's frame ("flow" or "sdxl"); default: the backbone's own.
        round_bf16: round the clean latent to bfloat16 values, as the reference stores it (spec §2.2).
    """

    def __init__(
        self,
        backbone: Any,
        net_config: Any = None,
        *,
        noise_prob: float = NOISE_PROB,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        caption_dropout: float = CAPTION_DROPOUT,
        lq_dropout: float = LQ_DROPOUT,
        noise_frame: str | None = None,
        round_bf16: bool = True,
    ):
        from ..backbones import Backbone

        if not isinstance(backbone, (Backbone, LatentEncoder)):
            kind = next((_NEEDS_BACKBONE[c.__name__] for c in type(backbone).__mro__ if c.__name__ in _NEEDS_BACKBONE), None)
            if kind is not None:
                raise TypeError(
                    f"a {type(backbone).__name__} is normalised beyond scale/shift: pass "
                    f"load_backbone({kind!r}, module=vae) instead of the bare module"
                )
            backbone = LatentEncoder(backbone, noise_frame=noise_frame or "flow")
        self.backbone = backbone
        self.frame = _frame(noise_frame or backbone.noise_frame)
        for name, p in (("noise_prob", noise_prob), ("caption_dropout", caption_dropout), ("lq_dropout", lq_dropout)):
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if not (0.0 <= sigma_min <= sigma_max <= 1.0):
            raise ValueError(f"need 0 <= sigma_min <= sigma_max <= 1, got {sigma_min} and {sigma_max}")
        self.noise_prob, self.sigma_min, self.sigma_max = float(noise_prob), float(sigma_min), float(sigma_max)
        self.caption_dropout, self.lq_dropout = float(caption_dropout), float(lq_dropout)
        self.round_bf16 = round_bf16
        if getattr(backbone, "grid", None) is not None:
            raise ValueError(
                f"backbone {backbone.name!r} has a fixed {backbone.grid}x{backbone.grid} latent grid (an RAE): the "
                "training LQ path needs a VAE whose latent grid follows the image size"
            )
        if net_config is not None:
            check_backbone_fits(backbone, net_config)
        if getattr(backbone, "dtype", None) != torch.bfloat16:
            logger.info(
                "the %s encoder runs in %s; the reference encodes the LQ in bfloat16 "
                "(load_backbone(..., dtype=torch.bfloat16))", backbone.name, getattr(backbone, "dtype", None),
            )

    @property
    def pixel_multiple(self) -> int:
        """HQ sides must be multiples of this: /4 downsample, then the backbone's down factor (and 16)."""
        return int(DOWNSCALE) * math.lcm(self.backbone.down_factor, getattr(self.backbone, "image_multiple", 1))

    def encode(self, lq_image: torch.Tensor) -> torch.Tensor:
        """(B, 3, h4, w4) LQ image -> (B, C, h, w) float32 clean normalised latent (no grad)."""
        z = self.backbone.encode(lq_image).float()  # (B, C, h, w)
        if self.round_bf16:
            z = z.to(torch.bfloat16).float()  # parity: the reference keeps the bf16 encoder output
        return z

    def __call__(
        self, hq: torch.Tensor, generator: torch.Generator | None, captions: Sequence[str] | None = None
    ) -> LQCondition:
        """Build the condition of one batch. ``generator`` supplies every random draw (CPU generator: same
        numbers on any device); None uses torch's global RNG."""
        if hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
            raise ValueError(f"LQConditioner expects HQ images (B, 3, H, W) float in [-1, 1], got {tuple(hq.shape)}")
        m = self.pixel_multiple
        if hq.shape[-2] % m or hq.shape[-1] % m:
            raise ValueError(
                f"HQ size {hq.shape[-2]}x{hq.shape[-1]} must be a multiple of {m} (downscale 4 x the "
                f"{self.backbone.name} latent grid); the training buckets are multiples of 64"
            )
        if captions is not None and len(captions) != hq.shape[0]:
            raise ValueError(f"{len(captions)} captions for a batch of {hq.shape[0]}")
        lq_image = downsample_lq(hq)  # (B, 3, H/4, W/4)
        z = self.encode(lq_image)  # (B, C, h, w)
        b = z.shape[0]
        if self.noise_prob > 0:
            apply, sigma, eps = draw_latent_noise(
                z.shape, generator, prob=self.noise_prob, sigma_min=self.sigma_min, sigma_max=self.sigma_max
            )
            z, degrade_sigma = latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame=self.frame)
        else:
            degrade_sigma = torch.zeros(b, device=z.device)
        caption_drop = dropout_mask(b, self.caption_dropout, generator)  # (B,) on the generator's device
        lq_drop = dropout_mask(b, self.lq_dropout, generator).to(z.device)  # (B,)
        z = z * (~lq_drop).view(b, 1, 1, 1).to(z.dtype)  # (B, C, h, w); dropped LQ = all zeros
        lq_keep = (z != 0).flatten(1).any(dim=1)  # (B,)
        new_captions = apply_caption_dropout(captions, caption_drop)[0] if captions is not None else None
        return LQCondition(lq_image, z, degrade_sigma, lq_keep, caption_drop, new_captions)


def check_backbone_fits(backbone: Any, net_config: Any) -> None:
    """Raise one ValueError unless the backbone's latent channels and down factor (and sr 4) fit the network."""
    lq = getattr(net_config, "lq", net_config)
    if lq is None:
        raise ValueError("the network config has no LQ branch (a PixelDiT text-to-image net): it takes no LQ latent")
    have = (backbone.latent_channels, backbone.down_factor)
    want = (lq.latent_channels, lq.latent_down_factor)
    if have != want:
        raise ValueError(
            f"backbone {backbone.name!r} gives {have[0]}-channel latents at 1/{have[1]} of the pixels, but the "
            f"network's LQ branch expects {want[0]} channels at 1/{want[1]} (lq.latent_channels, "
            "lq.latent_down_factor). Use the backbone the network was built for, or set the network config to "
            f"lq.latent_channels={have[0]}, lq.latent_down_factor={have[1]}."
        )
    if lq.sr_scale != int(DOWNSCALE):
        raise ValueError(
            f"the training LQ is the HQ image downsampled by {int(DOWNSCALE)}, but the network has "
            f"lq.sr_scale={lq.sr_scale}; set lq.sr_scale={int(DOWNSCALE)}"
        )
