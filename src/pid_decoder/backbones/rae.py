"""dinov2: the RAE (DINOv2-B-with-registers encoder + ViT-XL decoder) via diffusers `AutoencoderRAE`
(backbones.md §7a). Also the decoder helpers shared with the Scale-RAE (siglip.py).

Legend: B batch, N = g·g tokens, C encoder width (768), g latent grid (32), P decoder patch (16).

Encode: [-1,1] -> [0,1] -> bicubic resize (no antialias, fp32) to the encoder input (448) -> ImageNet
normalisation -> DINOv2 with an affine-free final LayerNorm -> drop CLS + 4 registers -> (B, C, g, g)
-> per-position (z − mean) / √(var + 1e-5) from `stat.pt`, in fp32.
Decode: inverse statistics -> `RAEDecoder` -> unpatchify -> ImageNet de-normalisation -> clamp [0,1] -> [-1,1].

The two corrections to diffusers' `AutoencoderRAE` (backbones.md §7a) are applied here:
1. statistics: normalisation is done outside the module with √(var + 1e-5) exactly; when built from
   `stat.pt` the module's own buffers get latents_std = √(var + 1e-5) − 1e-5 so its `encode` agrees.
2. `decoder_pos_embed` is rebuilt for the real grid (diffusers uses base_size=16, which halves every
   position of a 32x32 grid).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import BACKBONE_INFO
from .base import Backbone
from .vae import check_module_class, prepare_module, resolve_device_dtype
from .weights import (
    find_file,
    load_checked,
    load_pretrained_encoder,
    missing_file,
    read_config,
    read_state_dict,
    read_tensor_file,
)

logger = logging.getLogger(__name__)

STAT_EPS = 1e-5
DINOV2_ENCODER_REPO = "facebook/dinov2-with-registers-base"
DINOV2_DECODER_FILES = ("model.pt", "decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt", "decoder/model.pt")
DINOV2_STAT_FILES = ("stat.pt", "stats/dinov2/wReg_base/imagenet1k_512/stat.pt", "stats/stat.pt")
ENCODER_FOLDERS = ("encoder", "dinov2-with-registers-base", DINOV2_ENCODER_REPO)

# Published RAE decoder names (transformers 4.x ViT-MAE, or 5.x after a re-save) -> diffusers RAEDecoder.
_DECODER_RENAMES = (
    (".attention.attention.query.", ".attention.to_q."),
    (".attention.attention.key.", ".attention.to_k."),
    (".attention.attention.value.", ".attention.to_v."),
    (".attention.output.dense.", ".attention.to_out.0."),
    (".attention.q_proj.", ".attention.to_q."),
    (".attention.k_proj.", ".attention.to_k."),
    (".attention.v_proj.", ".attention.to_v."),
    (".attention.o_proj.", ".attention.to_out.0."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)


def remap_decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published RAE / Scale-RAE decoder `.pt` names -> diffusers `RAEDecoder` names (backbones.md §8).

    `decoder_pos_embed` is dropped: it is a fixed sin-cos table rebuilt by `fix_decoder_pos_embed`.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.") and not key.startswith("decoder_"):
            key = key[len("decoder."):]
        if key == "decoder_pos_embed":
            continue
        for old, new in _DECODER_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def fix_decoder_pos_embed(decoder: torch.nn.Module, grid: int) -> None:
    """Rebuild `decoder_pos_embed` as the 2-D sin-cos table of a `grid`x`grid` token grid plus a zero CLS row.

    diffusers builds it with base_size=16, i.e. positions scaled by 16/grid: wrong for every grid but 16.
    """
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    dim = decoder.decoder_pos_embed.shape[-1]
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True, extra_tokens=1, base_size=grid, output_type="pt")
    table = table.unsqueeze(0).float().to(decoder.decoder_pos_embed.device)  # (1, 1 + g·g, D)
    decoder.register_buffer("decoder_pos_embed", table, persistent=False)


def decode_tokens(decoder: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """RAEDecoder on (B, N, C) tokens -> (B, 3, g·P, g·P) in the decoder's normalised pixel space."""
    logits = decoder(tokens, drop_cls_token=False).logits  # (B, N, P·P·3)
    return decoder.unpatchify(logits)  # (B, 3, g·P, g·P)


def find_encoder_folder(folder: Path) -> Path | None:
    for rel in ENCODER_FOLDERS:
        if (folder / rel / "config.json").is_file():
            return folder / rel
    return None


class Dinov2Backbone(Backbone):
    """RAE latent: DINOv2-B-with-registers tokens on a fixed grid, normalised per position."""

    info = BACKBONE_INFO["dinov2"]

    def __init__(
        self,
        rae: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        *,
        latents_mean: torch.Tensor | None = None,
        latents_std: torch.Tensor | None = None,
    ):
        super().__init__(device, dtype)
        check_module_class(rae, "AutoencoderRAE", self.name)
        if rae.config.encoder_type != "dinov2":
            raise ValueError(
                f"backbone 'dinov2' needs AutoencoderRAE(encoder_type='dinov2'), got {rae.config.encoder_type!r}"
            )
        cfg = rae.config
        self.grid = cfg.encoder_input_size // cfg.encoder_patch_size
        self.latent_channels = cfg.encoder_hidden_size
        self.down_factor = cfg.patch_size
        self.input_size = cfg.encoder_input_size
        self.skip_tokens = 1 + rae.encoder.config.num_register_tokens  # CLS + registers
        if (self.latent_channels, self.grid) != (self.info.latent_channels, self.info.grid):
            logger.warning(
                "dinov2 backbone with %d channels on a %dx%d grid: the released PiD checkpoint expects 768 on 32x32",
                self.latent_channels, self.grid, self.grid,
            )
        if latents_mean is None:
            # diffusers divides by (latents_std + 1e-5); keep the module's own convention.
            latents_mean = rae._latents_mean.detach().float()
            latents_std = rae._latents_std.detach().float() + STAT_EPS
        self.latents_mean = _as_map(latents_mean, self.latent_channels).to(self.device)  # (1, C, g, g) or (1, C, 1, 1)
        self.latents_std = _as_map(latents_std, self.latent_channels).to(self.device)
        self.image_mean = rae.encoder_mean.detach().float().view(1, 3, 1, 1).to(self.device)
        self.image_std = rae.encoder_std.detach().float().view(1, 3, 1, 1).to(self.device)
        fix_decoder_pos_embed(rae.decoder, self.grid)
        self.rae = prepare_module(rae, self.device, dtype)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1.0) / 2.0  # [0, 1]
        if tuple(x.shape[2:]) != (self.input_size, self.input_size):
            # parity: bicubic without antialias, in fp32; non-square inputs are squashed
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.image_mean) / self.image_std
        hidden = self.rae.encoder(x.to(self.dtype)).last_hidden_state  # (B, skip + N, C)
        tokens = hidden[:, self.skip_tokens:].float()  # (B, N, C)
        b, n, c = tokens.shape
        z = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B, C, g, g)
        return (z - self.latents_mean) / self.latents_std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.latents_std + self.latents_mean  # (B, C, g, g)
        tokens = z.flatten(2).transpose(1, 2)  # (B, N, C)
        x = decode_tokens(self.rae.decoder, tokens.to(self.dtype)).float()  # (B, 3, g·P, g·P)
        x = (x * self.image_std + self.image_mean).clamp(0.0, 1.0)
        return x * 2.0 - 1.0


def _as_map(stat: torch.Tensor, channels: int) -> torch.Tensor:
    """A statistics tensor ((C, g, g), (C,), or scalar) as something broadcastable to (B, C, g, g)."""
    stat = stat.float()
    if stat.ndim == 3:
        return stat.unsqueeze(0)
    if stat.ndim == 1 and stat.numel() == channels:
        return stat.view(1, channels, 1, 1)
    if stat.numel() == 1:
        return stat.reshape(1, 1, 1, 1)
    if stat.ndim == 4 and stat.shape[0] == 1:
        return stat
    raise ValueError(f"RAE latent statistics of shape {tuple(stat.shape)} do not fit {channels} channels")


def read_stats(path: Path, channels: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`stat.pt` -> (mean, √(var + 1e-5)), each (C, g, g) or (C,)."""
    stats = read_tensor_file(path, "dinov2", "the RAE statistics file stat.pt (a dict with 'mean' and 'var')")
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "var")):
        found = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{str(path)!r} must be a dict with 'mean' and 'var' tensors (RAE stat.pt), got {found}")
    mean, var = stats["mean"].float(), stats["var"].float()
    for key, t in (("mean", mean), ("var", var)):
        if t.shape[0] != channels or (t.ndim == 3 and tuple(t.shape[1:]) != (grid, grid)):
            raise ValueError(
                f"{str(path)!r} {key} has shape {tuple(t.shape)}, expected ({channels}, {grid}, {grid}) for this "
                "encoder. Is it the statistics file of another RAE?"
            )
    return mean, torch.sqrt(var + STAT_EPS)


def load_dinov2_encoder(folder: Path | None) -> torch.nn.Module:
    """Dinov2WithRegistersModel from a local snapshot folder, or the hub repo when `folder` is None."""
    from transformers import Dinov2WithRegistersModel

    return load_pretrained_encoder(
        Dinov2WithRegistersModel, folder, DINOV2_ENCODER_REPO, "DINOv2", "next to model.pt and stat.pt"
    )


def load_dinov2(
    path: str | Path | None = None,
    *,
    module: torch.nn.Module | None = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Dinov2Backbone:
    """The dinov2 RAE backbone from `module` (an AutoencoderRAE) or from the RAE files in folder `path`."""
    info = BACKBONE_INFO["dinov2"]
    if module is not None:
        device, dtype = resolve_device_dtype(module, device, dtype)
        return Dinov2Backbone(module, device, dtype)
    if path is None:
        raise ValueError(f"backbone 'dinov2' needs path= to a folder with {info.weight_files}, or module=")
    from diffusers import AutoencoderRAE

    p = Path(path)
    if not p.exists():
        raise missing_file("RAE files", p, "dinov2", info.weight_files)
    if p.is_file():
        p = p.parent
    if (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*")):
        rae = AutoencoderRAE.from_pretrained(str(p), local_files_only=True)
        device, dtype = resolve_device_dtype(None, device, dtype)
        return Dinov2Backbone(rae, device, dtype)

    decoder_file = find_file(p, DINOV2_DECODER_FILES)
    stat_file = find_file(p, DINOV2_STAT_FILES)
    if decoder_file is None:
        raise missing_file("RAE decoder model.pt", p, "dinov2", info.weight_files)
    if stat_file is None:
        raise missing_file("RAE statistics stat.pt", p, "dinov2", info.weight_files)
    encoder = load_dinov2_encoder(find_encoder_folder(p))
    if config is None and (p / "config.json").is_file():
        config = p / "config.json"
    cfg: dict[str, Any] = read_config(config, "dinov2_rae.json")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    enc_cfg = encoder.config
    cfg.update(
        encoder_type="dinov2",
        encoder_hidden_size=enc_cfg.hidden_size,
        encoder_patch_size=enc_cfg.patch_size,
        encoder_num_hidden_layers=enc_cfg.num_hidden_layers,
        latents_mean=None,
        latents_std=None,
    )
    rae = AutoencoderRAE.from_config(cfg)
    grid = cfg["encoder_input_size"] // cfg["encoder_patch_size"]
    mean, std = read_stats(stat_file, enc_cfg.hidden_size, grid)
    rae._latents_mean = mean.clone()
    rae._latents_std = std - STAT_EPS  # so that diffusers' own (z − mean)/(std + 1e-5) matches too

    if rae.encoder.config.num_attention_heads != enc_cfg.num_attention_heads:
        raise ValueError(
            f"the DINOv2 encoder has {enc_cfg.num_attention_heads} heads; diffusers' AutoencoderRAE assumes "
            f"hidden/64 = {rae.encoder.config.num_attention_heads}"
        )
    encoder_state = {k: v for k, v in encoder.state_dict().items() if k not in ("layernorm.weight", "layernorm.bias")}
    load_checked(rae.encoder, encoder_state, "DINOv2 encoder", "dinov2")
    decoder_state = remap_decoder_state(read_state_dict(decoder_file, "dinov2", info.weight_files))
    load_checked(rae.decoder, decoder_state, str(decoder_file), "dinov2")
    device, dtype = resolve_device_dtype(None, device, dtype)
    return Dinov2Backbone(rae, device, dtype, latents_mean=mean, latents_std=std)
