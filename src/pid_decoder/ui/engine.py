"""The work behind the web app, without gradio: the models on offer, one loaded pipeline at a time, input checks
that fail with one sentence, and the three jobs (upscale, decode, generate).

    engine = Engine(ServeOptions(preset="flux-4k", max_output_pixels=4096 * 4096))
    engine.prepare()                                    # fetch and load the first model before serving
    result = engine.upscale("flux-4k", "photo.jpg", size="2048", on_step=print)
    result.image.save("photo_pid.png")                  # result.before: the input resized to the same size

Every job runs on the engine's one device thread, holding the device lock from loading its model to its last step,
so jobs run one at a time whatever the web server does (and compute libraries keep one set of per-thread pools
and buffers however many server threads submit work). ``on_step(done, total)`` is called once when the job has
the device (``done = 0``) and after every sampler step; it may raise `Cancelled` to stop the job there. Requests
that cannot be served raise `InputError`, whose message is one sentence meant for the person at the page.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]

NATIVE = "native"  # upscale output size: the preset's scale x the input (centre-cropped to a multiple of 16)
IMAGE_MULTIPLE = 16  # the VAE backbones encode images whose sides are multiples of 16
INPUT_PIXEL_FACTOR = 4  # inputs may have up to this many times the output pixel limit (they are resized down)
EMBEDDING_SUFFIXES = (".safetensors",)


class InputError(ValueError):
    """A request the server refuses; the message is one sentence for the person at the page."""


class Cancelled(Exception):
    """Raised from a step callback to stop a job after the step it reports."""


@dataclass(frozen=True)
class ServeOptions:
    """How `pid-decoder serve` was started: the CLI's model options, the LDM for Generate, and the limits.

    ``backbone_path`` is used for the first model and every preset of the same latent space. ``fallback_preset``
    is loaded (downloaded where allowed) when neither ``preset`` nor ``checkpoint`` is given and no preset's
    weights are present yet.
    """

    preset: str | None = None
    checkpoint: str | None = None
    config: dict | None = None  # network arguments of ``checkpoint`` (the reference's, or NetConfig fields)
    backbone: str | None = None  # latent space of a ``checkpoint`` without preset
    weights_dir: str | None = None
    backbone_path: str | None = None
    text_encoder: str | None = None
    text_embedding: str | None = None  # used when a request gives neither a prompt nor an embedding file
    negative_embedding: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    noise_device: str = "auto"
    max_memory: str | None = None
    tile: int | None = None
    tile_overlap: int = 128
    offload: bool = False
    compile: bool = False
    attention: str = "auto"
    ldm: str | None = None  # LDM defaults for Generate (default: the model's latent space)
    ldm_model: str | None = None  # diffusers folder or hub id (default: the LDM's released model)
    max_upload_mb: float = 50.0
    max_output_pixels: int = 4096 * 4096
    fallback_preset: str = "flux-2k"


@dataclass(frozen=True)
class ModelEntry:
    """One choice of the model menu: a preset whose weights are present, or the ``--checkpoint`` file."""

    key: str  # preset alias, or CHECKPOINT_KEY
    label: str
    preset: Any = None  # Preset
    checkpoint: Path | None = None
    backbone: str | None = None  # canonical latent space name
    backbone_path: str | None = None


CHECKPOINT_KEY = "checkpoint"


@dataclass
class JobResult:
    """What a job made: the PiD image, the image to compare it with at the same size, and how it was made."""

    image: Any  # PIL image, PiD's output
    before: Any  # PIL image of the same size: the input resized (upscale) or the backbone's own decode
    name: str  # stem for output file names
    settings: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # label -> more PiD images (generate: captured steps)


# --------------------------------------------------------------------------- checks (no model needed)
def upscale_input_size(image_size: tuple[int, int], size: str | int | None, scale: int) -> tuple[int, int]:
    """(W, H) the image is encoded at: its centre crop to multiples of 16 (``native``), or for an output long
    side N (a multiple of 16 x scale) the resize whose long side is N / scale and whose short side keeps the
    aspect ratio, rounded to a multiple of 16."""
    w, h = image_size
    m = IMAGE_MULTIPLE
    if size is None or str(size).strip().lower() in ("", NATIVE):
        if w < m or h < m:
            raise InputError(f"The image is {w}x{h} pixels; PiD needs at least {m}x{m}.")
        return w // m * m, h // m * m
    try:
        long_side = int(str(size).strip())
    except ValueError:
        raise InputError(f"Output size must be 'native' or the long side in pixels, got {size!r}.") from None
    step = m * scale
    if long_side <= 0 or long_side % step:
        near = max(step, round(long_side / step) * step)
        raise InputError(
            f"An output long side of {long_side} px does not fit this {scale}x model: it must be a multiple of "
            f"{step} (inputs are multiples of {m} px), e.g. {near}."
        )
    in_long = long_side // scale
    in_short = max(m, round(min(w, h) * in_long / max(w, h) / m) * m)
    return (in_long, in_short) if w >= h else (in_short, in_long)


def parse_resolution(text: str | int) -> tuple[int, int]:
    """"N" or "W,H" (also "WxH") -> (W, H), as `pid-decoder generate --resolution`."""
    from ..io import parse_resolution as parse

    try:
        return parse(text)
    except ValueError as err:
        raise InputError(f"Resolution {err}.") from None


def _seed(seed: Any) -> int:
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"Seed must be a whole number, got {seed!r}.") from None
    if not 0 <= value < 2**63 or value != float(seed):
        raise InputError(f"Seed must be a whole number from 0 to 2^63 - 1, got {seed!r}.")
    return value


def _sigma(sigma: Any) -> float:
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"σ must be a number from 0 to 1, got {sigma!r}.") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InputError(f"σ must be from 0 (clean latent) to 1, got {value}.")
    return value


def _rgb(image):
    """8-bit RGB for display; transparency composited over white as the backbones' encoder does."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- engine
class Engine:
    """The models on offer, the one loaded pipeline, and the jobs.

    Args:
        options: how the server was started.
        ldm_pipeline: an already built diffusers pipeline for Generate (default: loaded on first use from
            ``options.ldm_model`` or the LDM's released model, when present in a folder or the HF cache).
    """

    def __init__(self, options: ServeOptions, *, ldm_pipeline: Any = None):
        from ..backbones import resolve_backbone_name
        from ..presets import resolve_preset

        self.options = options
        self._given_ldm = ldm_pipeline
        self._device_lock = threading.Lock()
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pid-device")
        self._closed = False
        self._pipe: tuple[str, Any] | None = None  # (key, PiDPipeline)
        self._ldm: tuple[str, Any] | None = None  # (model id, diffusers pipeline)
        self._configs: dict[str, Any] = {}  # key -> NetConfig of checkpoint entries, once loaded
        self._text_encoder = None
        first_preset = None
        if options.preset:
            first_preset = resolve_preset(options.preset)
        elif not options.checkpoint:
            first_preset = resolve_preset(options.fallback_preset)
        if first_preset is not None and first_preset.backbone is None:
            raise ValueError(f"preset {first_preset.alias} is the text-to-image PixelDiT (no latent input); "
                             "the web app needs a PiD preset such as flux-4k")
        if options.backbone:
            self._path_backbone = resolve_backbone_name(options.backbone)
        else:
            self._path_backbone = first_preset.backbone if first_preset is not None else None
        self._first_preset = first_preset
        self.models: dict[str, ModelEntry] = {}
        self.missing: list[str] = []
        self.rescan()

    # ------------------------------------------------------------------ models on offer
    def rescan(self) -> None:
        """List the presets whose checkpoint and backbone weights are present (no download is attempted)."""
        from .. import weights
        from ..presets import PRESETS

        opts = self.options
        models: dict[str, ModelEntry] = {}
        if opts.checkpoint:
            name = Path(opts.checkpoint).name
            models[CHECKPOINT_KEY] = ModelEntry(
                CHECKPOINT_KEY, f"{name} (--checkpoint)", preset=self._first_preset, checkpoint=Path(opts.checkpoint),
                backbone=self._path_backbone, backbone_path=opts.backbone_path,
            )
        missing = []
        for p in PRESETS.values():
            if p.backbone is None:  # PixelDiT takes no latent
                continue
            own_path = opts.backbone_path if opts.backbone_path and p.backbone == self._path_backbone else None
            specs = weights.preset_files(p, with_backbone=own_path is None)
            try:
                weights.resolve(specs, opts.weights_dir, allow_download=False)
            except FileNotFoundError:  # MissingWeightsError
                missing.append(p.alias)
                continue
            scale = f"{p.scale}x" if p.scale else ""
            models[p.alias] = ModelEntry(p.alias, f"{p.alias} ({p.backbone}, {scale}, {p.sampler.steps} steps)",
                                         preset=p, backbone=p.backbone, backbone_path=own_path)
        self.models, self.missing = models, missing

    @property
    def first(self) -> str:
        """The model selected when the page opens."""
        if self.options.checkpoint:
            return CHECKPOINT_KEY
        if self.options.preset:
            return self._first_preset.alias
        if self._first_preset.alias in self.models or not self.models:
            return self._first_preset.alias
        return next(iter(self.models))

    def prepare(self) -> None:
        """Fetch the first model's weights (downloading where allowed, as the CLI does) and load it.

        Raises `MissingWeightsError` (its message lists what to download) when they cannot be found.
        """
        from .. import weights
        from ..presets import resolve_preset

        key = self.first
        if key not in self.models:
            preset = resolve_preset(key)
            with_backbone = not (self.options.backbone_path and preset.backbone == self._path_backbone)
            weights.resolve(weights.preset_files(preset, with_backbone=with_backbone), self.options.weights_dir)
            self.rescan()
        self._on_device(self._load, key)

    def close(self) -> None:
        """Unload the models and stop the device thread (the engine takes no jobs afterwards)."""
        if self._closed:
            return
        self._on_device(self._unload_all)
        self._closed = True
        self._device_thread.shutdown(wait=True)

    def _unload_all(self) -> None:
        self._unload()
        if self._ldm is not None:
            self._drop_ldm()

    def _on_device(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the device thread, holding the device lock; the caller's context variables (the web
        server's progress tracker) go along."""
        context = contextvars.copy_context()

        def locked():
            with self._device_lock:
                return fn(*args)

        return self._device_thread.submit(context.run, locked).result()

    def missing_note(self) -> str:
        """One paragraph: which presets are not offered and how to get them."""
        from ..weights import ENV_VAR, default_weights_dir

        if not self.missing:
            return ""
        where = default_weights_dir(self.options.weights_dir) or f"the Hugging Face cache (${ENV_VAR} unset)"
        return (
            f"Not offered, their weights are not in {where}: {', '.join(self.missing)}. "
            "Start the server once with `--preset NAME` to download one (or `hf download nvidia/PiD "
            "checkpoints/<folder>/model_ema_bf16.pth --local-dir DIR` and `--weights-dir DIR`; "
            "`pid-decoder presets` lists the folders)."
        )

    def entry(self, key: str) -> ModelEntry:
        if key not in self.models:
            offered = ", ".join(self.models) or "none"
            raise InputError(f"Model {key!r} is not offered by this server (offered: {offered}).")
        return self.models[key]

    def net_config(self, key: str):
        """The network config of a model, without loading it where the preset says it."""
        entry = self.entry(key)
        if entry.checkpoint is None:
            return entry.preset.net
        if key not in self._configs:
            self._on_device(self._load, key)
        return self._configs[key]

    @property
    def loaded(self) -> str | None:
        """Key of the model in memory (None before the first job)."""
        return self._pipe[0] if self._pipe is not None else None

    # ------------------------------------------------------------------ loading
    def _text(self):
        from ..devices import resolve_device
        from ..text import DEFAULT_TEXT_ENCODER, TextEncoder

        if self._text_encoder is None:  # loads nothing until a prompt is not cached; shared by every model
            self._text_encoder = TextEncoder(self.options.text_encoder or DEFAULT_TEXT_ENCODER,
                                             device=resolve_device(self.options.device))
        return self._text_encoder

    def _load(self, key: str):
        """The pipeline of ``key``; call on the device thread. Unloads the previous model first."""
        if self._pipe is not None and self._pipe[0] == key:
            return self._pipe[1]
        entry = self.entry(key)
        self._unload()
        if self._ldm is not None and self._ldm[0] != self._ldm_source(entry)[1]:
            self._drop_ldm()
        from ..accel import compile_network
        from ..model.attention import set_attention_backend
        from ..pipeline import PiDPipeline

        opts = self.options
        logger.info("loading model %s", entry.label)
        set_attention_backend(opts.attention)
        pipe = PiDPipeline.from_pretrained(
            str(entry.checkpoint) if entry.checkpoint is not None else entry.preset,
            preset=entry.preset if entry.checkpoint is not None else None,
            config=opts.config if entry.checkpoint is not None else None,
            weights_dir=opts.weights_dir, device=opts.device, dtype=opts.dtype, text_encoder=self._text(),
            backbone=entry.backbone_path or None, backbone_name=entry.backbone if entry.checkpoint else None,
            noise_device=opts.noise_device, offload=opts.offload, max_memory=opts.max_memory, tile=opts.tile,
            tile_overlap=opts.tile_overlap,
        )
        if pipe.net.config.lq is None:
            raise InputError(f"{entry.label} is the text-to-image PixelDiT (no latent input); choose a PiD model.")
        if pipe.backbone is None:
            raise InputError(f"{entry.label} has no backbone (VAE/RAE); start the server with --backbone-path.")
        if opts.compile:
            compile_network(pipe.net)
        if opts.negative_embedding:
            from ..text import load_text_embedding

            pipe.negative_embedding, _ = load_text_embedding(opts.negative_embedding)
        self._configs[key] = pipe.net.config
        self._pipe = (key, pipe)
        return pipe

    def unload(self) -> None:
        """Drop the loaded model (and free its device memory); the next job loads its model again."""
        self._on_device(self._unload)

    def _unload(self) -> None:
        if self._pipe is None:
            return
        logger.info("unloading model %s", self._pipe[0])
        self._pipe = None
        self._free()

    def _drop_ldm(self) -> None:
        logger.info("unloading the LDM %s", self._ldm[0])
        self._ldm = None
        self._free()

    @staticmethod
    def _free() -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ LDM for Generate
    def _ldm_source(self, entry: ModelEntry) -> tuple[str, str]:
        """(LDM tag for the defaults, diffusers folder or hub id) for a model."""
        from ..ldm import LDM_DEFAULTS

        tag = (self.options.ldm or entry.backbone or "flux").lower()
        if self._given_ldm is not None:
            return tag, f"<{type(self._given_ldm).__name__}>"
        model = self.options.ldm_model or (LDM_DEFAULTS[tag].model if tag in LDM_DEFAULTS else "")
        return tag, model

    def ldm_defaults(self, key: str):
        """The `LDMDefaults` Generate uses with this model (None when no LDM is known for it)."""
        from ..ldm import LDM_DEFAULTS

        if key not in self.models:
            return None
        return LDM_DEFAULTS.get(self._ldm_source(self.models[key])[0])

    def ldm_status(self, key: str) -> tuple[bool, str]:
        """Whether Generate can run with this model, and a sentence saying with what, or what is missing."""
        from ..ldm import LDM_DEFAULTS

        if key not in self.models:
            return False, "Generate needs a PiD model; none is offered by this server."
        tag, model = self._ldm_source(self.models[key])
        if tag not in LDM_DEFAULTS:
            return False, (f"No LDM is known for the {tag} latent space; start the server with --ldm "
                           f"(one of {', '.join(LDM_DEFAULTS)}).")
        d = LDM_DEFAULTS[tag]
        defaults = (f"{d.steps} steps, guidance {d.guidance:g}, PiD decodes the final latent"
                    + (f" and x_t after step {', '.join(map(str, d.capture))}" if d.capture else ""))
        if self._given_ldm is not None:
            name = type(self._given_ldm).__name__
            return True, f"LDM: the {name} given to the app, with the {tag} defaults ({defaults})."
        if _ldm_present(model):
            return True, f"LDM: {model} ({defaults})."
        return False, (
            f"Generate needs the diffusers pipeline {model} (the {tag} LDM), which is not in a local folder or the "
            f"Hugging Face cache. Download it with `hf download {model}` (gated models: accept the licence on the "
            "hub first) or start the server with --ldm-model FOLDER."
        )

    def _get_ldm(self, entry: ModelEntry, pipe) -> Any:
        if self._given_ldm is not None:
            return self._given_ldm
        _, model = self._ldm_source(entry)
        if self._ldm is None or self._ldm[0] != model:
            from ..ldm import load_ldm_pipeline

            if self._ldm is not None:
                self._drop_ldm()
            ldm = load_ldm_pipeline(model, device=pipe.device, dtype=pipe.net.dtype)
            if hasattr(ldm, "set_progress_bar_config"):
                ldm.set_progress_bar_config(disable=True)
            self._ldm = (model, ldm)
        return self._ldm[1]

    # ------------------------------------------------------------------ request checks
    def _upload(self, path: Any, suffixes: tuple[str, ...], what: str) -> Path:
        if not path:
            raise InputError(f"Upload {what} first.")
        p = Path(str(path))
        if p.suffix.lower() not in suffixes:
            raise InputError(
                f"{p.name}: unsupported file type {p.suffix or '(none)'}; upload {what} ({' '.join(suffixes)})."
            )
        if not p.is_file():
            raise InputError(f"The upload {p.name} is gone; upload it again.")
        size = p.stat().st_size
        limit = self.options.max_upload_mb * 1e6
        if size > limit:
            raise InputError(f"{p.name} is {size / 1e6:.1f} MB, over this server's upload limit of "
                             f"{self.options.max_upload_mb:g} MB (--max-upload-mb).")
        return p

    def _check_pixels(self, width: int, height: int) -> None:
        limit = self.options.max_output_pixels
        if width * height > limit:
            raise InputError(
                f"The output would be {width}x{height} ({width * height / 1e6:.1f} MP), over this server's limit of "
                f"{limit / 1e6:.1f} MP (--max-output-pixels); choose a smaller output size."
            )

    def _read_image(self, path: Path):
        from PIL import Image

        from ..io import IMAGE_SUFFIXES

        kinds = ", ".join(s.lstrip(".").upper() for s in IMAGE_SUFFIXES if s not in (".jpeg", ".tif"))
        try:
            with Image.open(path) as im:
                w, h = im.size
                limit = INPUT_PIXEL_FACTOR * self.options.max_output_pixels
                if w * h > limit:
                    raise InputError(f"{path.name} is {w}x{h} pixels, more than this server accepts "
                                     f"({limit / 1e6:.0f} MP).")
                im.load()
                return im.copy()
        except InputError:
            raise
        except Exception as err:  # PIL raises many types for unreadable or truncated files
            logger.info("unreadable image %s: %s", path.name, _one_line(err))
            raise InputError(f"{path.name} is not an image this page can read; upload a {kinds} file.") from None

    def _text_choice(self, prompt: str | None, embedding: Any, config) -> tuple[str, Any, str]:
        """(prompt, embedding tensor or None, description) for a request."""
        from ..text import load_text_embedding

        prompt = (prompt or "").strip()
        if prompt and embedding:
            raise InputError("Give a prompt or an embedding file, not both.")
        if embedding or (not prompt and self.options.text_embedding):
            path = self._upload(embedding, EMBEDDING_SUFFIXES, "an embedding file") if embedding else \
                Path(self.options.text_embedding)
            try:
                emb, meta = load_text_embedding(path)
            except (ValueError, FileNotFoundError) as err:
                raise InputError(f"{path.name} is not a text embedding file: "
                                 f"{_one_line(err).replace(repr(str(path)), path.name)}") from None
            if emb.shape[-1] != config.txt_embed_dim:
                raise InputError(f"{path.name} holds {emb.shape[-1]}-wide embeddings; this model takes "
                                 f"{config.txt_embed_dim} (Gemma-2-2b hidden states).")
            caption = meta.get("prompt")
            source = "embedding file" if embedding else "server's --text-embedding"
            return "", emb, f"{source} {path.name}" + (f" ({caption!r})" if caption else "")
        return prompt, None, (f"prompt {prompt!r}" if prompt else "empty prompt")

    def _settings(self, key: str, pipe, **items: Any) -> dict[str, str]:
        out = {"model": self.models[key].label}
        out.update({k: str(v) for k, v in items.items()})
        out["device"] = f"{pipe.device} ({str(pipe.net.dtype).replace('torch.', '')})"
        return out

    def _run(self, key: str, on_step: StepCallback | None, job: Callable[[Any], JobResult]) -> JobResult:
        """Run ``job(pipe)`` on the device thread; Gemma errors become one sentence."""
        return self._on_device(self._job, key, on_step, job)

    def _job(self, key: str, on_step: StepCallback | None, job: Callable[[Any], JobResult]) -> JobResult:
        from ..text import MissingTextEncoderError

        if on_step is not None:
            on_step(0, 0)  # the job has the device: a cancel requested while it waited stops it here
        pipe = self._load(key)
        try:
            return job(pipe)
        except MissingTextEncoderError as err:
            logger.warning("%s", err)
            raise InputError(
                "Encoding this prompt needs the Gemma-2 text encoder, which this server cannot load; upload an "
                "embedding file made with `pid-decoder embed` instead (the server log says more)."
            ) from None

    # ------------------------------------------------------------------ jobs
    def upscale(
        self, key: str, image_path: Any, *, prompt: str = "", embedding: Any = None, seed: Any = 5,
        sigma: Any = 0.0, size: str | int | None = NATIVE, on_step: StepCallback | None = None,
    ) -> JobResult:
        """Image -> backbone latent (noised at σ) -> PiD at the model's scale, as `pid-decoder upscale`."""
        from PIL import Image

        from ..backbones import BACKBONE_INFO
        from ..io import IMAGE_SUFFIXES

        entry = self.entry(key)
        seed, sigma = _seed(seed), _sigma(sigma)
        config = self.net_config(key)
        path = self._upload(image_path, IMAGE_SUFFIXES, "an image")
        image = self._read_image(path)
        scale, k = config.lq.sr_scale, config.lq.pixels_per_latent
        grid = BACKBONE_INFO[entry.backbone].grid if entry.backbone in BACKBONE_INFO else None
        if grid is not None:  # the RAEs encode any image on a fixed token grid
            out_w = out_h = grid * k
            prepared = image
        else:
            in_w, in_h = upscale_input_size(image.size, size, scale)
            out_w, out_h = in_w * scale, in_h * scale
            if size is None or str(size).strip().lower() in ("", NATIVE):
                left, top = (image.width - in_w) // 2, (image.height - in_h) // 2  # the pipeline's centre crop
                prepared = image.crop((left, top, left + in_w, top + in_h))
            else:
                prepared = image.resize((in_w, in_h), Image.LANCZOS)
        self._check_pixels(out_w, out_h)
        prompt, emb, text = self._text_choice(prompt, embedding, config)

        def job(pipe) -> JobResult:
            start = time.perf_counter()
            out = pipe.upscale(prepared, prompt, text_embedding=emb, sigma=sigma, seed=seed, callback=on_step)[0]
            before = _rgb(prepared).resize(out.size, Image.LANCZOS)
            settings = self._settings(
                key, pipe, input=f"{path.name}, {image.width}x{image.height}",
                output=f"{out.width}x{out.height} ({scale}x of {prepared.width}x{prepared.height})",
                seed=seed, sigma=f"{sigma:g}", steps=pipe.sampler.steps, text=text,
                time=f"{time.perf_counter() - start:.1f} s",
            )
            return JobResult(out, before, f"{path.stem[:80]}_pid_{out.width}x{out.height}", settings)

        return self._run(key, on_step, job)

    def decode(
        self, key: str, latent_path: Any, *, prompt: str = "", embedding: Any = None, seed: Any = 0,
        sigma: Any = 0.0, on_step: StepCallback | None = None,
    ) -> JobResult:
        """A latent file -> PiD, with the backbone's own decode as the comparison, as `pid-decoder decode`."""
        import torch
        from PIL import Image

        from ..backbones import check_latent
        from ..io import LATENT_SUFFIXES, load_latent
        from ..presets import presets_for_latent_channels

        entry = self.entry(key)
        seed, sigma = _seed(seed), _sigma(sigma)
        config = self.net_config(key)
        path = self._upload(latent_path, LATENT_SUFFIXES, "a latent file")
        try:
            latent = load_latent(path)
        except ValueError as err:
            raise InputError(_one_line(err).replace(str(path), path.name)) from None
        if latent.shape[0] != 1:
            raise InputError(f"{path.name} holds {latent.shape[0]} latents; the page decodes one at a time "
                             "(`pid-decoder decode` takes batches).")
        channels = config.lq.latent_channels
        if latent.shape[1] != channels:
            fits = ", ".join(p.alias for p in presets_for_latent_channels(latent.shape[1])) or "none"
            raise InputError(
                f"{path.name} has {latent.shape[1]} channels (shape {tuple(latent.shape)}); {entry.label} decodes "
                f"{channels}-channel {entry.backbone or ''} latents. Models for {latent.shape[1]} channels: {fits}."
            )
        if entry.backbone is not None and entry.checkpoint is None:
            try:
                check_latent(entry.backbone, latent)
            except ValueError as err:
                raise InputError(f"{path.name}: {_one_line(err)}") from None
        if not bool(torch.isfinite(latent).all()):
            raise InputError(f"{path.name} contains NaN or infinite values.")
        k = config.lq.pixels_per_latent
        out_w, out_h = latent.shape[-1] * k, latent.shape[-2] * k
        self._check_pixels(out_w, out_h)
        prompt, emb, text = self._text_choice(prompt, embedding, config)

        def job(pipe) -> JobResult:
            start = time.perf_counter()
            images, bases = pipe.decode(latent, prompt, text_embedding=emb, sigma=sigma, seed=seed,
                                        return_baseline=True, callback=on_step)
            out = images[0]
            settings = self._settings(
                key, pipe, input=f"{path.name}, latent {tuple(latent.shape)}", output=f"{out.width}x{out.height}",
                seed=seed, sigma=f"{sigma:g}", steps=pipe.sampler.steps, text=text,
                before=f"the {entry.backbone or 'backbone'} decoder's own decode, resized from "
                       f"{bases[0].width}x{bases[0].height}",
                time=f"{time.perf_counter() - start:.1f} s",
            )
            before = bases[0].resize(out.size, Image.LANCZOS)
            return JobResult(out, before, f"{path.stem[:80]}_pid_{out.width}x{out.height}", settings)

        return self._run(key, on_step, job)

    def generate(
        self, key: str, prompt: str, *, resolution: str | int = "2048", seed: Any = 0, ldm_steps: Any = None,
        guidance: Any = None, embedding: Any = None, on_step: StepCallback | None = None,
        on_ldm_step: StepCallback | None = None,
    ) -> JobResult:
        """Prompt -> LDM -> PiD with the defaults of `pid-decoder generate`; the LDM's own decode as comparison."""
        from PIL import Image

        from ..ldm import ldm_defaults

        entry = self.entry(key)
        prompt = (prompt or "").strip()
        if not prompt:
            raise InputError("Write a prompt for the LDM.")
        ok, why = self.ldm_status(key)
        if not ok:
            raise InputError(why)
        seed = _seed(seed)
        tag, _ = self._ldm_source(entry)
        defaults = ldm_defaults(tag)
        steps = defaults.steps if ldm_steps in (None, "", 0) else _positive_int(ldm_steps, "LDM steps")
        guidance = defaults.guidance if guidance in (None, "") else _nonnegative(guidance, "Guidance")
        config = self.net_config(key)
        scale = config.lq.sr_scale
        out_w, out_h = parse_resolution(resolution)
        step = 16 * scale
        if out_w % step or out_h % step:
            raise InputError(f"Resolution {out_w}x{out_h} does not fit this {scale}x model: the LDM runs at "
                             f"resolution / {scale}, a multiple of 16, so use multiples of {step}.")
        self._check_pixels(out_w, out_h)
        _, emb, text = self._text_choice("", embedding, config) if embedding else ("", None, "the LDM prompt")

        def job(pipe) -> JobResult:
            start = time.perf_counter()
            ldm = self._get_ldm(entry, pipe)
            results = pipe.generate(
                prompt, ldm_pipeline=ldm, backbone=tag, resolution=(out_w, out_h), ldm_steps=steps,
                guidance_scale=guidance, seed=seed, ldm_seed=seed, text_embedding=emb, return_baseline=True,
                callback=on_step, ldm_callback=on_ldm_step,
            )
            final = results[-1]
            captured = results[:-1]
            settings = self._settings(
                key, pipe, prompt=repr(prompt), output=f"{final.image.width}x{final.image.height}",
                ldm=f"{tag}: {steps} steps, guidance {guidance:g}, seed {seed}",
                decoded="x0" + "".join(f", {r.label} (σ {r.sigma:.3f})" for r in captured),
                pid_text=text, steps=pipe.sampler.steps, time=f"{time.perf_counter() - start:.1f} s",
            )
            before = final.baseline.resize(final.image.size, Image.LANCZOS)
            extra = {r.label: r.image for r in captured}
            return JobResult(final.image, before, f"generate_{_slug(prompt)}_{seed}", settings, extra)

        return self._run(key, on_step, job)


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}.") from None
    if number < 1 or number != float(value):
        raise InputError(f"{what} must be a whole number of at least 1, got {value!r}.")
    return number


def _nonnegative(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{what} must be a number of at least 0, got {value!r}.")
    return number


def _slug(text: str, limit: int = 32) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()[:limit] or "prompt"


def _ldm_present(model: str) -> bool:
    """A diffusers pipeline folder, or a hub id whose model_index.json is in the HF cache (nothing downloaded)."""
    if not model:
        return False
    folder = Path(model).expanduser()
    if folder.is_dir():
        return (folder / "model_index.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:  # an id the hub library refuses is simply not present
        return False
