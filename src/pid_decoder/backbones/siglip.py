"""siglip: the Scale-RAE (SigLIP-2 So400M/14 @224 encoder + ViT-XL decoder), backbones.md §7b.

Legend: B batch, N = g·g tokens (256), C encoder width (1152), g grid (16), p decoder patch (14).

diffusers' `AutoencoderRAE("siglip2")` cannot load So400M (and crashes under transformers 5), so the
encoder is transformers' `SiglipVisionModel` and the decoder diffusers' `RAEDecoder`, wired here.

Encode: [-1,1] -> [0,1] -> bicubic resize with antialias (fp32) to 224 -> (x − 0.5)/0.5 -> the vision
tower's hidden state *before* its post-LayerNorm -> affine-free LayerNorm (eps from the config, 1e-6) in
fp32 -> (B, C, g, g). No dataset statistics.
Decode: tokens -> RAEDecoder (patch 14, 224 px) -> ·0.5 + 0.5, clamp -> bicubic up to g·16 (256), clamp
-> [-1, 1].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import BACKBONE_INFO
from .base import Backbone
from .rae import decode_tokens, fix_decoder_pos_embed, remap_decoder_state
from .vae import prepare_module, resolve_device_dtype
from .weights import find_file, load_checked, load_pretrained_encoder, missing_file, read_config, read_state_dict

logger = logging.getLogger(__name__)

SIGLIP_ENCODER_REPO = "google/siglip2-so400m-patch14-224"
SIGLIP_DECODER_FILES = (
    "model.pt",
    "siglip2_sop14_i224_web73M_ganw3_decXL.pt",
    "decoder/model.pt",
    "decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt",
)
SIGLIP_DECODER_CONFIGS = (
    "XL_decoder_config.json",
    "config.json",
    "decoder/XL_decoder_config.json",
    "decoder/config.json",
)
SIGLIP_ENCODER_FOLDERS = ("encoder", "siglip2-so400m-patch14-224", SIGLIP_ENCODER_REPO)
IMAGE_MEAN = 0.5  # SigLIP processor mean and std (not ImageNet)
IMAGE_STD = 0.5


def _vision_tower(encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding `embeddings` and `encoder`: the model itself (transformers 5) or `.vision_model`."""
    tower = encoder
    while not hasattr(tower, "embeddings") and hasattr(tower, "vision_model"):
        tower = tower.vision_model
    if not (hasattr(tower, "embeddings") and hasattr(tower, "encoder")):
        raise ValueError(f"siglip backbone needs a transformers SiglipVisionModel, got {type(encoder).__name__}")
    return tower


def _vision_config(encoder: torch.nn.Module) -> Any:
    cfg = encoder.config
    return getattr(cfg, "vision_config", cfg)


class SiglipBackbone(Backbone):
    """Scale-RAE latent: affine-free-normalised SigLIP-2 tokens on a fixed 16x16 grid."""

    info = BACKBONE_INFO["siglip"]

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        tower = _vision_tower(encoder)
        cfg = _vision_config(encoder)
        self.input_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.latent_channels = cfg.hidden_size
        self.ln_eps = cfg.layer_norm_eps
        if type(decoder).__name__ != "RAEDecoder":
            raise ValueError(f"siglip backbone needs a diffusers RAEDecoder as decoder, got {type(decoder).__name__}")
        if decoder.decoder_embed.in_features != self.latent_channels or decoder.num_patches != self.grid**2:
            raise ValueError(
                f"RAEDecoder (hidden_size {decoder.decoder_embed.in_features}, num_patches {decoder.num_patches}) "
                f"does not fit the SigLIP encoder ({self.latent_channels} wide, {self.grid}x{self.grid} tokens)"
            )
        if (self.latent_channels, self.grid) != (self.info.latent_channels, self.info.grid):
            logger.warning(
                "siglip backbone with %d channels on a %dx%d grid: the released PiD checkpoint expects 1152 on 16x16",
                self.latent_channels, self.grid, self.grid,
            )
        fix_decoder_pos_embed(decoder, self.grid)  # a no-op for the released 16x16 grid
        self.tower = prepare_module(tower, self.device, dtype)
        self.decoder = prepare_module(decoder, self.device, dtype)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1.0) / 2.0  # [0, 1]
        if tuple(x.shape[2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False, antialias=True
            )
        x = (x - IMAGE_MEAN) / IMAGE_STD
        embeds = self.tower.embeddings(x.to(self.dtype))  # (B, N, C)
        hidden = self.tower.encoder(inputs_embeds=embeds).last_hidden_state  # (B, N, C), before post-LN
        tokens = F.layer_norm(hidden.float(), (hidden.shape[-1],), eps=self.ln_eps)  # affine-free, fp32
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B, C, g, g)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = latents.flatten(2).transpose(1, 2)  # (B, N, C)
        x = decode_tokens(self.decoder, tokens.to(self.dtype)).float()  # (B, 3, g·p, g·p)
        x = (x * IMAGE_STD + IMAGE_MEAN).clamp(0.0, 1.0)
        size = self.grid * self.down_factor
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)  # (B, 3, 256, 256)
        return x * 2.0 - 1.0


def build_decoder(config: dict[str, Any], hidden_size: int, grid: int) -> torch.nn.Module:
    """diffusers RAEDecoder from a Scale-RAE decoder config; `hidden_size` is always the encoder width."""
    from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder

    patch = int(config.get("patch_size", 14))
    return RAEDecoder(
        hidden_size=hidden_size,
        decoder_hidden_size=int(config["decoder_hidden_size"]),
        decoder_num_hidden_layers=int(config["decoder_num_hidden_layers"]),
        decoder_num_attention_heads=int(config["decoder_num_attention_heads"]),
        decoder_intermediate_size=int(config["decoder_intermediate_size"]),
        num_patches=grid * grid,
        patch_size=patch,
        num_channels=int(config.get("num_channels", 3)),
        image_size=grid * patch,
        qkv_bias=bool(config.get("qkv_bias", True)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        hidden_act=str(config.get("hidden_act", "gelu")),
    )


def load_siglip_encoder(folder: Path | None) -> torch.nn.Module:
    from transformers import SiglipVisionModel

    return load_pretrained_encoder(SiglipVisionModel, folder, SIGLIP_ENCODER_REPO, "SigLIP-2", "next to the decoder .pt")


def load_siglip(
    path: str | Path | None = None,
    *,
    module: Any = None,
    config: str | Path | dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SiglipBackbone:
    """The Scale-RAE backbone from `module` = (SiglipVisionModel, RAEDecoder) or the files in folder `path`."""
    info = BACKBONE_INFO["siglip"]
    if module is not None:
        if isinstance(module, dict):
            encoder, decoder = module.get("encoder"), module.get("decoder")
        elif isinstance(module, (tuple, list)) and len(module) == 2:
            encoder, decoder = module
        else:
            raise ValueError(
                "backbone 'siglip' takes module=(SiglipVisionModel, RAEDecoder) or "
                f"{{'encoder': ..., 'decoder': ...}}, got {type(module).__name__}"
            )
        device, dtype = resolve_device_dtype(encoder, device, dtype)
        return SiglipBackbone(encoder, decoder, device, dtype)
    if path is None:
        raise ValueError(f"backbone 'siglip' needs path= to a folder with {info.weight_files}, or module=")
    p = Path(path)
    if not p.exists():
        raise missing_file("Scale-RAE files", p, "siglip", info.weight_files)
    if p.is_file():
        p = p.parent
    decoder_file = find_file(p, SIGLIP_DECODER_FILES)
    if decoder_file is None:
        raise missing_file("Scale-RAE decoder .pt", p, "siglip", info.weight_files)
    encoder_folder = next((p / r for r in SIGLIP_ENCODER_FOLDERS if (p / r / "config.json").is_file()), None)
    encoder = load_siglip_encoder(encoder_folder)
    if config is None:
        config = find_file(p, SIGLIP_DECODER_CONFIGS)
        if config is None:
            logger.warning(
                "no XL_decoder_config.json next to %s; using the shipped ViT-XL decoder config", decoder_file
            )
    dec_cfg = read_config(config, "siglip_decoder.json")
    vis = _vision_config(encoder)
    decoder = build_decoder(dec_cfg, vis.hidden_size, vis.image_size // vis.patch_size)
    state = remap_decoder_state(read_state_dict(decoder_file, "siglip", info.weight_files))
    load_checked(decoder, state, str(decoder_file), "siglip")
    device, dtype = resolve_device_dtype(None, device, dtype)
    return SiglipBackbone(encoder, decoder, device, dtype)
