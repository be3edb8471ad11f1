"""Checkpoint files: official ``model_ema_bf16.pth`` (weights_only), Comfy-Org safetensors, our safetensors.

Loading never silently drops or invents weights: after removing the ``net.`` prefix, the EMA/critic copies
(``net_ema.*``, ``fake_score.*``, ``discriminator.*``) and the documented training-only keys, every key must
match the network exactly, or a ValueError names the missing, unexpected and mis-shaped keys.
The network is built on the meta device and each tensor is moved straight to the target device and dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .config import NetConfig, load_net_config
from .devices import parse_dtype, resolve_device
from .keys import key_problems, listing
from .model.net import PiDNet
from .presets import PRESETS, Preset, resolve_preset

logger = logging.getLogger(__name__)

PREFIX = "net."
# Copies of other networks that a training checkpoint may carry next to `net.*`.
IGNORED_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
# Keys of released files that the inference network does not have: the v1.5 auxiliary LQ RGB head
# (a training-time alignment loss; never evaluated at inference).
TRAINING_ONLY_PREFIXES = ("lq_proj.lq_aux_rgb_head.",)
FORMAT = "pid-decoder"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# --------------------------------------------------------------------------- reading files
@dataclass
class CheckpointFile:
    """A checkpoint's tensors (loaded lazily where the format allows) and its metadata."""

    path: Path
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str]
    _get: Any  # callable key -> tensor (CPU)

    def tensor(self, key: str) -> torch.Tensor:
        return self._get(key)

    @property
    def config(self) -> NetConfig | None:
        raw = self.metadata.get("config")
        if not raw:
            return None
        try:
            return load_net_config(json.loads(raw))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise ValueError(
                f"{self.path}: the network config stored in its metadata is not valid ({_first_line(err)}); "
                "give the config yourself (--config FILE / config=) or a preset (--preset / preset=)"
            ) from None

    @property
    def preset_name(self) -> str | None:
        return self.metadata.get("preset") or None


def _missing_file_message(path: Path) -> str:
    return (
        f"checkpoint file not found: {path}. Released PiD weights live at "
        "checkpoints/<folder>/model_ema_bf16.pth (e.g. checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step/"
        "model_ema_bf16.pth); pass the path of that file, or a .safetensors file written by `pid-decoder convert`."
    )


# What a file that is not a weight file usually is, by its first bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"GGUF", "a GGUF model file"),
    (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded: run `git lfs pull`)"),
)
# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_HEAD_BYTES = 64


def file_kind(head: bytes, size: int) -> str:
    """What a file is by its first bytes: "zip" (torch.save), "torch-legacy", "pickle", "safetensors", or a
    description such as "a PNG image" / "unknown bytes (3f 00 ...)" for anything else."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(_TORCH_LEGACY):
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if size > 9 and len(head) > 8:
        header = int.from_bytes(head[:8], "little")
        if 2 <= header <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = head.lstrip()
    if text[:1] == b"<":
        return "an HTML/XML page (a download that saved a web page instead of the file?)"
    if text[:1] in (b"{", b"["):
        return "a JSON text file"
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return f"unknown bytes ({head[:8].hex(' ')})"


def _found_inside(folder: Path, limit: int = 6) -> str:
    suffixes = (".pth", ".pt", ".safetensors", ".sft", ".bin", ".ckpt")
    try:
        found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    except OSError:
        found = []
    if not found:
        return "no .pth/.safetensors file"
    return ", ".join(found[:limit]) + (f" ... (+{len(found) - limit} more)" if len(found) > limit else "")


def check_weight_path(
    path: str | os.PathLike,
    what: str = "checkpoint",
    *,
    flag: str | None = None,
    param: str | None = None,
    folder_ok: bool = False,
) -> bytes:
    """Refuse a path that cannot be a weight file, naming the cause; returns the file's first bytes.

    FileNotFoundError (missing), ValueError (a directory where a file is needed, an empty file),
    PermissionError (unreadable). ``flag`` / ``param`` are the CLI option and API parameter named in messages.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    where = f"({flag} / {param}=) " if flag and param else ""
    if not path.exists():
        if what == "checkpoint":
            raise FileNotFoundError(_missing_file_message(path))
        raise FileNotFoundError(f"{what} {str(path)!r} {where}does not exist")
    if path.is_dir():
        if folder_ok:
            return b""
        raise ValueError(
            f"{what} {str(path)!r} {where}is a directory; pass the .pth/.safetensors file inside it "
            f"(found: {_found_inside(path)})"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except PermissionError:
        raise PermissionError(
            f"cannot read {what} {str(path)!r}{' ' + where.strip() if where else ''}: permission denied; check its "
            "permissions (ls -l) or copy it somewhere readable"
        ) from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    if not head:
        raise ValueError(
            f"{what} {str(path)!r} {where}is empty (0 bytes); the download or copy did not finish: fetch it again"
        )
    return head


def open_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Open a ``.pth``/``.pt`` (torch.save, weights_only) or ``.safetensors`` file without unpickling code.

    The format is told by the file's first bytes, not its suffix. Anything else is refused with a ValueError
    that says what the file looks like (an image, a web page, a pickle, unknown bytes); a missing file raises
    FileNotFoundError, an unreadable one PermissionError.
    """
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    head = check_weight_path(path, "checkpoint")
    kind = file_kind(head, path.stat().st_size)
    if kind in ("zip", "torch-legacy"):
        return _open_torch(path, kind)
    if kind == "safetensors" or (kind != "pickle" and path.suffix.lower() in SAFETENSORS_SUFFIXES):
        return _open_safetensors(path, kind)
    if kind == "pickle":
        raise ValueError(
            f"{path} is a plain Python pickle, not a torch.save checkpoint; it is not opened because unpickling can "
            "run code from the file. If you trust it, load it yourself and re-save the state dict with "
            "torch.save(state_dict, path) or as safetensors."
        )
    raise ValueError(
        f"{path} is not a torch checkpoint (it looks like {kind}); expected a .pth written by torch.save or a "
        ".safetensors file, e.g. checkpoints/<folder>/model_ema_bf16.pth"
    )


def _open_safetensors(path: Path, kind: str = "safetensors") -> CheckpointFile:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
        shapes, dtypes = {}, {}
        for k in keys:
            sl = handle.get_slice(k)
            shapes[k] = tuple(sl.get_shape())
            dtypes[k] = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
        metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        looks = "" if kind == "safetensors" else f" (it looks like {kind})"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a valid safetensors file{looks}: {detail}") from None
    return CheckpointFile(path, keys, shapes, dtypes, metadata, handle.get_tensor)


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def load_tensor_file(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` of a zip / legacy torch file, with every failure as a ValueError that
    names the cause. torch's pickle-protocol UserWarning is caught here and becomes part of the message."""
    import re
    import warnings

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            caught = recorded
            if kind == "zip":
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as err:
        text = str(err)
        glob = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        if glob:
            raise ValueError(
                f"refusing to load {path}: it needs arbitrary Python unpickling, which can run code from the file "
                f"({glob}). Only plain tensor dicts are accepted (torch.load(..., weights_only=True)). If you trust "
                "the file, re-save its state dict with torch.save(state_dict, ...) or convert it to safetensors."
            ) from None
        protocol = next((m.group(1) for w in caught if (m := re.search(r"pickle protocol (\d+)", str(w.message)))), None)
        if protocol is not None:
            raise ValueError(
                f"{path} was saved with pickle protocol {protocol}, which torch's safe loader (weights_only=True) "
                "cannot read; re-save it with torch.save(state_dict, path) (default protocol) or convert it to "
                "safetensors"
            ) from None
        after = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines() if "WeightsUnpickler error:" in text else []
        detail = after[0].strip() if after else _first_line(err)
        raise ValueError(f"{path} is a corrupt torch checkpoint (torch's safe loader: {detail})") from None
    except Exception as err:  # a damaged file makes torch's reader fail anywhere (struct, assert, key errors)
        text = str(err)
        if "central directory" in text or "zip archive" in text or isinstance(err, EOFError):
            raise ValueError(f"{path} is truncated or corrupt (torch could not read it: {_first_line(err)})") from None
        if kind == "zip":
            raise ValueError(f"{path} is a zip archive but not a torch checkpoint ({_first_line(err)})") from None
        raise ValueError(f"{path} is not a readable torch checkpoint ({_first_line(err)})") from None
    finally:
        for w in caught:
            if "pickle protocol" not in str(w.message):  # anything else torch says is passed on once
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of a third-party error (torch's run on for lines)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    if len(line) > 120 and ". " in line:
        line = line[: line.index(". ") + 1]
    return f"{type(err).__name__}: {line}"


def _open_torch(path: Path, kind: str = "zip") -> CheckpointFile:
    obj = load_tensor_file(path, kind)
    sd = _flat_tensor_dict(obj, path)
    keys = list(sd)
    return CheckpointFile(
        path, keys, {k: tuple(v.shape) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()}, {}, sd.__getitem__
    )


def _flat_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        for wrapper in ("state_dict", "model", "net"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path} holds non-tensor entries {bad[:5]}; expected a flat dict of tensors")
    return dict(obj)


# --------------------------------------------------------------------------- key handling
def network_keys(checkpoint: CheckpointFile, *, training: bool = False) -> tuple[dict[str, str], list[str]]:
    """Map network key -> file key, and list the file keys dropped as training-only / other copies.

    ``training=True`` keeps the training-only keys (the aux LQ-RGB head), which a training network has.
    """
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    has_prefix = any(k.startswith(PREFIX) for k in checkpoint.keys)
    for key in checkpoint.keys:
        if key.startswith(IGNORED_PREFIXES):
            dropped.append(key)
            continue
        name = key[len(PREFIX):] if has_prefix and key.startswith(PREFIX) else key
        if name.startswith(TRAINING_ONLY_PREFIXES) and not training:
            dropped.append(key)
            continue
        mapping[name] = key
    return mapping, dropped


@functools.lru_cache(maxsize=64)
def _expected_shapes(config: NetConfig, aux_head: bool = False) -> dict[str, tuple[int, ...]]:
    net = build_network(config, device="meta", aux_head=aux_head)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_keys(config: NetConfig, shapes: Mapping[str, tuple[int, ...]], *, aux_head: bool = False) -> list[str]:
    """Problems (missing / unexpected / wrong shape) of a network-key -> shape mapping for ``config``.

    ``aux_head=True`` checks against the training network (with the aux LQ-RGB head where the config has one).
    """
    return key_problems(_expected_shapes(config, aux_head), shapes)


def matching_presets(checkpoint: CheckpointFile) -> list[Preset]:
    """Released presets whose network has exactly this file's keys and shapes."""
    mapping, dropped = network_keys(checkpoint)
    shapes = {name: checkpoint.shapes[key] for name, key in mapping.items()}
    has_aux = any(k.removeprefix(PREFIX).startswith(TRAINING_ONLY_PREFIXES) for k in dropped)
    out = []
    for preset in PRESETS.values():
        if check_keys(preset.net, shapes):
            continue
        if preset.net.lq is not None and preset.net.lq.aux_rgb_head != has_aux:
            continue
        out.append(preset)
    return out


def detect_variant(checkpoint: CheckpointFile | str | os.PathLike) -> dict[str, Any]:
    """What can be told from a file's keys and shapes alone: family, latent channels, matching presets."""
    if not isinstance(checkpoint, CheckpointFile):
        checkpoint = open_checkpoint(checkpoint)
    mapping, dropped = network_keys(checkpoint)
    shape = lambda name: checkpoint.shapes.get(mapping.get(name, ""), None)
    info: dict[str, Any] = {"path": str(checkpoint.path), "keys": len(mapping), "dropped_keys": len(dropped)}
    conv = shape("lq_proj.latent_proj.0.weight")
    embed = shape("s_embedder.proj.weight")
    if embed is None or len(embed) < 2 or (conv is not None and len(conv) < 2):
        info["family"] = "unknown (no 2-D s_embedder.proj.weight: not a PiD / PixelDiT checkpoint)"
        return info
    info["hidden_size"] = embed[0]
    info["patch_depth"] = len({k.split(".")[1] for k in mapping if k.startswith("patch_blocks.")})
    if conv is None:
        info["family"] = "pixeldit"
    else:
        v15 = shape("pit_lq_gate.log_alpha") is not None
        info["family"] = "v1.5" if v15 else "v1"
        info["lq_conv_in_channels"] = conv[1]
        info["lq_hidden_dim"] = conv[0]
    candidates = matching_presets(checkpoint)
    info["presets"] = [p.name for p in candidates]
    if candidates and candidates[0].net.lq is not None:
        info["latent_channels"] = candidates[0].net.lq.latent_channels
        info["backbones"] = sorted({p.backbone for p in candidates})
    return info


# --------------------------------------------------------------------------- building and loading
def build_network(
    preset: str | Preset | NetConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype | str | None = None,
    *,
    aux_head: bool = False,
) -> PiDNet:
    """The un-loaded network of a preset (or config). On ``meta`` it allocates nothing.

    ``aux_head=True`` adds the training-only aux LQ-RGB head where the config has one (v1.5 teachers).
    """
    config = preset if isinstance(preset, NetConfig) else resolve_preset(preset).net
    with torch.device(device):
        net = PiDNet(config, aux_head=aux_head)
    if dtype is not None:
        net = net.to(parse_dtype(dtype))
    return net


def _resolve_config(
    checkpoint: CheckpointFile, config: NetConfig | Mapping | str | os.PathLike | None, preset: str | Preset | None
) -> tuple[NetConfig, Preset | None]:
    if config is not None:
        return load_net_config(config), resolve_preset(preset) if preset is not None else None
    if preset is not None:
        p = resolve_preset(preset)
        return p.net, p
    stored = checkpoint.config
    if stored is not None:
        name = checkpoint.preset_name
        return stored, PRESETS.get(name) if name else None
    candidates = matching_presets(checkpoint)
    if not candidates:
        info = detect_variant(checkpoint)
        raise ValueError(
            f"{checkpoint.path} does not match any released PiD preset (detected: {info.get('family')}, "
            f"hidden {info.get('hidden_size')}, LQ conv input channels {info.get('lq_conv_in_channels')}). "
            "For a self-trained network give its config: --config FILE.json on the command line, config= in the "
            "API (a NetConfig, a dict or a JSON file of the reference's network arguments)."
        )
    backbones = {p.backbone for p in candidates}
    nets = {p.net for p in candidates}
    if len(backbones) > 1 or len(nets) > 1:
        raise ValueError(
            f"{checkpoint.path} fits several presets whose files have identical keys and shapes: "
            + ", ".join(f"{p.alias} ({p.name})" for p in candidates)
            + ". Pass preset= in the API (--preset NAME on the command line) to say which latent space it was "
            "trained on."
        )
    return candidates[0].net, candidates[0]


def checkpoint_or_preset(
    source: str | os.PathLike | Preset | None, preset: str | Preset | None = None
) -> tuple[Path | None, Preset | None]:
    """What ``source`` names: a checkpoint file (by its suffix, or because it exists) or a preset; ``preset`` says
    what a file holds, or stands for ``source`` when that is None. A ValueError when neither names anything."""
    path: Path | None = None
    if isinstance(source, Preset):
        preset = source if preset is None else preset
    elif source is not None:
        candidate = Path(os.fspath(source))
        if candidate.suffix.lower() in (".pth", ".pt", *SAFETENSORS_SUFFIXES) or candidate.exists():
            path = candidate
        elif preset is None:
            preset = source
    if path is None and preset is None:
        raise ValueError("give a preset (e.g. 'flux-4k') or a checkpoint path")
    return path, resolve_preset(preset) if preset is not None else None


def load_network(
    checkpoint: str | os.PathLike | CheckpointFile,
    config: NetConfig | Mapping | str | os.PathLike | None = None,
    *,
    preset: str | Preset | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    training: bool = False,
) -> PiDNet:
    """Load a checkpoint into a `PiDNet` in eval mode, straight onto ``device`` in ``dtype``.

    ``config`` (a `NetConfig`, a dict of our or the reference's network arguments, or the path of such a JSON
    file) or ``preset`` say which network the file holds; without them it is read from our safetensors metadata
    or detected from the keys, which fails (naming the candidates) where released files are indistinguishable
    (FLUX.1 vs SD3 vs Qwen-Image). Every argument is checked before the file is read: a ``device`` that this
    machine does not have is a ValueError naming the ones it has; "auto" picks one (`devices.resolve_device`).

    ``training=True`` returns the network for training instead: float32 (``dtype`` must be float32), in train
    mode, every parameter requiring grad, its own memory (never a view of the file), and with the aux
    LQ-RGB head built and loaded from the file's ``lq_proj.lq_aux_rgb_head.*`` keys where the config has one
    (v1.5 teachers, ``*_undistilled``); then the file must have those keys. Inference, and training with a
    config without the head (``LQConfig.aux_rgb_head=False``, e.g. a distillation student), drop them.
    """
    dtype = parse_dtype(dtype)
    if training and dtype != torch.float32:
        raise ValueError(f"load_network(training=True) keeps float32 master weights; got dtype {dtype}. "
                         "Use autocast for bf16 compute.")
    device = resolve_device(device)
    if config is not None:
        config = load_net_config(config)
    ckpt = checkpoint if isinstance(checkpoint, CheckpointFile) else open_checkpoint(checkpoint)
    cfg, chosen = _resolve_config(ckpt, config, preset)
    aux = training and cfg.lq is not None and cfg.lq.aux_rgb_head
    mapping, dropped = network_keys(ckpt, training=aux)
    if dropped:
        logger.debug("ignoring %d keys not used at inference: %s", len(dropped), listing(dropped))
    shapes = {name: ckpt.shapes[key] for name, key in mapping.items()}
    problems = check_keys(cfg, shapes, aux_head=training)
    if problems:
        label = chosen.alias if chosen else "the given config"
        fits = [p.alias for p in matching_presets(ckpt)]
        hint = f" The file fits: {', '.join(fits)}." if fits else ""
        raise ValueError(f"{ckpt.path} does not match {label}: " + "; ".join(problems) + "." + hint)

    net = build_network(cfg, device="meta", aux_head=training)
    # Training updates parameters in place: they must not share memory with a memory-mapped file.
    state = {name: ckpt.tensor(key).to(device=device, dtype=dtype, copy=training) for name, key in mapping.items()}
    net.load_state_dict(state, strict=True, assign=True)
    del state
    for module in net.modules():  # norms and gate scalars stay float32 (see model.layers.Float32Params)
        if hasattr(module, "restore_float32"):
            module.restore_float32()
    net.requires_grad_(training)
    net.preset = chosen
    logger.info("loaded %s (%s, %.1f M parameters) as %s on %s", ckpt.path, cfg.family, count_parameters(net) / 1e6, dtype, device)
    return net.train(training)


def state_dict_for_release(net: PiDNet) -> dict[str, torch.Tensor]:
    """The network's tensors under the released key names (``net.<module path>``), aux head included if built.

    Detached, on the CPU, in the network's dtypes; the caller casts (the releases are bf16).
    """
    return {PREFIX + k: v.detach().cpu() for k, v in net.state_dict().items()}


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- writing
def save_safetensors(
    net: PiDNet, path: str | os.PathLike, *, preset: str | Preset | None = None, dtype: torch.dtype | str = torch.bfloat16
) -> Path:
    """Write the network as safetensors (reference key names, no prefix) with its config in the metadata."""
    from safetensors.torch import save_file

    dtype = parse_dtype(dtype)
    preset = preset if preset is not None else getattr(net, "preset", None)
    name = resolve_preset(preset).name if preset is not None else ""
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT, "config": net.config.to_json(), "preset": name}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    preset: str | Preset | None = None,
    config: NetConfig | Mapping | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
) -> Path:
    """Convert an official ``.pth`` (or any supported file) to bf16 safetensors with the config embedded."""
    net = load_network(source, config, preset=preset, dtype=dtype, device="cpu")
    return save_safetensors(net, target, preset=net.preset, dtype=dtype)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a checkpoint for `pid-decoder info`: variant, parameter count, dtypes, metadata."""
    ckpt = open_checkpoint(path)
    info = detect_variant(ckpt)
    mapping, _ = network_keys(ckpt)
    info["parameters"] = sum(_numel(ckpt.shapes[k]) for k in mapping.values())
    info["dtypes"] = sorted({str(ckpt.dtypes[k]).replace("torch.", "") for k in ckpt.keys})
    if ckpt.metadata.get("format") == FORMAT:
        info["stored_preset"] = ckpt.preset_name
        info["stored_config"] = json.loads(ckpt.metadata["config"])
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

