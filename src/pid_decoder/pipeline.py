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
from pathlib import Path
from typing import Any

import torch

from .config import NetConfig, SamplerConfig
from .devices import check_seed, resolve_device, resolve_dtype, resolve_noise_device
from .ldm import KIND_TAG, ldm_defaults, load_ldm_pipeline
from .memory import PiDOutOfMemoryError, available_memory, gib, is_oom, minimum_memory
from .presets import Preset, resolve_preset
from .sampling import broadcast_text

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
        from .model.memory import parse_memory

        self.net = net
        self.max_memory = None if max_memory is None else parse_memory(max_memory)
        self.tile, self.tile_overlap = tile, int(tile_overlap)
        if tile is not None:  # check the tile and overlap now, on a plan for an image of 2 x 2 tiles
            from .tiling import _as_pair, plan_tiles

            th, tw = _as_pair(tile, "tile")
            plan_tiles(2 * th, 2 * tw, tile, self.tile_overlap, multiple=net.config.patch_size)
        self.noise_device = resolve_noise_device(noise_device, net.device)
        self._noise_auto = str(noise_device) == "auto"
        self.preset = resolve_preset(preset) if preset is not None else getattr(net, "preset", None)
        self.sampler = sampler or (self.preset.sampler if self.preset is not None else SamplerConfig())
        name = backbone_name or (self.preset.backbone if self.preset is not None else None)
        if name is None and backbone is not None:
            name = getattr(backbone, "name", None)
        if name is not None:
            from .backbones import resolve_backbone_name

            name = resolve_backbone_name(name)
        self.backbone_name = name
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
        from . import weights
        from .checkpoints import load_network

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        path: Path | None = None
        if isinstance(preset_or_path, Preset):
            preset = preset_or_path if preset is None else preset
        elif preset_or_path is not None:
            candidate = Path(os.fspath(preset_or_path))
            if candidate.suffix.lower() in (".pth", ".pt", ".safetensors", ".sft") or candidate.exists():
                path = candidate
            elif preset is None:
                preset = preset_or_path
        if path is None and preset is None:
            raise ValueError("give a preset (e.g. 'flux-4k') or a checkpoint path")
        preset = resolve_preset(preset) if preset is not None else None

        specs = [] if path is not None else [weights.checkpoint_spec(preset)]
        name = backbone_name or (preset.backbone if preset is not None else None)
        if backbone is None and name is not None:
            specs.append(weights.backbone_spec(name))
        resolved = weights.resolve(specs, weights_dir, allow_download=allow_download) if specs else []
        checkpoint = path if path is not None else resolved.pop(0)
        backbone_path = resolved.pop(0) if resolved else None

        net = load_network(checkpoint, config, preset=preset, dtype=dt, device="cpu" if offload else dev)
        if offload:
            from .accel import enable_sequential_offload

            enable_sequential_offload(net, dev)
        preset = preset or net.preset
        name = name or (preset.backbone if preset is not None else None)
        if backbone is None and name is not None and backbone_path is None:  # preset known only from the file
            backbone_path = weights.resolve([weights.backbone_spec(name)], weights_dir, allow_download=allow_download)[0]
        bb = _make_backbone(name, backbone if backbone is not None else backbone_path, dev, dt)
        pipe = cls(net, preset, bb, text_encoder, backbone_name=name, noise_device=noise_device, **options)
        if allow_download is False:
            pipe.text_encoder_offline = True
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.net.device

    def _ldm_noise_device(self, ldm_pipeline: Any) -> torch.device:
        if self._noise_auto:
            device = getattr(ldm_pipeline, "_execution_device", None)
            return device if isinstance(device, torch.device) and device.type == "cuda" else torch.device("cpu")
        return self.noise_device

    def generator(self, seed: int, device: torch.device | None = None) -> torch.Generator:
        """A generator seeded ``seed`` on the noise device (or on ``device`` where a caller needs one there)."""
        return torch.Generator(device=device or self.noise_device).manual_seed(check_seed(seed))

    @property
    def scale(self) -> int | None:
        return self.net.config.lq.sr_scale if self.net.config.lq is not None else None

    @property
    def text_encoder(self):
        """The `TextEncoder` (created on first use; Gemma itself loads on the first uncached prompt)."""
        from .text import DEFAULT_TEXT_ENCODER, TextEncoder

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
                from .text import load_text_embedding

                emb, _ = load_text_embedding(emb)
            if not torch.is_tensor(emb):
                raise ValueError("text_embedding must be a (T, D), (1, T, D) or (B, T, D) tensor or an embedding file")
            return broadcast_text(emb.float().cpu(), batch, "text_embedding")
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
        from .sampling import check_steps

        if steps is None:
            return self.sampler.steps
        return check_steps(steps, self.max_steps)

    @property
    def max_steps(self) -> int | None:
        """The most steps the sampler can take: the distilled student's schedule length; None for the teacher."""
        from .sampling import STUDENT_T_LIST

        return len(STUDENT_T_LIST) - 1 if self.sampler.kind == "student" else None

    def check_memory(self, height: int, width: int) -> None:
        """Refuse (`PiDOutOfMemoryError`) an output whose unavoidable tensors cannot fit in the device's memory."""
        available = available_memory(self.device)
        if available is None:
            return
        needed = minimum_memory(height, width)
        if needed > available:
            raise PiDOutOfMemoryError(
                f"an output of {width}x{height} needs at least {gib(needed)} on {self.device} for the image "
                f"tensors alone, but only {gib(available)} is available; decode a smaller output (upscale: "
                f"scale=, size=, long_edge=; decode: a smaller latent) or use a device with more memory "
                f"(max_memory= and tile= bound the network's activations, not these tensors)",
                height=height, width=width, device=self.device, needed=needed, available=available,
            )

    def _auto_chunk(self, height: int, width: int) -> int:
        """The pixel-pathway chunk (patch tokens) `sample` chooses by itself for this output (or its tile)."""
        from .model.memory import choose_chunk

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

        An out-of-memory error retries once with half the pixel-pathway chunk (same seed, same image).
        """
        height, width = self.net.output_size(tuple(latent.shape[-2:]))
        steps = self.check_steps(steps)
        try:
            return self._sample_once(latent, text, sigma, seed, steps, callback, chunk, height, width)
        except Exception as err:
            if not is_oom(err):
                raise
            first = err
        used = chunk if chunk is not None else self._auto_chunk(height, width)
        half = max(1, used // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("out of memory decoding %dx%d on %s with a pixel chunk of %d patch tokens (%s); retrying "
                       "once with half the chunk (%d)", width, height, self.device, used,
                       str(first).splitlines()[0] if str(first) else type(first).__name__, half)
        try:
            return self._sample_once(latent, text, sigma, seed, steps, callback, half, height, width)
        except Exception as err:
            if not is_oom(err):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise PiDOutOfMemoryError(
                f"out of memory decoding {width}x{height} on {self.device}, also with half the pixel chunk ({half} "
                "patch tokens); pass a smaller max_memory= budget, tile= for the approximate tiled decode, or decode "
                "a smaller output",
                height=height, width=width, device=self.device,
            ) from err

    def _sample_once(self, latent, text, sigma, seed, steps, callback, chunk, height, width) -> torch.Tensor:
        from .sampling import sample, sample_teacher

        generator = self.generator(seed)
        cfg = self.sampler
        common = {"height": height, "width": width, "steps": steps, "generator": generator, "chunk": chunk,
                  "max_memory": self.max_memory, "callback": callback}
        if cfg.kind == "student":
            if self._tiled(height, width):
                from .tiling import sample_tiled

                logger.info("approximate tiled decode of %dx%d in %s tiles", width, height, self.tile)
                return sample_tiled(self.net, latent, text, float(sigma), mode=cfg.mode, tile=self.tile,
                                    overlap=self.tile_overlap, **common)
            return sample(self.net, latent, text, float(sigma), mode=cfg.mode, **common)
        if self._tiled(height, width):
            raise ValueError("the tiled decode is for the distilled presets; this preset uses the teacher sampler")
        negative = self._negative(latent.shape[0]) if cfg.cfg_scale != 1.0 else None
        return sample_teacher(
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
            from .backbones import check_latent

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
        from .backbones import tensor_to_image

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
        (`plan_upscale_size`).
        """
        from PIL import Image

        from .backbones import image_to_tensor, tensor_to_image
        from .backbones.images import plan_upscale_size, resize_cover

        self._require_lq()
        backbone = self._require_backbone("upscale")
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if not all(isinstance(im, Image.Image) for im in images):
            raise ValueError("upscale takes a PIL image or a list of PIL images")
        if not images:
            raise ValueError("upscale got an empty list of images; give at least one")
        if not 0.0 <= float(sigma) <= 1.0:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        check_seed(seed, index_offset + len(images))
        self.check_steps(steps)
        plans = []
        for image in images:
            resize, out_size, message = plan_upscale_size(
                image.size, preset_scale=self.scale, multiple=backbone.image_multiple, scale=scale, size=size,
                long_edge=long_edge,
            )
            if out_size[0] <= 0 or out_size[1] <= 0:
                raise ValueError(
                    f"image of {image.size[0]}x{image.size[1]} (WxH) is smaller than the required multiple of "
                    f"{backbone.image_multiple} pixels"
                )
            if message:
                logger.warning("%s", message)
            self.check_memory(out_size[1], out_size[0])
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
        from .backbones import latents_from_pipeline

        latent, pid_sigma = latents_from_pipeline(ldm_pipeline, latents, height=height, width=width, sigma=sigma)
        self._check_pipeline_backbone(ldm_pipeline)
        if return_baseline and self.backbone is None and getattr(ldm_pipeline, "vae", None) is not None:
            self.backbone = _make_backbone(self.backbone_name, ldm_pipeline.vae, None, None)
        return self.decode(
            latent, prompt, text_embedding=text_embedding, sigma=pid_sigma, seed=seed, steps=steps,
            return_baseline=return_baseline, callback=callback,
        )

    def _check_pipeline_backbone(self, ldm_pipeline: Any) -> str:
        from .backbones import resolve_backbone_name
        from .backbones.packing import KIND_BACKBONE, pipeline_kind

        kind = pipeline_kind(ldm_pipeline)
        needed = resolve_backbone_name(KIND_BACKBONE[kind])
        if self.backbone_name is not None and needed != self.backbone_name:
            raise ValueError(
                f"the {type(ldm_pipeline).__name__} produces {needed} latents, but this PiD checkpoint decodes "
                f"{self.backbone_name} latents; load a {needed} preset"
            )
        return kind

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
        from .backbones import capture_sigma, latents_from_pipeline, tensor_to_image
        from .backbones.packing import KIND_BACKBONE

        self._require_lq()
        scale = self.scale
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
        if ldm_pipeline is None:
            tag = (backbone or self.backbone_name or "flux").lower()
            ldm_pipeline = load_ldm_pipeline(ldm_defaults(tag).model, device=self.device, dtype=self.net.dtype)
        kind = self._check_pipeline_backbone(ldm_pipeline)
        tag = (backbone or KIND_TAG.get(kind, kind)).lower()
        defaults = ldm_defaults(tag)
        n_steps = defaults.steps if ldm_steps is None else int(ldm_steps)
        guidance = defaults.guidance if guidance_scale is None else float(guidance_scale)
        if capture_steps is None:  # the recommended step exists only with the recommended number of steps
            capture = [k for k in defaults.capture if k <= n_steps]
        else:
            capture = sorted({int(k) for k in capture_steps})
        bad = [k for k in capture if not 1 <= k <= n_steps]
        if bad:
            raise ValueError(f"capture steps must be in 1..{n_steps} (the LDM steps), got {bad}")

        captured: dict[int, tuple[torch.Tensor, float]] = {}

        def on_step_end(pipe, i, t, kwargs):
            if i + 1 in capture:
                latent, sigma = latents_from_pipeline(
                    pipe, kwargs["latents"], height=height, width=width, sigma=capture_sigma(pipe.scheduler, i)
                )
                captured[i + 1] = (latent.detach().float().cpu(), sigma)
            if ldm_callback is not None:
                ldm_callback(i + 1, n_steps)
            return kwargs

        call = dict(defaults.extra)
        call.update(ldm_kwargs or {})
        logger.info("running %s: %dx%d, %d steps, guidance %s, capture %s", type(ldm_pipeline).__name__, width, height,
                    n_steps, guidance, capture or "x0 only")
        with torch.inference_mode():
            out = ldm_pipeline(
                prompt=prompt, height=height, width=width, num_inference_steps=n_steps, guidance_scale=guidance,
                num_images_per_prompt=1, output_type="latent",
                generator=self.generator(seed if ldm_seed is None else ldm_seed, self._ldm_noise_device(ldm_pipeline)),
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"], **call,
            )
            final, _ = latents_from_pipeline(ldm_pipeline, out.images, height=height, width=width)
        entries = [(f"step_{k}", *captured[k]) for k in capture] + [("x0", final.detach().float().cpu(), 0.0)]

        baseline_backbone = None
        if return_baseline:
            baseline_backbone = _make_backbone(KIND_BACKBONE[kind], ldm_pipeline.vae, None, None)
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


def _make_backbone(name: str | None, source: Any, device: torch.device | None, dtype: torch.dtype | None):
    """A backbone object from: None/False (none), a backbone object, a diffusers module, or a weight path."""
    if source is None or source is False:
        return None
    if hasattr(source, "encode") and hasattr(source, "add_noise") and hasattr(source, "check_latent"):
        return source  # already a backbone
    from .backbones import load_backbone

    if name is None:
        raise ValueError("a backbone path/module was given but the latent space is unknown; pass backbone_name=")
    if isinstance(source, (str, os.PathLike)):
        return load_backbone(name, source, device=device, dtype=dtype)
    return load_backbone(name, module=source, device=device, dtype=dtype)
