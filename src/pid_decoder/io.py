"""Files in and out of the CLI: input discovery, latent files, atomic image writes, side-by-side comparisons.

Latent files hold one latent, (B, C, h, w) or (C, h, w):
- ``.safetensors``: the tensor under the key ``latent``, or the file's only tensor;
- ``.pt`` / ``.pth``: a tensor, or a dict with ``latent`` / a single tensor (``torch.load(weights_only=True)``);
- ``.npy``: a numpy array.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

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
def read_image(path: str | os.PathLike):
    """Open an image fully (so a truncated or corrupt file fails here, not later)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.copy()


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
def load_latent(path: str | os.PathLike) -> torch.Tensor:
    """A latent file -> float32 (B, C, h, w) tensor on the CPU (3-D files get a batch axis)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                key = LATENT_KEY if LATENT_KEY in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(
                        f"{path} holds {len(keys)} tensors ({', '.join(keys[:5])}) and none is named {LATENT_KEY!r}; "
                        f"save the latent under the key {LATENT_KEY!r}"
                    )
                x = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling / zip errors all mean "unreadable"
            raise ValueError(f"{path} is not a readable torch file (weights_only): {str(err).splitlines()[0]}") from err
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
            if LATENT_KEY in tensors:
                obj = tensors[LATENT_KEY]
            elif len(tensors) == 1:
                obj = next(iter(tensors.values()))
            else:
                raise ValueError(f"{path} holds a dict without a {LATENT_KEY!r} tensor (keys {list(obj)[:5]})")
        if not torch.is_tensor(obj):
            raise ValueError(f"{path} does not hold a tensor (got {type(obj).__name__})")
        x = obj
    elif suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False).copy())
        except Exception as err:
            raise ValueError(f"{path} is not a readable .npy file: {err}") from err
    else:
        raise ValueError(f"{path}: unknown latent file type {suffix!r}; use {', '.join(LATENT_SUFFIXES)}")
    if not x.is_floating_point():
        raise ValueError(f"{path}: latent must be floating point, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]  # (1, C, h, w)
    if x.ndim != 4:
        raise ValueError(f"{path}: latent must be (B, C, h, w) or (C, h, w), got shape {tuple(x.shape)}")
    return x.float().contiguous()


def save_latent(latent: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a latent as safetensors under the key ``latent`` (atomically)."""
    from safetensors.torch import save_file

    tensor = latent.detach().to("cpu").contiguous()
    return atomic_write(path, lambda tmp: save_file({LATENT_KEY: tensor}, tmp))
