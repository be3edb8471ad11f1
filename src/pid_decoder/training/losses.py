"""Stage-0/1 training losses: pure functions of (network, batch, explicit randomness) -> named scalars.

Legend: B batch, H/W HQ pixels, h/w = int(H/4), int(W/4) LQ pixels, C latent channels, T text tokens.

Flow matching with the reference's sign convention (training-details.md §3): x_t = (1 - t) x0 + t eps, the
network predicts v = eps - x0 at timestep 1000 t, and L_fm is one mean of (v - (eps - x0))^2 over B*3*H*W.
For v1.5 networks built for training, the aux head's LQ-RGB prediction adds the YCbCr Charbonnier
alignment loss (§3.4) with weight 0.8. No randomness is drawn here: t, noise and the LQ condition come in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .degrade import downsample_lq


@dataclass(frozen=True)
class LossWeights:
    """Loss weights and alignment-loss settings; the defaults are the released v1.5 teacher recipe."""

    diffusion: float = 1.0
    lq_align: float = 0.8
    y_weight: float = 0.25
    chroma_weight: float = 1.0
    eps: float = 1e-3
    sigma_power: float = 1.0


# --------------------------------------------------------------------------- time
def logit_normal(
    shape: tuple[int, ...] | int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """t = sigmoid(mean + std * n), n ~ N(0, 1), float32, drawn from ``generator`` (on ``device``)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(n * std + mean)


def shift_t(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """The flow shift ``s t / (1 + (s - 1) t)`` (identity at s = 1)."""
    if isinstance(shift, (int, float)) and shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


# --------------------------------------------------------------------------- LQ-RGB alignment
def _ycbcr(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rgb (B, 3, h, w) in [0, 1] -> Y, Cb, Cr, each (B, h, w) (BT.601 full range)."""
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return y, cb, cr


def lq_align_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    degrade_sigma: torch.Tensor,
    keep: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> torch.Tensor:
    """YCbCr Charbonnier loss between the aux head's LQ-RGB prediction and the clean LQ image (§3.4).

    pred (B, 3, h, w) unclamped, target (B, 3, h', w') in [-1, 1] (area-resized to pred's size if it differs),
    degrade_sigma (B,), keep (B,) bool. Per-sample weight valid_i * max(0, 1 - sigma_i)^p, where valid_i =
    keep_i and the target is not black (mean |target| > 1e-6); 0 when every sample is masked. float32,
    outside autocast.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if target.shape[-2:] != pred.shape[-2:]:
            target = F.interpolate(target, size=pred.shape[-2:], mode="area")
        p_y, p_cb, p_cr = _ycbcr((pred + 1) / 2)
        t_y, t_cb, t_cr = _ycbcr((target.clamp(-1, 1) + 1) / 2)
        diff = torch.stack(
            [(p_y - t_y) * weights.y_weight, (p_cb - t_cb) * weights.chroma_weight, (p_cr - t_cr) * weights.chroma_weight],
            dim=1,
        )  # (B, 3, h, w)
        err = torch.sqrt(diff.square() + weights.eps**2) - weights.eps
        per_sample = err.mean(dim=(1, 2, 3))  # (B,)
        valid = (target.abs().mean(dim=(1, 2, 3)) > 1e-6) & keep.to(device=pred.device, dtype=torch.bool)
        omega = valid.float() * (1 - degrade_sigma.to(pred.device).float()).clamp(min=0) ** weights.sigma_power
        return (omega * per_sample).sum() / omega.sum().clamp(min=1e-6)


# --------------------------------------------------------------------------- the stage-0/1 loss
def _check(net: nn.Module, hq, lq_latent, text, degrade_sigma, t, noise, lq_image, lq_keep, validate: bool) -> None:
    cfg = net.config
    if not torch.is_tensor(hq) or hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
        raise ValueError(f"hq must be a float tensor (B, 3, H, W) in [-1, 1], got {getattr(hq, 'shape', type(hq))}")
    B, _, H, W = hq.shape
    ps = cfg.patch_size
    if H % ps or W % ps:
        raise ValueError(f"hq size {H}x{W} must be a multiple of the patch size {ps}")
    if not torch.is_tensor(noise) or noise.shape != hq.shape:
        raise ValueError(f"noise must have the shape of hq {tuple(hq.shape)}, got {getattr(noise, 'shape', noise)}")
    if not torch.is_tensor(t) or t.shape != (B,):
        raise ValueError(f"t must be a ({B},) tensor in [0, 1] (before the shift), got {getattr(t, 'shape', t)}")
    if not torch.is_tensor(text) or text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.txt_embed_dim:
        raise ValueError(f"text must be ({B}, T, {cfg.txt_embed_dim}), got {getattr(text, 'shape', type(text))}")
    if cfg.lq is None:
        if lq_latent is not None or degrade_sigma is not None or lq_image is not None or lq_keep is not None:
            raise ValueError("this network is the text-to-image PixelDiT (stage 0): pass lq_latent=None, "
                             "degrade_sigma=None and no lq_image/lq_keep")
    else:
        k = cfg.lq.pixels_per_latent
        want = (B, cfg.lq.latent_channels, H // k, W // k)
        if not torch.is_tensor(lq_latent) or tuple(lq_latent.shape) != want:
            raise ValueError(f"lq_latent must have shape {want} for hq {H}x{W}, got {getattr(lq_latent, 'shape', lq_latent)}")
        if not torch.is_tensor(degrade_sigma) or degrade_sigma.shape != (B,):
            raise ValueError(f"degrade_sigma must be a ({B},) tensor in [0, 1], got {getattr(degrade_sigma, 'shape', degrade_sigma)}")
        if lq_image is not None and (lq_image.ndim != 4 or lq_image.shape[:2] != (B, 3)):
            raise ValueError(f"lq_image must be ({B}, 3, h, w), got {tuple(lq_image.shape)}")
        if lq_keep is not None and lq_keep.shape != (B,):
            raise ValueError(f"lq_keep must be a ({B},) bool tensor, got {tuple(lq_keep.shape)}")
    if validate:  # value checks synchronise with the device: the loop may do them once
        named = {"hq": hq, "noise": noise, "t": t, "text": text, "lq_latent": lq_latent, "degrade_sigma": degrade_sigma}
        for name, x in named.items():
            if x is not None and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"t must be in [0, 1] (before the shift), got {t.tolist()}")
        if degrade_sigma is not None and bool(((degrade_sigma < 0) | (degrade_sigma > 1)).any()):
            raise ValueError(f"degrade_sigma must be in [0, 1], got {degrade_sigma.tolist()}")


def teacher_losses(
    net: nn.Module,
    hq: torch.Tensor,
    lq_latent: torch.Tensor | None,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor | None,
    *,
    t: torch.Tensor,
    noise: torch.Tensor,
    shift: float,
    lq_image: torch.Tensor | None = None,
    lq_keep: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """Stage-1 teacher (or, for a network without LQ branch, stage-0 PixelDiT) losses.

    net: a `PiDNet`, or a wrapper (DDP/FSDP2/compile) exposing the same ``forward_train`` and ``config``;
    the network is used only through one ``net.forward_train(...)`` call. hq (B, 3, H, W) in [-1, 1];
    lq_latent (B, C, H/k, W/k) already noised and dropped (all zeros = dropped), or None for stage 0; text
    (B, T, txt_dim); degrade_sigma (B,) or None for stage 0; t (B,) in [0, 1] *before* the shift; noise like
    hq; shift the flow shift (e.g. `pid_decoder.sampling.dynamic_shift(H, W)`). lq_image (B, 3, H/4, W/4):
    the clean LQ image (default `downsample_lq(hq)`); lq_keep (B,) bool: which LQ conditions were kept
    (default: the latent is not all zeros, as the reference derives it).

    Returns float32 scalars ``diffusion``, ``lq_align`` (only for networks with the aux head: v1.5 teachers
    loaded with ``training=True``) and ``total`` = 1.0 * diffusion + 0.8 * lq_align (`LossWeights`).
    ``validate=False`` skips the value checks (NaN, ranges) that synchronise with the device.
    """
    cfg = net.config
    _check(net, hq, lq_latent, text, degrade_sigma, t, noise, lq_image, lq_keep, validate)
    x0 = hq.float()
    t_s = shift_t(t.float(), shift)
    tb = t_s[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * noise.float()  # (B, 3, H, W)
    v, aux = net.forward_train(x_t, t_s * 1000, text, lq_latent, degrade_sigma)
    if aux is None and cfg.lq is not None and cfg.lq.aux_rgb_head:
        raise ValueError(
            "this v1.5 network's config has the aux LQ-RGB head, but the network was built without it "
            "(inference loading drops it): load it with load_network(..., training=True)"
        )
    with torch.autocast(x0.device.type, enabled=False):
        diffusion = (v.float() - (noise.float() - x0)).square().mean()
    out = {"diffusion": diffusion}
    total = weights.diffusion * diffusion
    if aux is not None:
        if lq_image is None:
            lq_image = downsample_lq(hq)
        if lq_keep is None:
            lq_keep = lq_latent.flatten(1).ne(0).any(dim=1)  # (B,)
        out["lq_align"] = lq_align_loss(aux, lq_image, degrade_sigma, lq_keep, weights)
        total = total + weights.lq_align * out["lq_align"]
    out["total"] = total
    return out
