"""Every released PiD checkpoint: folder name -> (NetConfig, backbone, sampler, files).

A preset is addressed by its released folder name verbatim or by a short alias
(`resolve_preset("flux-4k")`). Hyper-parameters are those of the reference's merged
experiment configs (checkpoints.md in the spec).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import LQConfig, NetConfig, SamplerConfig

CHECKPOINT_FILE = "model_ema_bf16.pth"


@dataclass(frozen=True)
class Preset:
    """One released checkpoint folder."""

    name: str  # released folder name, e.g. "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"
    alias: str  # short name, e.g. "flux-4k"
    net: NetConfig
    backbone: str | None  # latent space the LQ branch was trained on; None for text-to-image PixelDiT
    sampler: SamplerConfig
    resolutions: str  # output sizes it was trained for (documentation)
    description: str

    @property
    def checkpoint_path(self) -> str:
        """Path of the weight file inside a weights directory, mirroring the release layout."""
        return f"checkpoints/{self.name}/{CHECKPOINT_FILE}"

    @property
    def scale(self) -> int | None:
        return self.net.lq.sr_scale if self.net.lq else None


_V1 = NetConfig(
    rope_ref_h=1024,
    rope_ref_w=1024,
    lq=LQConfig(
        latent_channels=16,
        hidden_dim=512,
        num_res_blocks=4,
        padding_mode="zeros",
        gate_type="sigma_aware_per_token_per_dim",
        interval=2,
        sr_scale=4,
        latent_down_factor=8,
        pit_inject=False,
    ),
)
_V15 = NetConfig(
    rope_ref_h=2048,
    rope_ref_w=2048,
    lq=LQConfig(
        latent_channels=16,
        hidden_dim=1024,
        num_res_blocks=4,
        padding_mode="replicate",
        gate_type="sigma_aware_per_token",
        interval=2,
        sr_scale=4,
        latent_down_factor=8,
        pit_inject=True,
    ),
)
_PIXELDIT = NetConfig(rope_ref_h=2048, rope_ref_w=2048, lq=None)


def _lq(base: NetConfig, **changes) -> NetConfig:
    return dataclasses.replace(base, lq=dataclasses.replace(base.lq, **changes))


_STUDENT = SamplerConfig(kind="student", steps=4, mode="sde")
# The docs recommend 25 steps and CFG 5 for the undistilled PiD teachers (sampler.md §2).
_TEACHER = SamplerConfig(kind="teacher", steps=25, cfg_scale=5.0, base_shift=6.0, base_size=2048)
_PIXELDIT_SAMPLER = SamplerConfig(kind="teacher", steps=50, cfg_scale=2.75, base_shift=6.0, base_size=2048)

_2K = "2048x2048 from a 512 px latent (any aspect ratio, ~4 MP)"
_4K = "2048 to 4096 px (multi-resolution, any aspect ratio)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "PiD_res2k_sr4x_official_flux_distill_4step", "flux-2k", _V1, "flux", _STUDENT, _2K,
            "FLUX.1 / Z-Image latents, 4x, v1",
        ),
        Preset(
            "PiD_res2k_sr4x_official_flux2_distill_4step", "flux2-2k",
            _lq(_V1, latent_channels=128, latent_down_factor=16), "flux2", _STUDENT, _2K,
            "FLUX.2 / FLUX.2-klein packed latents, 4x, v1",
        ),
        Preset(
            "PiD_res2k_sr4x_official_sd3_distill_4step", "sd3-2k", _V1, "sd3", _STUDENT, _2K,
            "SD3 latents, 4x, v1",
        ),
        Preset(
            "PiD_res2k_sr4x_official_dinov2_distill_4step", "dinov2-2k",
            _lq(_V1, latent_channels=768, latent_down_factor=16), "dinov2", _STUDENT, _2K,
            "DINOv2-B RAE latents (32x32 tokens), 4x, v1",
        ),
        Preset(
            "PiD_res2k_sr8x_official_siglip_distill_4step", "siglip-2k",
            _lq(_V1, latent_channels=1152, latent_down_factor=16, sr_scale=8), "siglip", _STUDENT,
            "2048x2048 from a 16x16-token SigLIP-2 latent (256 px native)",
            "SigLIP-2 Scale-RAE latents, 8x, v1",
        ),
        Preset(
            "PiD_res2kto4k_sr4x_official_sd3_distill_4step", "sd3-4k", _V1, "sd3", _STUDENT, _4K,
            "SD3 latents, 4x, v1, multi-resolution up to 4K",
        ),
        Preset(
            "PiD_res2kto4k_sr4x_official_sdxl_distill_4step", "sdxl-4k", _lq(_V1, latent_channels=4), "sdxl",
            _STUDENT, _4K, "SDXL latents (variance-preserving noise frame), 4x, v1, up to 4K",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", "flux-4k", _V15, "flux", _STUDENT, _4K,
            "FLUX.1 / Z-Image latents, 4x, v1.5, up to 4K",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step", "flux2-4k",
            _lq(_V15, latent_channels=128, latent_down_factor=16, unpatchify_factor=2), "flux2", _STUDENT, _4K,
            "FLUX.2 / FLUX.2-klein packed latents, 4x, v1.5, up to 4K",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step", "qwenimage-4k", _V15, "qwenimage",
            _STUDENT, _4K, "Qwen-Image latents, 4x, v1.5, up to 4K",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled", "flux-4k-undistilled",
            _lq(_V15, aux_rgb_head=True), "flux", _TEACHER, _4K,
            "undistilled v1.5 FLUX.1 teacher (DPM-Solver++, CFG)",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled", "flux2-4k-undistilled",
            _lq(_V15, latent_channels=128, latent_down_factor=16, unpatchify_factor=2, aux_rgb_head=True),
            "flux2", _TEACHER, _4K, "undistilled v1.5 FLUX.2 teacher (DPM-Solver++, CFG)",
        ),
        Preset(
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled", "qwenimage-4k-undistilled",
            _lq(_V15, aux_rgb_head=True), "qwenimage", _TEACHER, _4K,
            "undistilled v1.5 Qwen-Image teacher (DPM-Solver++, CFG)",
        ),
        Preset(
            "PixelDiT_finetune_2kto4k", "pixeldit-4k", _PIXELDIT, None, _PIXELDIT_SAMPLER, "2048 to 3840 px",
            "text-to-image PixelDiT base model (no latent input)",
        ),
    ]
}
ALIASES: dict[str, str] = {p.alias: p.name for p in PRESETS.values()}


def resolve_preset(name: str | Preset) -> Preset:
    """Look a preset up by released folder name or alias (case-insensitive)."""
    if isinstance(name, Preset):
        return name
    if name in PRESETS:
        return PRESETS[name]
    if name in ALIASES:
        return PRESETS[ALIASES[name]]
    lowered = {k.lower(): v for k, v in {**ALIASES, **{n: n for n in PRESETS}}.items()}
    if name.lower() in lowered:
        return PRESETS[lowered[name.lower()]]
    raise ValueError(
        f"unknown preset {name!r}. Known aliases: {', '.join(sorted(ALIASES))}; "
        "or a released folder name such as PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"
    )


def presets_for_backbone(backbone: str) -> list[Preset]:
    return [p for p in PRESETS.values() if p.backbone == backbone]


def presets_for_latent_channels(channels: int) -> list[Preset]:
    return [p for p in PRESETS.values() if p.net.lq is not None and p.net.lq.latent_channels == channels]
