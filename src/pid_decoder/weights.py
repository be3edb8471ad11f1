"""Where the weight files live: a local folder that mirrors the release, filled from the hub on demand.

Layout of a weights folder (``--weights-dir`` / ``$PID_WEIGHTS_DIR``), the same as the hub repo
``nvidia/PiD`` and the reference's ``checkpoints/`` folder::

    checkpoints/<released folder>/model_ema_bf16.pth      PiD checkpoints (one per preset)
    checkpoints/ae.safetensors                            FLUX.1 VAE (BFL single file)      flux presets
    checkpoints/flux2_ae.safetensors                      FLUX.2 VAE (BFL single file)      flux2 presets
    checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors                             sd3 presets
    checkpoints/rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt  + stats/.../stat.pt  dinov2 preset
    checkpoints/scale_rae/decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt + XL_decoder_config.json
    sdxl_vae/diffusion_pytorch_model.safetensors          from stabilityai/sdxl-vae         sdxl preset
    qwenimage_vae/vae/diffusion_pytorch_model.safetensors from Qwen/Qwen-Image               qwenimage presets

A file is looked up at its path under the weights folder (also without the leading ``checkpoints/``, for
users who point ``--weights-dir`` at the ``checkpoints`` folder itself). A missing file is downloaded
with ``huggingface_hub.hf_hub_download`` (its progress bar, its cache when no weights folder is given);
a release file not found under ``checkpoints/`` in the repo is also tried at the repo root.
With ``HF_HUB_OFFLINE=1``, or when the download fails, `MissingWeightsError` lists every missing file,
where to put it and where it comes from, before anything is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .presets import Preset, resolve_preset

logger = logging.getLogger(__name__)

HUB_REPO = "nvidia/PiD"
ENV_VAR = "PID_WEIGHTS_DIR"
_RELEASE_PREFIX = "checkpoints/"


@dataclass(frozen=True)
class HubFile:
    """One file: its path under the weights folder and where the hub has it."""

    local: str  # path relative to the weights folder
    repo: str
    filename: str  # path inside the hub repo

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.filename}"


@dataclass(frozen=True)
class WeightSpec:
    """The files one component needs and which path its loader takes."""

    what: str  # e.g. "PiD checkpoint flux-4k"
    files: tuple[HubFile, ...]
    load_levels: int = 0  # the loader takes files[0] itself (0) or its n-th parent folder
    note: str = ""


def _release(path: str) -> HubFile:
    return HubFile(_RELEASE_PREFIX + path, HUB_REPO, _RELEASE_PREFIX + path)


BACKBONE_WEIGHTS: dict[str, WeightSpec] = {
    "flux": WeightSpec("FLUX.1 VAE", (_release("ae.safetensors"),)),
    "flux2": WeightSpec("FLUX.2 VAE", (_release("flux2_ae.safetensors"),)),
    "sd3": WeightSpec("SD3 VAE", (_release("sd3_vae/vae/diffusion_pytorch_model.safetensors"),)),
    "sdxl": WeightSpec(
        "SDXL VAE",
        (HubFile("sdxl_vae/diffusion_pytorch_model.safetensors", "stabilityai/sdxl-vae", "diffusion_pytorch_model.safetensors"),),
    ),
    "qwenimage": WeightSpec(
        "Qwen-Image VAE",
        (HubFile("qwenimage_vae/vae/diffusion_pytorch_model.safetensors", "Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors"),),
    ),
    "dinov2": WeightSpec(
        "DINOv2 RAE decoder and statistics",
        (
            _release("rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt"),
            _release("rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt"),
        ),
        load_levels=5,
        note="the encoder facebook/dinov2-with-registers-base is read from checkpoints/rae/encoder/ or the HF cache",
    ),
    "siglip": WeightSpec(
        "Scale-RAE decoder",
        (
            _release("scale_rae/decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt"),
            _release("scale_rae/decoder/XL_decoder_config.json"),
        ),
        load_levels=1,
        note="the encoder google/siglip2-so400m-patch14-224 is read from checkpoints/scale_rae/decoder/encoder/ or "
        "the HF cache",
    ),
}


def checkpoint_spec(preset: str | Preset) -> WeightSpec:
    p = resolve_preset(preset)
    note = ""
    if p.sampler.kind == "teacher":
        note = "undistilled / PixelDiT files are documented by the reference (docs/checkpoints.md) next to the distilled ones"
    return WeightSpec(f"PiD checkpoint {p.alias}", (HubFile(p.checkpoint_path, HUB_REPO, p.checkpoint_path),), note=note)


def backbone_spec(backbone: str) -> WeightSpec:
    from .backbones import resolve_backbone_name

    return BACKBONE_WEIGHTS[resolve_backbone_name(backbone)]


def preset_files(preset: str | Preset, *, with_backbone: bool = True) -> list[WeightSpec]:
    """Every weight spec a preset needs: its checkpoint and (optionally) its backbone's VAE/RAE."""
    p = resolve_preset(preset)
    specs = [checkpoint_spec(p)]
    if with_backbone and p.backbone is not None:
        specs.append(backbone_spec(p.backbone))
    return specs


def default_weights_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit``, else ``$PID_WEIGHTS_DIR``, else None (files then live in the Hugging Face cache)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class MissingWeightsError(FileNotFoundError):
    """Weight files are missing and could not be downloaded; the message says which, where and from where."""


def _hub_download(repo: str, filename: str, *, local_dir: Path | None, local_files_only: bool) -> str:
    """`huggingface_hub.hf_hub_download`, kept in one place (tests replace it with a fake hub)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, local_dir=local_dir, local_files_only=local_files_only)


def _local_candidates(root: Path, f: HubFile) -> list[Path]:
    out = [root / f.local]
    if f.local.startswith(_RELEASE_PREFIX):
        out.append(root / f.local[len(_RELEASE_PREFIX):])
    return out


def _fetch(f: HubFile, root: Path | None, allow_download: bool) -> tuple[Path | None, str]:
    """(path, "") when found locally or downloaded, else (None, reason)."""
    if root is not None:
        for candidate in _local_candidates(root, f):
            if candidate.is_file():
                return candidate, ""
    # (file in the repo, folder it is downloaded into so that it lands at root / f.local)
    attempts = [(f.filename, None if root is None else root / f.local[: len(f.local) - len(f.filename)])]
    if f.repo == HUB_REPO and f.filename.startswith(_RELEASE_PREFIX):
        # the repo may hold the release files without the checkpoints/ prefix
        attempts.append((f.filename[len(_RELEASE_PREFIX):], None if root is None else root / _RELEASE_PREFIX))
    reason = ""
    for filename, local_dir in attempts:
        try:
            if allow_download:
                logger.info("downloading %s from %s into %s", filename, f.repo, local_dir or "the Hugging Face cache")
            return Path(_hub_download(f.repo, filename, local_dir=local_dir, local_files_only=not allow_download)), ""
        except Exception as err:
            if not reason:
                first = str(err).splitlines()[0] if str(err) else ""
                reason = "offline" if not allow_download else f"download failed: {type(err).__name__}: {first}"
    return None, reason


def resolve(
    specs: list[WeightSpec], weights_dir: str | os.PathLike | None = None, *, allow_download: bool | None = None
) -> list[Path]:
    """The path each spec's loader takes, downloading missing files when allowed.

    ``allow_download`` defaults to "not HF_HUB_OFFLINE". Raises `MissingWeightsError` naming every missing
    file (not just the first) before anything has been loaded.
    """
    root = default_weights_dir(weights_dir)
    allow = (not offline()) if allow_download is None else allow_download
    out: list[Path] = []
    missing: list[tuple[WeightSpec, HubFile, str]] = []
    for spec in specs:
        found: list[Path] = []
        for f in spec.files:
            path, reason = _fetch(f, root, allow)
            if path is None:
                missing.append((spec, f, reason))
            else:
                found.append(path)
        if len(found) == len(spec.files):
            load = found[0]
            for _ in range(spec.load_levels):
                load = load.parent
            out.append(load)
    if missing:
        raise MissingWeightsError(missing_message(missing, root, allow))
    return out


def missing_message(missing: list[tuple[WeightSpec, HubFile, str]], root: Path | None, allowed: bool) -> str:
    where = str(root) if root is not None else f"a weights folder (--weights-dir or ${ENV_VAR})"
    lines = [f"missing weight files; put them under {where}:"]
    for spec, f, reason in missing:
        lines.append(f"  {f.local}    ({spec.what}; from hf://{f.repo}/{f.filename}{'; ' + reason if reason else ''})")
        if spec.note:
            lines.append(f"      note: {spec.note}")
    target = str(root) if root is not None else "WEIGHTS_DIR"
    lines.append("to fetch them:")
    for _, f, _ in missing:
        sub = f.local[: len(f.local) - len(f.filename)].rstrip("/")
        dest = f"{target}/{sub}" if sub else target
        lines.append(f"  hf download {f.repo} {f.filename} --local-dir {dest}")
    if not allowed:
        lines.append("downloads are off (HF_HUB_OFFLINE=1); unset it to download missing files automatically.")
    lines.append("The released PiD weights are under the NVIDIA license of their hub repo (non-commercial use).")
    return "\n".join(lines)
