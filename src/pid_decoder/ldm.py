"""Latent diffusion models (diffusers pipelines) as the reference runs them: hub id, steps, guidance and the steps
whose x_t `PiDPipeline.generate` captures (pipelines.md §2.1); loading one, and running one while capturing x_t.

    run = plan_ldm_run("flux", steps=28)                   # defaults of the tag, capture the recommended step 24
    entries = run_ldm(pipe, "a red fox", run, height=512, width=512, generator=torch.Generator().manual_seed(0))
    # [("step_24", (1, 16, 64, 64) latent, σ), ("x0", (1, 16, 64, 64) latent, 0.0)], in PiD's frame
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbones import capture_sigma, latents_from_pipeline
from .backbones.packing import KIND_BACKBONE, pipeline_kind
from .registry import resolve_backbone_name
from .weights import offline

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

    logger.info("loading the LDM pipeline %s (%s) on %s", model, dtype, device)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=offline())
    return pipe.to(device)


def check_pipeline_backbone(pipe: Any, backbone: str | None) -> str:
    """The latent kind of a diffusers pipeline (`pipeline_kind`); a ValueError when its latents are not those of
    ``backbone``, the latent space a PiD network decodes (None: any)."""
    kind = pipeline_kind(pipe)
    needed = resolve_backbone_name(KIND_BACKBONE[kind])
    if backbone is not None and needed != backbone:
        raise ValueError(
            f"the {type(pipe).__name__} produces {needed} latents, but this PiD checkpoint decodes "
            f"{backbone} latents; load a {needed} preset"
        )
    return kind


def ldm_noise_device(pipe: Any, noise_device: torch.device | None) -> torch.device:
    """Where the LDM's generator lives: ``noise_device``, or for "auto" (None) the pipeline's execution device
    when that is CUDA (as the reference draws it), else the CPU."""
    if noise_device is not None:
        return noise_device
    device = getattr(pipe, "_execution_device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else torch.device("cpu")


def ldm_size(resolution: int | tuple[int, int] | None, scale: int) -> tuple[int, int]:
    """The (W, H) an LDM runs at so that PiD at ``scale`` gives the FINAL ``resolution`` (N or (W, H), default
    2048); a ValueError unless both sides come out whole and multiples of 16."""
    if resolution is None:
        resolution = 2048
    out_w, out_h = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if out_w % scale or out_h % scale:
        raise ValueError(f"resolution {out_w}x{out_h} (WxH) must be divisible by the PiD scale {scale}")
    width, height = out_w // scale, out_h // scale
    if width % 16 or height % 16:
        raise ValueError(
            f"the LDM runs at resolution / {scale} = {width}x{height}, which must be a multiple of 16; "
            f"choose a resolution that is a multiple of {16 * scale}"
        )
    return width, height


@dataclass(frozen=True)
class LDMRun:
    """How one LDM run goes: steps, guidance, the 1-based steps after which x_t is captured, pipeline kwargs."""

    steps: int
    guidance: float
    capture: tuple[int, ...]
    kwargs: dict[str, Any]


def plan_ldm_run(
    tag: str,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    capture_steps: Sequence[int] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> LDMRun:
    """The run of LDM ``tag`` with its defaults for what is None; ``capture_steps`` checked against the steps."""
    defaults = ldm_defaults(tag)
    n_steps = defaults.steps if steps is None else int(steps)
    if capture_steps is None:  # the recommended step exists only with the recommended number of steps
        capture = [k for k in defaults.capture if k <= n_steps]
    else:
        capture = sorted({int(k) for k in capture_steps})
    bad = [k for k in capture if not 1 <= k <= n_steps]
    if bad:
        raise ValueError(f"capture steps must be in 1..{n_steps} (the LDM steps), got {bad}")
    guidance = defaults.guidance if guidance is None else float(guidance)
    return LDMRun(n_steps, guidance, tuple(capture), {**defaults.extra, **(kwargs or {})})


def run_ldm(
    pipe: Any,
    prompt: str,
    run: LDMRun,
    *,
    height: int,
    width: int,
    generator: torch.Generator,
    callback: Callable[[int, int], None] | None = None,
) -> list[tuple[str, torch.Tensor, float]]:
    """Run a diffusers pipeline to its latent output at ``height x width``, capturing x_t after ``run.capture``.

    Returns ``(label, latent, sigma)``: "step_K" for each captured step in ascending order, then "x0" (σ 0); each
    latent (1, C, h, w) float32 on the CPU and σ in PiD's frame (`latents_from_pipeline`). ``callback(done, total)``
    after each LDM step.
    """
    captured: dict[int, tuple[torch.Tensor, float]] = {}

    def on_step_end(pipe, i, t, kwargs):
        if i + 1 in run.capture:
            latent, sigma = latents_from_pipeline(
                pipe, kwargs["latents"], height=height, width=width, sigma=capture_sigma(pipe.scheduler, i)
            )
            captured[i + 1] = (latent.detach().float().cpu(), sigma)
        if callback is not None:
            callback(i + 1, run.steps)
        return kwargs

    logger.info("running %s: %dx%d, %d steps, guidance %s, capture %s", type(pipe).__name__, width, height,
                run.steps, run.guidance, list(run.capture) or "x0 only")
    with torch.inference_mode():
        out = pipe(
            prompt=prompt, height=height, width=width, num_inference_steps=run.steps, guidance_scale=run.guidance,
            num_images_per_prompt=1, output_type="latent", generator=generator, callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"], **run.kwargs,
        )
        final, _ = latents_from_pipeline(pipe, out.images, height=height, width=width)
    return [(f"step_{k}", *captured[k]) for k in run.capture] + [("x0", final.detach().float().cpu(), 0.0)]
