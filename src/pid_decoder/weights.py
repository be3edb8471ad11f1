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
        or checkpoints/sdxl_vae.safetensors               (where the reference's docs put it)
    qwenimage_vae/vae/diffusion_pytorch_model.safetensors from Qwen/Qwen-Image              qwenimage presets
        or checkpoints/QwenImage_VAE_2d.pth               (the reference's 2-D state dict, converted on load)

A file is looked up at its path under the weights folder, at its alternatives in the reference's layout, and
also without the leading ``checkpoints/`` (for a ``--weights-dir`` that is the ``checkpoints`` folder itself).
Nothing else is guessed: one hub path per file. A missing file is downloaded with
``huggingface_hub.hf_hub_download`` (its progress bar shows only while bytes arrive), after one short HEAD
request that tells a reachable hub from an unreachable one; the first connection failure ends all attempts,
so an offline run never waits through huggingface_hub's retries. `check_run_files` adds the Gemma text encoder
when a prompt must be encoded, and `MissingWeightsError` lists every missing piece, where it goes, where it
comes from and the options that avoid it, before anything is loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .presets import Preset, resolve_preset
from .registry import DEFAULT_TEXT_ENCODER, looks_like_hub_id, resolve_backbone_name

logger = logging.getLogger(__name__)

HUB_REPO = "nvidia/PiD"
ENV_VAR = "PID_WEIGHTS_DIR"
_RELEASE_PREFIX = "checkpoints/"
# One HEAD request decides whether the hub is reachable. A working hub answers in well under a second;
# a refused connection fails at once; a black-holed network costs at most this long ($PID_HUB_TIMEOUT).
PROBE_TIMEOUT_S = 3.0
TEXT_ENCODER_SIZE = "about 5 GB"


@dataclass(frozen=True)
class HubFile:
    """One file: its path under the weights folder, where the hub has it, and where else users keep it."""

    local: str  # path relative to the weights folder
    repo: str
    filename: str  # path inside the hub repo
    also: tuple[str, ...] = ()  # other paths under the weights folder with the same weights (reference layout)

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
        (
            HubFile(
                "sdxl_vae/diffusion_pytorch_model.safetensors", "stabilityai/sdxl-vae",
                "diffusion_pytorch_model.safetensors", also=("checkpoints/sdxl_vae.safetensors",),
            ),
        ),
    ),
    "qwenimage": WeightSpec(
        "Qwen-Image VAE",
        (
            HubFile(
                "qwenimage_vae/vae/diffusion_pytorch_model.safetensors", "Qwen/Qwen-Image",
                "vae/diffusion_pytorch_model.safetensors", also=("checkpoints/QwenImage_VAE_2d.pth",),
            ),
        ),
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
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


class MissingWeightsError(FileNotFoundError):
    """Weight files are missing and could not be downloaded; the message says which, where and from where."""


# --------------------------------------------------------------------------- the hub
class HubUnreachable(ConnectionError):
    """The hub did not answer (no network, refused, DNS, proxy, timeout or a 5xx): stop asking it."""


def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` read now (huggingface_hub reads it once at import), else the public hub."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _bounded(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` with a wall-clock bound (a DNS lookup is not covered by socket timeouts)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, name="pid-hub-probe", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise HubUnreachable(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _hub_probe(repo: str, filename: str) -> None:
    """One HEAD request for ``repo/filename``, short timeout, no retries.

    Returns when the hub has the file; raises `HubUnreachable` for network trouble and huggingface_hub's own
    errors (404, gated, ...) for answers about the file.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = hub_endpoint()
    try:
        limit = float(os.environ.get("PID_HUB_TIMEOUT") or PROBE_TIMEOUT_S)
    except ValueError:
        limit = PROBE_TIMEOUT_S

    def head() -> None:
        get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=endpoint), timeout=limit)

    try:
        # huggingface_hub may make a second request before the HEAD (its agent registry): bound the whole call
        _bounded(head, limit)
    except HubUnreachable:
        raise
    except HfHubHTTPError as err:
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if status is None or status in (408, 429) or status >= 500:
            raise HubUnreachable(f"{endpoint} answered {status or _first_line(err)}") from None
        headers = getattr(response, "headers", None) or {}
        if not any(h in headers for h in _HUB_HEADERS):  # a proxy, firewall or captive portal answered
            raise HubUnreachable(
                f"{endpoint} answered {status} without Hugging Face headers (a proxy or firewall in between?)"
            ) from None
        raise
    except Exception as err:  # httpx transport errors: refused, DNS, TLS, proxy, timeout
        raise HubUnreachable(f"{endpoint}: {_first_line(err)}") from None


# Headers the hub (and mirrors of it) put on its answers, errors included.
_HUB_HEADERS = ("x-error-code", "x-repo-commit", "x-request-id", "x-linked-etag")


def _hub_download(repo: str, filename: str, *, local_dir: Path | None, local_files_only: bool) -> str:
    """`huggingface_hub.hf_hub_download` after a `_hub_probe`, kept in one place (tests replace it)."""
    from huggingface_hub import hf_hub_download

    if not local_files_only:
        _hub_probe(repo, filename)
        logger.info("downloading %s from %s into %s", filename, repo, local_dir or "the Hugging Face cache")
    return hf_hub_download(
        repo, filename, local_dir=local_dir, local_files_only=local_files_only, endpoint=hub_endpoint()
    )


def _why(err: BaseException) -> str:
    """A hub error in a few words, with what to do about it."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403) or type(err).__name__ == "GatedRepoError":
        return f"access denied by the hub ({status}): accept the model's license on its page and log in with `hf auth login`"
    if status == 404 or type(err).__name__ in ("RemoteEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError"):
        return "not found on the hub (404)"
    return f"download failed: {_first_line(err)}"


# --------------------------------------------------------------------------- local look-up
def _candidates(root: Path, f: HubFile) -> list[Path]:
    out: list[Path] = []
    for rel in (f.local, *f.also):
        out.append(root / rel)
        if rel.startswith(_RELEASE_PREFIX):
            out.append(root / rel[len(_RELEASE_PREFIX):])
    return out


def _find_local(f: HubFile, root: Path | None) -> Path | None:
    if root is not None:
        return next((c for c in _candidates(root, f) if c.is_file()), None)
    try:  # no weights folder: the Hugging Face cache
        return Path(_hub_download(f.repo, f.filename, local_dir=None, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None


def _download_dir(root: Path | None, f: HubFile) -> Path | None:
    """The folder ``hf_hub_download(local_dir=...)`` needs so that the file lands at ``root / f.local``."""
    return None if root is None else root / f.local[: len(f.local) - len(f.filename)]


@dataclass
class _Missing:
    what: str
    note: str
    file: HubFile | None = None  # a weight file, or None for the text encoder
    reason: str = ""


@dataclass
class _Search:
    """State of one resolution: where to look, whether to download, and what is still missing."""

    root: Path | None
    allow: bool
    off_by: str = "HF_HUB_OFFLINE=1"  # what turned downloads off, for the message
    unreachable: str = ""  # why the hub is not asked any more ("" while it may be)
    missing: list[_Missing] = field(default_factory=list)

    @property
    def offline(self) -> bool:
        return not self.allow or bool(self.unreachable)

    def fetch(self, spec: WeightSpec, f: HubFile) -> Path | None:
        path = _find_local(f, self.root)
        if path is not None:
            return path
        reason = ""
        if not self.offline:
            try:
                return Path(_hub_download(f.repo, f.filename, local_dir=_download_dir(self.root, f), local_files_only=False))
            except HubUnreachable as err:
                self.unreachable = str(err)
                logger.debug("hub unreachable (%s): no further download attempts", err)
            except Exception as err:  # an answer about this file (404, gated, disk full): try the others
                reason = _why(err)
        self.missing.append(_Missing(spec.what, spec.note, f, reason))
        return None


def _search(weights_dir: str | os.PathLike | None, allow_download: bool | None) -> _Search:
    if allow_download is None:
        return _Search(default_weights_dir(weights_dir), not offline())
    return _Search(default_weights_dir(weights_dir), bool(allow_download), off_by="allow_download=False")


def _resolve_specs(search: _Search, specs: list[WeightSpec]) -> list[Path | None]:
    out: list[Path | None] = []
    for spec in specs:
        found = [search.fetch(spec, f) for f in spec.files]
        if any(p is None for p in found):
            out.append(None)
            continue
        load = found[0]
        for _ in range(spec.load_levels):
            load = load.parent
        out.append(load)
    return out


def resolve(
    specs: list[WeightSpec], weights_dir: str | os.PathLike | None = None, *, allow_download: bool | None = None
) -> list[Path]:
    """The path each spec's loader takes, downloading missing files when allowed.

    ``allow_download`` defaults to "not HF_HUB_OFFLINE". Raises `MissingWeightsError` naming every missing
    file (not just the first) before anything has been loaded.
    """
    search = _search(weights_dir, allow_download)
    paths = _resolve_specs(search, specs)
    if search.missing:
        raise MissingWeightsError(missing_message(search))
    return [p for p in paths if p is not None]


# --------------------------------------------------------------------------- one check per run
@dataclass(frozen=True)
class RunFiles:
    """What a run loads, all present on disk (or, for the text encoder, reachable) when `check_run_files` returns."""

    checkpoint: Path | None  # the preset's checkpoint; None when the caller gave its own checkpoint file
    backbone: Path | None  # what `load_backbone` takes; None when no backbone is needed or one was given
    text_encoder: str | None  # the model string for `TextEncoder`; None when no prompt needs Gemma
    offline: bool  # downloads are off or the hub proved unreachable: load everything with local_files_only


def check_run_files(
    preset: str | Preset | None,
    *,
    weights_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    backbone: str | None = None,
    need_backbone: bool = True,
    backbone_path: str | os.PathLike | None = None,
    needs_text_encoder: bool = False,
    text_encoder: str | os.PathLike | None = None,
    allow_download: bool | None = None,
) -> RunFiles:
    """Find (or download) every file a run needs before any model loads; one error lists all that is missing.

    Args:
        preset: the preset (alias or folder name); None when ``checkpoint`` is a file whose preset is not known.
        weights_dir: the local weights folder (default ``$PID_WEIGHTS_DIR``, else the Hugging Face cache).
        checkpoint: the user's own checkpoint file: checked (exists, readable, not empty), not downloaded.
        backbone: backbone name instead of the preset's (``--backbone``).
        need_backbone: False when the run needs no VAE/RAE (decoding without baselines).
        backbone_path: the user's own VAE/RAE file or folder: checked to exist, not downloaded.
        needs_text_encoder: a prompt must be encoded by Gemma (see `TextEncoder.needs_model`).
        text_encoder: Gemma as a local folder or hub id (default `registry.DEFAULT_TEXT_ENCODER`).
        allow_download: default "not HF_HUB_OFFLINE".

    Raises `MissingWeightsError` (a FileNotFoundError) with one message naming every missing file, where it
    goes, where it comes from and what avoids it; FileNotFoundError / ValueError / PermissionError for a
    ``checkpoint`` or ``backbone_path`` that is not usable. Offline (HF_HUB_OFFLINE=1 or an unreachable hub)
    it answers without waiting: one probe at most, no retries.
    """
    p = resolve_preset(preset) if preset is not None else None
    if checkpoint is not None or backbone_path is not None:
        from .checkpoints import check_weight_path  # imports torch: only for the user's own files

        if checkpoint is not None:
            check_weight_path(checkpoint, "checkpoint", flag="--checkpoint", param="checkpoint")
        if backbone_path is not None:
            check_weight_path(backbone_path, "backbone weights", flag="--backbone-path", param="backbone", folder_ok=True)
    name = backbone or (p.backbone if p is not None else None)
    specs: list[WeightSpec] = []
    if checkpoint is None:
        if p is None:
            raise ValueError("give a preset (--preset / preset=) or a checkpoint file (--checkpoint / checkpoint=)")
        specs.append(checkpoint_spec(p))
    if need_backbone and backbone_path is None and name is not None:
        specs.append(backbone_spec(name))

    search = _search(weights_dir, allow_download)
    paths = _resolve_specs(search, specs)
    model = None
    if needs_text_encoder:
        model = os.fspath(text_encoder) if text_encoder is not None else DEFAULT_TEXT_ENCODER
        _check_text_encoder(search, model)
    if search.missing:
        raise MissingWeightsError(missing_message(search, preset=p))
    ckpt = paths.pop(0) if checkpoint is None else None
    bb = paths.pop(0) if paths else None
    return RunFiles(ckpt, bb, model, search.offline)


def _check_text_encoder(search: _Search, model: str) -> None:
    """Gemma is present when its folder (or its HF-cache snapshot) has a config.json; else one probe, no download
    (transformers downloads it on first use when the hub is reachable)."""
    what = f"text encoder {model} (Gemma-2-2b-it, {TEXT_ENCODER_SIZE})"
    note = "needed to encode the prompt (the empty default prompt too)"
    folder = Path(model).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return
        search.missing.append(_Missing(what, note, None, f"the folder {str(folder)!r} has no config.json"))
        return
    if not looks_like_hub_id(model):
        search.missing.append(_Missing(what, note, None, f"the folder {str(folder)!r} does not exist"))
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except (ValueError, OSError):
        cached = None
    if isinstance(cached, str):
        return
    reason = ""
    if not search.offline:
        try:
            _hub_probe(model, "config.json")
            logger.info("the text encoder %s (%s) will be downloaded on first use", model, TEXT_ENCODER_SIZE)
            return
        except HubUnreachable as err:
            search.unreachable = str(err)
        except Exception as err:
            reason = _why(err)
    search.missing.append(_Missing(what, note, None, reason))


def _fetch_commands(missing: list[_Missing], target: str) -> list[str]:
    """``hf download`` lines, one per (repo, destination folder), files of the same folder together."""
    groups: dict[tuple[str, str], list[str]] = {}
    for m in missing:
        if m.file is None:
            continue
        f = m.file
        sub = f.local[: len(f.local) - len(f.filename)].rstrip("/")
        groups.setdefault((f.repo, f"{target}/{sub}" if sub else target), []).append(f.filename)
    return [f"  hf download {repo} {' '.join(files)} --local-dir {dest}" for (repo, dest), files in groups.items()]


def missing_message(search: _Search, *, preset: Preset | None = None) -> str:
    """The one message of a `MissingWeightsError`: what is missing, why, how to get it, how to avoid it."""
    root = search.root
    run = f"preset {preset.alias!r}" if preset is not None else "this run"
    if not search.allow:
        why = f"downloads are off ({search.off_by})"
    elif search.unreachable:
        why = f"the hub could not be reached ({search.unreachable}), so nothing was downloaded"
    else:
        why = "they could not be downloaded"
    n = len(search.missing)
    where = str(root) if root is not None else "a weights folder (--weights-dir DIR / weights_dir=, or $PID_WEIGHTS_DIR)"
    lines = [f"{run} needs {n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not here, and {why}:"]
    for m in search.missing:
        if m.file is None:
            lines.append(f"  {m.what}")
            lines.append(f"      {m.note}{'; ' + m.reason if m.reason else ''}")
            continue
        f = m.file
        lines.append(f"  {where}/{f.local}" if root is not None else f"  {f.local}")
        detail = f"{m.what}, from hf://{f.repo}/{f.filename}"
        if f.also:
            detail += f" (or kept as {' / '.join(f.also)}, the reference's layout)"
        lines.append(f"      {detail}{'; ' + m.reason if m.reason else ''}")
        if m.note:
            lines.append(f"      note: {m.note}")
    target = str(root) if root is not None else "WEIGHTS_DIR"
    commands = _fetch_commands(search.missing, target)
    if commands:
        lines.append(f"to fetch the weight files (on a machine with network; then pass --weights-dir {target}):"
                     if root is None else "to fetch the weight files (on a machine with network):")
        lines.extend(commands)
    gemma = [m for m in search.missing if m.file is None]
    if gemma:
        lines.append(
            f"to fetch the text encoder: hf download {DEFAULT_TEXT_ENCODER} --local-dir ./gemma-2-2b-it, then "
            "--text-encoder ./gemma-2-2b-it (API: text_encoder=)"
        )
        lines.append(
            'to run without it: embed the prompt where Gemma is available (pid-decoder embed "PROMPT" -o emb.safetensors) '
            "and pass --text-embedding emb.safetensors (API: text_embedding=)"
        )
    if search.unreachable:
        lines.append("with no network, set HF_HUB_OFFLINE=1 to skip the hub check.")
    elif not search.allow:
        undo = "unset HF_HUB_OFFLINE" if search.off_by.startswith("HF_") else "pass allow_download=True"
        lines.append(f"{undo} to download missing files automatically.")
    lines.append("The released PiD weights are under the NVIDIA license of their hub repo (non-commercial use).")
    return "\n".join(lines)
