"""Latent diffusion models (diffusers pipelines) as the reference runs them: hub id, steps, guidance and the steps
whose x_t `PiDPipeline.generate` captures (pipelines.md §2.1), and loading one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LDMDefaults:
    """How the reference runs one LDM: hub id, steps, guidance, recommended capture step(s), extra kwargs."""

    model: str
    steps: int
    guidance: float
    capture: tuple[int, ...]  # recommended intermediate step(s) K; x0 is always decoded too
    extra: dict[str, Any] = field(default_factory=dict)


_MSL = {"max_sequence_length": 512}
LDM_DEFAULTS: dict[str, LDMDefaults] = {
    "flux": LDMDefaults("black-forest-labs/FLUX.1-dev", 28, 3.5, (24,), _MSL),
    "sd3": LDMDefaults("stabilityai/stable-diffusion-3-medium-diffusers", 28, 4.0, (24,)),
    "sdxl": LDMDefaults("stabilityai/stable-diffusion-xl-base-1.0", 30, 7.5, (26,)),
    "flux2": LDMDefaults("black-forest-labs/FLUX.2-dev", 50, 4.0, (46,), _MSL),
    "flux2-klein-4b": LDMDefaults("black-forest-labs/FLUX.2-klein-4B", 4, 1.0, (), _MSL),
    "flux2-klein-9b": LDMDefaults("black-forest-labs/FLUX.2-klein-9B", 4, 1.0, (), _MSL),
    "qwenimage": LDMDefaults(
        "Qwen/Qwen-Image", 50, 4.0, (44,), {**_MSL, "true_cfg_scale": 4.0, "negative_prompt": " "}
    ),
    "qwenimage-2512": LDMDefaults(
        "Qwen/Qwen-Image-2512", 50, 4.0, (44,), {**_MSL, "true_cfg_scale": 4.0, "negative_prompt": " "}
    ),
    "zimage": LDMDefaults("Tongyi-MAI/Z-Image", 50, 5.0, (46,), _MSL),
    "zimage-turbo": LDMDefaults("Tongyi-MAI/Z-Image-Turbo", 9, 0.0, (), _MSL),
}
# pipeline kind (backbones.packing.pipeline_kind) -> LDM tag used when the caller names none
KIND_TAG = {"flux2-klein": "flux2-klein-4b"}


def ldm_defaults(tag: str) -> LDMDefaults:
    key = tag.strip().lower()
    if key not in LDM_DEFAULTS:
        raise ValueError(f"unknown LDM {tag!r}; expected one of {', '.join(LDM_DEFAULTS)}")
    return LDM_DEFAULTS[key]


def load_ldm_pipeline(model: str, *, device: torch.device, dtype: torch.dtype) -> Any:
    """A diffusers pipeline from a hub id or local folder (``DiffusionPipeline.from_pretrained``)."""
    from diffusers import DiffusionPipeline

    from .weights import offline

    logger.info("loading the LDM pipeline %s (%s) on %s", model, dtype, device)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=offline())
    return pipe.to(device)
