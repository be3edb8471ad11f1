"""Files in and out of the CLI: input discovery, latent files, atomic image writes, side-by-side comparisons.

Latent files hold one latent, (B, C, h, w) or (C, h, w):
- ``.safetensors``: the tensor under the key ``latent``, or the file's only tensor;
- ``.pt`` / ``.pth``: a tensor, or a dict with ``latent`` / a single tensor (``torch.load(weights_only=True)``);
- ``.npy``: a numpy array.

Errors: a missing file raises FileNotFoundError, an unreadable one PermissionError (or IsADirectoryError), and
anything wrong with the content (not the format, truncated, Python objects, empty batch, NaN/inf) ValueError;
each message names the file, what was wrong and what would be right.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .backbones.images import _to_rgb8

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
LATENT_KEY = "latent"


@dataclass(frozen=True)
class Item:
    """One input file and the output path stem it maps to (relative, without suffix)."""

    path: Path
    rel: Path  # e.g. "sub/photo" for DIR/sub/photo.jpg


def collect_inputs(paths: list[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Item]:
    """Files given directly, plus every file with one of ``suffixes`` under given folders (recursively).

    Folder inputs keep their relative paths; the list is sorted so that every rank of a distributed run sees
    the same order. Raises FileNotFoundError for a path that does not exist and ValueError when two inputs
    would write the same output.
    """
    items: list[Item] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            found = [f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts)]
            if not found:
                logger.warning("no %s files under %s", "/".join(suffixes), p)
            items.extend(Item(f, f.relative_to(p).with_suffix("")) for f in found)
        elif p.is_file():
            items.append(Item(p, Path(p.stem)))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    items.sort(key=lambda it: (str(it.rel), str(it.path)))
    seen: dict[Path, Path] = {}
    for it in items:
        if it.rel in seen:
            raise ValueError(f"inputs {seen[it.rel]} and {it.path} would both write {it.rel}.*; rename one of them")
        seen[it.rel] = it.path
    return items


# --------------------------------------------------------------------------- images
def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path, after checking it is an existing, readable, regular file (else the matching OSError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise PermissionError(
            f"{what} {path} exists but cannot be read (permission denied); check its permissions"
        ) from None
    return path


def read_image(path: str | os.PathLike):
    """Open an image fully (so a truncated or corrupt file fails here, not later).

    Raises FileNotFoundError / PermissionError / IsADirectoryError for the file itself and ValueError when it is
    not a complete image (unknown format, truncated, empty, too many pixels).
    """
    from PIL import Image

    path = check_readable(path, "image")
    if path.stat().st_size == 0:
        raise ValueError(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                image = im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image {path} is too large to open safely: {err}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"image {path} cannot be read (not a complete PNG/JPEG/WebP/...: {detail})") from None
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {path} has no pixels ({image.width}x{image.height})")
    return image


def check_image(image, path: str | os.PathLike = "image", min_side: int = 16) -> None:
    """Raise ValueError unless ``image`` converts to RGB and both sides are at least ``min_side`` pixels."""
    w, h = image.size
    if w < min_side or h < min_side:
        raise ValueError(
            f"{path}: image of {w}x{h} (WxH) is smaller than {min_side}x{min_side}, the smallest input the VAE "
            "takes; use a larger image or ask for an output size (--size / --long-edge / --scale)"
        )
    try:
        _to_rgb8(image.crop((0, 0, 1, 1)))
    except Exception as err:
        raise ValueError(f"{path}: image mode {image.mode!r} cannot be converted to RGB ({err})") from None


def save_image(image, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a PIL image atomically (temporary file + rename); JPEG/WebP at quality 95 like the reference."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    kwargs = {"quality": 95} if fmt in ("jpg", "webp") else {}
    return atomic_write(path, lambda tmp: image.save(tmp, format=FORMATS[fmt], **kwargs))


def compare_image(baseline, result, labels: tuple[str, str] = ("VAE decode", "PiD")):
    """Side by side: the native decode (resized to the PiD size, nearest) and the PiD output, each labelled."""
    from PIL import Image, ImageDraw

    w, h = result.size
    left = baseline.resize((w, h), Image.NEAREST) if baseline.size != (w, h) else baseline
    canvas = Image.new("RGB", (2 * w, h), (0, 0, 0))
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(result.convert("RGB"), (w, 0))
    draw = ImageDraw.Draw(canvas)
    size = max(10, h // 32)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 has no sized default font
        font = None
    for x0, text in ((0, labels[0]), (w, labels[1])):
        box = draw.textbbox((x0 + 4, 4), text, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((x0 + 4, 4), text, fill=(255, 255, 255), font=font)
    return canvas


# --------------------------------------------------------------------------- latents
def _torch_load_error(path: Path, err: BaseException) -> ValueError:
    """A sentence for why ``torch.load(weights_only=True)`` refused a file."""
    import re

    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return ValueError(
            f"{path} holds Python objects other than tensors ({found.group(1)}); they are not loaded because "
            "unpickling them could run code. Save the latent as a plain tensor (torch.save(tensor, path)) or as "
            ".safetensors"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Unsupported operand" in ln or "zip archive" in ln), "")
    if not detail and lines and not lines[0].startswith("Weights only load failed") and len(lines[0]) < 160:
        detail = lines[0]
    detail = f" ({detail})" if detail else f" ({type(err).__name__})"
    return ValueError(
        f"{path} is not a readable torch file: corrupt, truncated or not written by torch.save{detail}"
    )


def _read_tensor(path: Path) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                key = LATENT_KEY if LATENT_KEY in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(
                        f"{path} holds {len(keys)} tensors ({', '.join(keys[:5]) or 'none'}) and none is named "
                        f"{LATENT_KEY!r}; save the latent under the key {LATENT_KEY!r}"
                    )
                return f.get_tensor(key)
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for malformed files
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated: {detail})") from None
    if suffix in (".pt", ".pth"):
        try:
            with warnings.catch_warnings():  # torch warns about old pickle protocols: not the user's concern here
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling / zip errors all mean "unreadable"
            raise _torch_load_error(path, err) from None
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
            if LATENT_KEY in tensors:
                obj = tensors[LATENT_KEY]
            elif len(tensors) == 1:
                obj = next(iter(tensors.values()))
            else:
                raise ValueError(
                    f"{path} holds a dict without a {LATENT_KEY!r} tensor (keys {[str(k) for k in list(obj)[:5]]}); "
                    f"save the latent under the key {LATENT_KEY!r}"
                )
        if not torch.is_tensor(obj):
            raise ValueError(f"{path} does not hold a tensor (got {type(obj).__name__}); save the latent tensor itself")
        return obj
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a readable .npy file ({detail}); save it with numpy.save") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
            raise ValueError(f"{path}: a latent must be a numeric array, got dtype {getattr(array, 'dtype', '?')}")
        try:
            return torch.from_numpy(array.copy())
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: dtype {array.dtype} cannot be a latent ({err})") from None
    raise ValueError(f"{path}: unknown latent file type {suffix!r}; use {', '.join(LATENT_SUFFIXES)}")


def load_latent(path: str | os.PathLike) -> torch.Tensor:
    """A latent file -> float32 (B, C, h, w) tensor on the CPU (3-D files get a batch axis).

    Refused (ValueError): unknown or broken files, non-tensors, non-float data, other ranks, an empty batch or
    grid, NaN or infinite values. FileNotFoundError / PermissionError / IsADirectoryError for the file itself.
    """
    path = check_readable(path, "latent file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    x = _read_tensor(path)
    if not x.is_floating_point() or x.is_complex():
        raise ValueError(f"{path}: latent must be floating point, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]  # (1, C, h, w)
    if x.ndim != 4:
        raise ValueError(f"{path}: latent must be (B, C, h, w) or (C, h, w), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: the latent batch is empty (shape {tuple(x.shape)}); the file holds no latent")
    if x.numel() == 0:
        raise ValueError(f"{path}: the latent is empty (shape {tuple(x.shape)}); C, h and w must be >= 1")
    x = x.float().contiguous()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{path}: the latent contains {bad} NaN or infinite value(s); it cannot be decoded")
    return x


def save_latent(latent: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a latent as safetensors under the key ``latent`` (atomically)."""
    from safetensors.torch import save_file

    tensor = latent.detach().to("cpu").contiguous()
    return atomic_write(path, lambda tmp: save_file({LATENT_KEY: tensor}, tmp))


def parse_resolution(text: str | int) -> tuple[int, int]:
    """"N", "W,H" or "WxH" in pixels -> (W, H); a ValueError saying the accepted forms otherwise."""
    try:
        parts = [int(v) for v in str(text).strip().lower().replace("x", ",").split(",")]
    except ValueError:
        raise ValueError(f"must be N or W,H in pixels, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ValueError(f"must be N or W,H with positive sizes, got {text!r}")
    return parts[0], parts[1]
