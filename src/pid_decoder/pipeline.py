"""PiDPipeline: validate -> text -> latent -> sample -> image.

    pipe = PiDPipeline.from_pretrained("flux-4k")                     # weights from $PID_WEIGHTS_DIR or the hub
    images = pipe.decode(latents, prompt="a red fox in the snow")    # (B, 16, h, w) -> B PIL images, 32x larger
    images = pipe.upscale(Image.open("photo.jpg"))                   # VAE encode -> PiD at 4x
    results = pipe.generate("a red fox", ldm_pipeline=flux_pipe)     # LDM -> captured latents -> PiD

Three entry points, as in the reference (pipelines.md):
- `decode`: a normalised latent (plus its noise level σ) -> PiD image at ``latent size x down x scale``;
- `upscale` (the reference's ``from_clean``): centre-crop to the backbone's multiple, encode, optionally
  noise at σ with a generator seeded ``seed + index``, decode with PiD seeded ``seed + index``;
- `generate` (``from_ldm``): run a diffusers pipeline, capture x_t after chosen steps and the final latent,
  and decode each with its σ, PiD seeded ``seed``.
`decode_pipeline_latents` is the drop-in for ``vae.decode``: it takes what any supported diffusers pipeline
returns with ``output_type="latent"``.

Randomness: every draw (LDM noise, latent noise, PiD noise) comes from a ``torch.Generator`` seeded as stated,
on the ``noise_device``: by default ("auto") a CUDA generator when the network runs on CUDA, as the reference
does (so a seed gives the reference's image there, and no noise crosses the bus), else a CPU generator.
``noise_device="cpu"`` gives the same image for a seed on every device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import sampling, weights
from .accel import enable_sequential_offload
from .backbones import check_latent, image_to_tensor, latents_from_pipeline, make_backbone, tensor_to_image
from .backbones.images import plan_upscale, resize_cover, upscale_inputs
from .backbones.packing import KIND_BACKBONE
from .checkpoints import checkpoint_or_preset, load_network
from .config import NetConfig, SamplerConfig
from .devices import check_seed, resolve_device, resolve_dtype, resolve_noise_device
from .ldm import (
    KIND_TAG,
    check_pipeline_backbone,
    ldm_defaults,
    ldm_noise_device,
    ldm_size,
    load_ldm_pipeline,
    plan_ldm_run,
    run_ldm,
)
from .memory import PiDOutOfMemoryError, check_output_memory, retry_with_half_chunk
from .model.memory import choose_chunk, parse_memory
from .presets import Preset, resolve_preset
from .registry import DEFAULT_TEXT_ENCODER, resolve_backbone_name
from .text import TextEncoder, load_text_embedding
from .tiling import _as_pair, plan_tiles, sample_tiled

__all__ = ["Decoded", "PiDOutOfMemoryError", "PiDPipeline"]  # the error is raised from here (memory.py holds it)
logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- results
@dataclass
class Decoded:
    """One decoded latent of `PiDPipeline.generate`."""

    label: str  # "step_24" or "x0"
    sigma: float  # the latent's noise level in PiD's frame
    latent: torch.Tensor  # (1, C, h, w) float32, CPU
    image: Any  # PIL image, PiD output
    baseline: Any = None  # PIL image, native VAE decode (return_baseline=True)


def _bf16_round(latent: torch.Tensor) -> torch.Tensor:
    # parity: the reference hands PiD (and the baseline decoder) the latent cast to bf16.
    return latent.to(torch.bfloat16).float()


class PiDPipeline:
    """PiD network + the backbone of its latent space + a (lazy) Gemma text encoder.

    Args:
        net: a loaded `PiDNet` (`load_network`).
        preset: the released preset it came from (sampler, backbone, scale); None for a self-trained net.
        backbone: a backbone object (`load_backbone`), needed by `upscale` and for baselines; may be None.
        text_encoder: a `TextEncoder`, a Gemma folder / hub id, or None for the default. Gemma is loaded only
            when a prompt must be encoded (never when a text embedding is given or the prompt is cached).
        sampler: overrides the preset's sampler (default: the preset's, else the 4-step student).
        backbone_name: the latent space when there is no preset (e.g. "flux").
        negative_embedding: (T, D) embedding of the negative prompt for the teacher presets (default: Gemma).
        noise_device: where seeded generators live: "auto" (CUDA when the net is on CUDA, as the reference;
            else cpu), "cpu" (the same image for a seed on every device) or a CUDA device.
        max_memory: memory budget of the pixel pathway ("6GB", bytes; None = from the free device memory). Exact
            for any budget (docs/performance.md).
        tile, tile_overlap: approximate tiled decode (`pid_decoder.tiling`) for outputs larger than ``tile``
            pixels (int or (h, w), multiples of 16) with ``tile_overlap`` pixels of overlap; outputs that fit in
            one tile use the exact path. Off (None) by default; distilled (student) presets only.
    """

    def __init__(
        self,
        net,
        preset: Preset | str | None = None,
        backbone: Any = None,
        text_encoder: Any = None,
        *,
        sampler: SamplerConfig | None = None,
        backbone_name: str | None = None,
        negative_embedding: torch.Tensor | None = None,
        noise_device: str | torch.device = "auto",
        max_memory: int | str | None = None,
        tile: int | tuple[int, int] | None = None,
        tile_overlap: int = 128,
    ):
        self.net = net
        self.max_memory = None if max_memory is None else parse_memory(max_memory)
        self.tile, self.tile_overlap = tile, int(tile_overlap)
        if tile is not None:  # check the tile and overlap now, on a plan for an image of 2 x 2 tiles
            th, tw = _as_pair(tile, "tile")
            plan_tiles(2 * th, 2 * tw, tile, self.tile_overlap, multiple=net.config.patch_size)
        self.noise_device = resolve_noise_device(noise_device, net.device)
        self._noise_auto = str(noise_device) == "auto"
        self.preset = resolve_preset(preset) if preset is not None else getattr(net, "preset", None)
        self.sampler = sampler or (self.preset.sampler if self.preset is not None else SamplerConfig())
        name = backbone_name or (self.preset.backbone if self.preset is not None else None)
        if name is None and backbone is not None:
            name = getattr(backbone, "name", None)
        self.backbone_name = resolve_backbone_name(name) if name is not None else None
        self.backbone = backbone
        self._text_encoder = text_encoder
        self.negative_embedding = negative_embedding
        self.text_encoder_offline: bool | None = None  # True: Gemma only from local files (None: HF_HUB_OFFLINE)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        preset_or_path: str | os.PathLike | Preset | None = None,
        *,
        weights_dir: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        text_encoder: Any = None,
        backbone: Any = None,
        preset: str | Preset | None = None,
        config: NetConfig | dict | None = None,
        backbone_name: str | None = None,
        allow_download: bool | None = None,
        noise_device: str | torch.device = "auto",
        offload: bool = False,
        **options: Any,
    ) -> PiDPipeline:
        """Load a preset (alias or released folder name) or a checkpoint file, and its backbone.

        Args:
            preset_or_path: "flux-4k", "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", or the path of a
                checkpoint (.pth / .safetensors); for a path, ``preset=`` or ``config=`` say what it holds
                (our .safetensors carry it in their metadata).
            weights_dir: the local mirror of the release (default $PID_WEIGHTS_DIR, else the HF cache); missing
                files are downloaded unless HF_HUB_OFFLINE=1 (`pid_decoder.weights`).
            device: "auto" (cuda, else mps, else cpu), "cpu", "cuda", "cuda:1", "mps".
            dtype: "auto" (bf16 on cuda, fp32 elsewhere), "bf16", "fp32".
            text_encoder: a `TextEncoder`, a Gemma folder / hub id, or None (the default Gemma, loaded lazily).
            backbone: None (the preset's VAE/RAE weights from the weights folder), a backbone object, a diffusers
                module (e.g. ``pipe.vae``), a weight path, or False to load none (decode without baselines).
            config: network config for a self-trained checkpoint (NetConfig or the reference's net arguments).
            backbone_name: the latent space of a checkpoint without preset (e.g. "flux").
            allow_download: default "not HF_HUB_OFFLINE".
            noise_device: where the seeded generators live (see the class).
            offload: keep the transformer blocks' weights in (pinned) CPU memory and run them on ``device`` one
                at a time (`pid_decoder.accel.enable_sequential_offload`): for GPUs smaller than the weights.
            options: ``max_memory``, ``tile``, ``tile_overlap`` (see the class).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        path, preset = checkpoint_or_preset(preset_or_path, preset)

        specs = [] if path is not None else [weights.checkpoint_spec(preset)]
        name = backbone_name or (preset.backbone if preset is not None else None)
        if backbone is None and name is not None:
            specs.append(weights.backbone_spec(name))
        resolved = weights.resolve(specs, weights_dir, allow_download=allow_download) if specs else []
        checkpoint = path if path is not None else resolved.pop(0)
        backbone_path = resolved.pop(0) if resolved else None

        net = load_network(checkpoint, config, preset=preset, dtype=dt, device="cpu" if offload else dev)
        if offload:
            enable_sequential_offload(net, dev)
        preset = preset or net.preset
        name = name or (preset.backbone if preset is not None else None)
        if backbone is None and name is not None and backbone_path is None:  # preset known only from the file
            backbone_path = weights.resolve([weights.backbone_spec(name)], weights_dir, allow_download=allow_download)[0]
        bb = make_backbone(name, backbone if backbone is not None else backbone_path, dev, dt)
        pipe = cls(net, preset, bb, text_encoder, backbone_name=name, noise_device=noise_device, **options)
        if allow_download is False:
            pipe.text_encoder_offline = True
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.net.device

    def generator(self, seed: int, device: torch.device | None = None) -> torch.Generator:
        """A generator seeded ``seed`` on the noise device (or on ``device`` where a caller needs one there)."""
        return torch.Generator(device=device or self.noise_device).manual_seed(check_seed(seed))

    @property
    def scale(self) -> int | None:
        return self.net.config.lq.sr_scale if self.net.config.lq is not None else None

    @property
    def text_encoder(self):
        """The `TextEncoder` (created on first use; Gemma itself loads on the first uncached prompt)."""
        if not isinstance(self._text_encoder, TextEncoder):
            model = self._text_encoder if self._text_encoder is not None else DEFAULT_TEXT_ENCODER
            self._text_encoder = TextEncoder(model, device=self.device, local_files_only=self.text_encoder_offline)
        return self._text_encoder

    def _require_backbone(self, what: str):
        if self.backbone is None:
            raise ValueError(
                f"{what} needs the backbone (VAE/RAE) of the latent space "
                f"{self.backbone_name or '(unknown)'}; load the pipeline with backbone= (a path, a diffusers "
                "module such as pipe.vae, or a backbone object) or from a preset with its weights"
            )
        return self.backbone

    def _require_lq(self) -> None:
        if self.net.config.lq is None:
            raise ValueError(
                "this checkpoint is the text-to-image PixelDiT (no latent input); decode/upscale/generate need a "
                "PiD preset such as flux-4k"
            )

    # ------------------------------------------------------------------ text
    def encode_text(
        self, prompt: str | Sequence[str] = "", text_embedding: Any = None, batch: int = 1
    ) -> torch.Tensor:
        """(batch, T, D) float32 CPU text embedding from an embedding (tensor or file) or prompt(s)."""
        if text_embedding is not None:
            emb = text_embedding
            if isinstance(emb, (str, os.PathLike)):
                emb, _ = load_text_embedding(emb)
            if not torch.is_tensor(emb):
                raise ValueError("text_embedding must be a (T, D), (1, T, D) or (B, T, D) tensor or an embedding file")
            return sampling.broadcast_text(emb.float().cpu(), batch, "text_embedding")
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} items; give one prompt or one per item")
        return self.text_encoder.encode(prompts)  # (B, T, D)

    def _negative(self, batch: int) -> torch.Tensor:
        if self.negative_embedding is not None:
            return self.encode_text(text_embedding=self.negative_embedding, batch=batch)
        return self.text_encoder.encode_negative(batch)

    # ------------------------------------------------------------------ sampling
    def check_steps(self, steps: int | None) -> int:
        """The number of sampler steps to run: ``steps`` checked against this sampler, or the preset's."""
        if steps is None:
            return self.sampler.steps
        return sampling.check_steps(steps, self.max_steps)

    @property
    def max_steps(self) -> int | None:
        """The most steps the sampler can take: the distilled student's schedule length; None for the teacher."""
        return len(sampling.STUDENT_T_LIST) - 1 if self.sampler.kind == "student" else None

    def check_memory(self, height: int, width: int) -> None:
        """Refuse (`PiDOutOfMemoryError`) an output whose unavoidable tensors cannot fit in the device's memory."""
        check_output_memory(height, width, self.device)

    def _auto_chunk(self, height: int, width: int) -> int:
        """The pixel-pathway chunk (patch tokens) `sample` chooses by itself for this output (or its tile)."""
        ps = self.net.config.patch_size
        if self._tiled(height, width):
            th, tw = (self.tile, self.tile) if isinstance(self.tile, int) else self.tile
            height, width = min(th, height), min(tw, width)
        tokens = (height // ps) * (width // ps)
        factor = 2 if self.sampler.kind == "teacher" and self.sampler.cfg_scale != 1.0 else 1
        chunk = choose_chunk(self.net.config, factor * tokens, self.device, self.net.dtype, self.max_memory)
        return factor * tokens if chunk is None else chunk

    def _sample(
        self,
        latent: torch.Tensor,
        text: torch.Tensor,
        sigma: float,
        seed: int,
        steps: int | None,
        callback: StepCallback | None,
        chunk: int | None,
    ) -> torch.Tensor:
        """One item: (1, C, h, w) latent -> (1, 3, H, W) in [-1, 1]; noise from a generator seeded ``seed``.

        An out-of-memory error retries once with half the pixel-pathway chunk (`memory.retry_with_half_chunk`).
        """
        height, width = self.net.output_size(tuple(latent.shape[-2:]))
        steps = self.check_steps(steps)
        return retry_with_half_chunk(
            lambda c: self._sample_once(latent, text, sigma, seed, steps, callback, c, height, width),
            chunk, lambda: self._auto_chunk(height, width), height=height, width=width, device=self.device,
        )

    def _sample_once(self, latent, text, sigma, seed, steps, callback, chunk, height, width) -> torch.Tensor:
        generator = self.generator(seed)
        cfg = self.sampler
        common = {"height": height, "width": width, "steps": steps, "generator": generator, "chunk": chunk,
                  "max_memory": self.max_memory, "callback": callback}
        if cfg.kind == "student":
            if self._tiled(height, width):
                logger.info("approximate tiled decode of %dx%d in %s tiles", width, height, self.tile)
                return sample_tiled(self.net, latent, text, float(sigma), mode=cfg.mode, tile=self.tile,
                                    overlap=self.tile_overlap, **common)
            return sampling.sample(self.net, latent, text, float(sigma), mode=cfg.mode, **common)
        if self._tiled(height, width):
            raise ValueError("the tiled decode is for the distilled presets; this preset uses the teacher sampler")
        negative = self._negative(latent.shape[0]) if cfg.cfg_scale != 1.0 else None
        return sampling.sample_teacher(
            self.net, latent, text, float(sigma), negative_text=negative, cfg_scale=cfg.cfg_scale,
            base_shift=cfg.base_shift, base_size=cfg.base_size, **common,
        )

    def _tiled(self, height: int, width: int) -> bool:
        """Whether an output of this size takes the tiled path (only when it does not fit in one tile)."""
        if self.tile is None:
            return False
        th, tw = (self.tile, self.tile) if isinstance(self.tile, int) else self.tile
        return height > th or width > tw

    def _check_latent(self, latents: Any) -> torch.Tensor:
        if not torch.is_tensor(latents):
            raise ValueError(f"latents must be a torch.Tensor (B, C, h, w), got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents[None]
        if latents.ndim == 4 and latents.shape[0] == 0:
            raise ValueError(f"latents hold an empty batch (shape {tuple(latents.shape)}); give at least one latent")
        if latents.ndim == 4 and latents.numel() == 0:
            raise ValueError(f"latents have an empty grid (shape {tuple(latents.shape)}); h and w must be >= 1")
        if self.backbone is not None:
            self.backbone.check_latent(latents)
        elif self.backbone_name is not None:
            check_latent(self.backbone_name, latents)
        lq = self.net.config.lq
        if latents.ndim != 4 or latents.shape[1] != lq.latent_channels:
            raise ValueError(
                f"this PiD network expects latents (B, {lq.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain NaN or infinite values")
        return latents.detach().float().cpu()

    @staticmethod
    def _sigmas(sigma: float | Sequence[float], batch: int) -> list[float]:
        sigmas = [float(sigma)] * batch if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
        if len(sigmas) != batch:
            raise ValueError(f"got {len(sigmas)} sigmas for {batch} latents")
        bad = [s for s in sigmas if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"sigma must be in [0, 1] (0 = clean latent), got {bad}")
        return sigmas

    # ------------------------------------------------------------------ entry points
    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        prompt: str | Sequence[str] = "",
        *,
        text_embedding: Any = None,
        sigma: float | Sequence[float] = 0.0,
        seed: int = 0,
        steps: int | None = None,
        return_baseline: bool = False,
        callback: StepCallback | None = None,
        chunk: int | None = None,
    ):
        """Decode normalised latents (B, C, h, w) or (C, h, w) with PiD -> list of B PIL images.

        Item i uses a generator seeded ``seed + i`` on the noise device (item 0 equals ``sample(...,
        generator=torch.Generator(pipe.noise_device).manual_seed(seed))``). ``sigma`` is the latent's noise level in PiD's frame (0 for a
        final LDM latent). With ``return_baseline`` returns ``(images, baselines)``, the baselines being the
        backbone's own decode at native size.
        """
        self._require_lq()
        latents = self._check_latent(latents)
        batch = latents.shape[0]
        sigmas = self._sigmas(sigma, batch)
        check_seed(seed, batch)
        self.check_steps(steps)
        backbone = self._require_backbone("return_baseline=True") if return_baseline else None
        self.check_memory(*self.net.output_size(tuple(latents.shape[-2:])))
        text = self.encode_text(prompt, text_embedding, batch)
        images, baselines = [], []
        for i in range(batch):
            latent = _bf16_round(latents[i : i + 1])
            out = self._sample(latent, text[i : i + 1], sigmas[i], seed + i, steps, callback, chunk)
            images.append(tensor_to_image(out))
            if backbone is not None:
                baselines.append(tensor_to_image(backbone.decode(latent)))
        return (images, baselines) if return_baseline else images

    @torch.inference_mode()
    def upscale(
        self,
        images: Any,
        prompt: str | Sequence[str] = "",
        *,
        text_embedding: Any = None,
        sigma: float = 0.0,
        seed: int = 5,
        steps: int | None = None,
        return_baseline: bool = False,
        index_offset: int = 0,
        callback: StepCallback | None = None,
        chunk: int | None = None,
        scale: int | None = None,
        size: tuple[int, int] | None = None,
        long_edge: int | None = None,
    ):
        """Images -> VAE encode -> (noise at σ) -> PiD at the preset's scale (the reference's ``from_clean``).

        ``images``: a PIL image or a list of them. Each is centre-cropped to the backbone's multiple (16), encoded
        to its normalised latent, noised at ``sigma`` with a generator seeded ``seed + index`` (on the noise device) (no draw at
        σ = 0), and decoded with PiD seeded ``seed + index``, index = ``index_offset + i``. Default seed 5 as the
        reference. Returns PIL images (and the baselines: the backbone's decode of the same latent).

        Output size (at most one; default input x the preset's scale): ``scale`` (1 .. the preset's scale; 2 on a
        4x preset resizes the input to half its size and runs the 4x decoder), ``size`` (W, H) or ``long_edge``
        (aspect kept). The input is resized (Lanczos, covering, centre-cropped) to output / preset scale; an output
        that is not a multiple of 16 x the preset's scale is snapped to the nearest one, with a logged warning
        (`backbones.images.plan_upscale_size`).
        """
        self._require_lq()
        backbone = self._require_backbone("upscale")
        images = upscale_inputs(images)
        if not 0.0 <= float(sigma) <= 1.0:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        check_seed(seed, index_offset + len(images))
        self.check_steps(steps)
        plans = []
        for image in images:
            resize, (out_w, out_h) = plan_upscale(image, preset_scale=self.scale, multiple=backbone.image_multiple,
                                                  scale=scale, size=size, long_edge=long_edge)
            self.check_memory(out_h, out_w)
            plans.append(resize)
        text = self.encode_text(prompt, text_embedding, len(images))
        outs, baselines = [], []
        for i, image in enumerate(images):
            index = index_offset + i
            if plans[i] is not None:
                image = resize_cover(image, plans[i])
            x = image_to_tensor(image, backbone.image_multiple)  # (1, 3, H, W)
            clean = backbone.encode(x)  # (1, C, h, w)
            noisy = backbone.add_noise(clean.float(), float(sigma), self.generator(seed + index))
            latent = _bf16_round(noisy).cpu()
            out = self._sample(latent, text[i : i + 1], float(sigma), seed + index, steps, callback, chunk)
            outs.append(tensor_to_image(out))
            if return_baseline:
                baselines.append(tensor_to_image(backbone.decode(latent)))
        return (outs, baselines) if return_baseline else outs

    @torch.inference_mode()
    def decode_pipeline_latents(
        self,
        ldm_pipeline: Any,
        latents: torch.Tensor,
        *,
        height: int,
        width: int,
        sigma: float = 0.0,
        prompt: str | Sequence[str] = "",
        text_embedding: Any = None,
        seed: int = 0,
        steps: int | None = None,
        return_baseline: bool = False,
        callback: StepCallback | None = None,
    ):
        """Drop-in for ``pipe.vae.decode``: decode what a diffusers pipeline returned with ``output_type="latent"``.

        ``height``/``width`` are the LDM image size passed to the pipeline; ``sigma`` is the scheduler σ for a
        latent captured mid-run (``capture_sigma(pipe.scheduler, i)``), 0 for the final output. Packed / raw
        layouts (Flux, Qwen-Image, FLUX.2, klein, SDXL's Euler frame) are converted by `latents_from_pipeline`.
        """
        latent, pid_sigma = latents_from_pipeline(ldm_pipeline, latents, height=height, width=width, sigma=sigma)
        check_pipeline_backbone(ldm_pipeline, self.backbone_name)
        if return_baseline and self.backbone is None and getattr(ldm_pipeline, "vae", None) is not None:
            self.backbone = make_backbone(self.backbone_name, ldm_pipeline.vae)
        return self.decode(
            latent, prompt, text_embedding=text_embedding, sigma=pid_sigma, seed=seed, steps=steps,
            return_baseline=return_baseline, callback=callback,
        )

    def generate(
        self,
        prompt: str,
        *,
        ldm_pipeline: Any = None,
        backbone: str | None = None,
        resolution: int | tuple[int, int] | None = None,
        ldm_steps: int | None = None,
        guidance_scale: float | None = None,
        capture_steps: Sequence[int] | None = None,
        seed: int = 0,
        ldm_seed: int | None = None,
        steps: int | None = None,
        text_embedding: Any = None,
        pid_prompt: str | None = None,
        return_baseline: bool = False,
        ldm_kwargs: dict | None = None,
        callback: StepCallback | None = None,
        ldm_callback: StepCallback | None = None,
    ) -> list[Decoded]:
        """Run an LDM, capture latents, decode each with PiD (the reference's ``from_ldm``).

        Args:
            prompt: the LDM prompt (also PiD's caption unless ``pid_prompt`` / ``text_embedding`` is given).
            ldm_pipeline: an already built diffusers pipeline; None loads ``LDM_DEFAULTS[backbone].model``.
            backbone: LDM tag for defaults (flux, sd3, sdxl, flux2, flux2-klein-4b/-9b, qwenimage(-2512),
                zimage(-turbo)); default from the pipeline class or the preset.
            resolution: FINAL output size, N or (W, H), default 2048x2048; the LDM runs at resolution / scale.
            ldm_steps, guidance_scale: default per backbone (pipelines.md §2.1).
            capture_steps: 1-based steps K after which x_t is captured (σ = scheduler.sigmas[K]); default the
                recommended step (e.g. 24 of 28 for flux, none for klein / Z-Image-Turbo). x0 is always decoded.
            seed: PiD's noise (a generator seeded ``seed`` for every latent) and, unless ``ldm_seed`` is given,
                the LDM's (the reference's CLI uses ``ldm_seed = seed + prompt index``). The LDM's generator
                lives on the LDM pipeline's device when the noise device is "auto" and that device is CUDA.
            callback: ``callback(done, total)`` after each PiD step; ``ldm_callback`` the same after each LDM step.
        Returns:
            `Decoded` entries: captured steps in ascending order, then "x0".
        """
        self._require_lq()
        width, height = ldm_size(resolution, self.scale)
        if ldm_pipeline is None:
            tag = (backbone or self.backbone_name or "flux").lower()
            ldm_pipeline = load_ldm_pipeline(ldm_defaults(tag).model, device=self.device, dtype=self.net.dtype)
        kind = check_pipeline_backbone(ldm_pipeline, self.backbone_name)
        run = plan_ldm_run(backbone or KIND_TAG.get(kind, kind), steps=ldm_steps, guidance=guidance_scale,
                           capture_steps=capture_steps, kwargs=ldm_kwargs)
        ldm_device = ldm_noise_device(ldm_pipeline, None if self._noise_auto else self.noise_device)
        generator = self.generator(seed if ldm_seed is None else ldm_seed, ldm_device)
        entries = run_ldm(ldm_pipeline, prompt, run, height=height, width=width, generator=generator,
                          callback=ldm_callback)
        baseline_backbone = make_backbone(KIND_BACKBONE[kind], ldm_pipeline.vae) if return_baseline else None
        text = self.encode_text(pid_prompt if pid_prompt is not None else prompt, text_embedding, 1)
        results = []
        with torch.inference_mode():
            for label, latent, sigma in entries:
                latent = _bf16_round(self._check_latent(latent[:1]))
                # parity: every captured latent is decoded with the same PiD seed (not seed + prompt index).
                image = tensor_to_image(self._sample(latent, text, sigma, seed, steps, callback, None))
                baseline = tensor_to_image(baseline_backbone.decode(latent)) if baseline_backbone else None
                results.append(Decoded(label, float(sigma), latent, image, baseline))
        return results

