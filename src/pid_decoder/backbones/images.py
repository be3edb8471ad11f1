"""PIL image -> (1, 3, H, W) tensor in [-1, 1], centre-cropped to a multiple (pipelines.md §1).

Mode handling: every mode becomes 8-bit RGB first.
- L, P, CMYK, YCbCr, ...: PIL's own RGB conversion (a palette with transparency is treated like RGBA).
- LA, RGBA, PA: alpha is composited over white, so transparent areas decode as white paper
  rather than whatever colour the hidden pixels happen to hold.
- I;16 / I;16B / I;16L / I (16-bit or 32-bit integer grey): scaled by 255/65535 and rounded, so full-range
  16-bit white stays white (PIL's own convert("L") would clip it at 255).
- F (float grey): assumed in [0, 1] when its maximum is <= 1, else in [0, 255].
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


def _to_rgb8(image) -> Image.Image:
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr  # 8-bit values stored as 32-bit integers
        else:
            scaled = arr * (255.0 / 65535.0)
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("LA", "PA", "RGBa", "La"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image, multiple: int = 16) -> torch.Tensor:
    """A PIL image -> float32 (1, 3, H, W) in [-1, 1] (x = u8 / 127.5 − 1), centre-cropped to `multiple`.

    The crop matches the reference: new side = multiple·floor(side / multiple), left = (w − new_w) // 2,
    top = (h − new_h) // 2; nothing is resized. Pass `backbone.image_multiple`. Non-RGB modes are
    converted as described in this module's docstring (alpha composited over white).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"image_to_tensor expects a PIL.Image.Image, got {type(image).__name__}")
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    w, h = image.size
    new_w, new_h = (w // multiple) * multiple, (h // multiple) * multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(f"image of {w}x{h} (WxH) is smaller than the required multiple of {multiple} pixels")
    rgb = _to_rgb8(image)
    if (new_w, new_h) != (w, h):
        left, top = (w - new_w) // 2, (h - new_h) // 2
        rgb = rgb.crop((left, top, left + new_w, top + new_h))
        logger.debug("centre-cropped %dx%d to %dx%d", w, h, new_w, new_h)
    arr = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (3, H, W)
    return (x / 127.5 - 1.0).unsqueeze(0)  # (1, 3, H, W)


def tensor_to_image(x: torch.Tensor):
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> 8-bit RGB PIL image, truncating like the reference's saver."""
    from PIL import Image

    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_image takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_image expects (3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)  # parity: truncation, not rounding
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def plan_upscale_size(
    image_size: tuple[int, int],
    *,
    preset_scale: int,
    multiple: int = 16,
    scale: int | None = None,
    size: tuple[int, int] | None = None,
    long_edge: int | None = None,
) -> tuple[tuple[int, int] | None, tuple[int, int], str]:
    """Where an upscale's input must be resized for the requested output (all sizes W x H).

    At most one of ``scale`` (output = input x scale, 1 .. preset_scale: 2 on a 4x preset runs the 4x decoder on
    a half-size input), ``size`` (output W x H) and ``long_edge`` (output long side, aspect kept). The output is
    snapped to the nearest multiple of ``multiple x preset_scale`` (what the preset can produce).

    Returns (input size to resize to, or None for the reference's plain centre-crop; output size; a message when
    the request was snapped, else "").
    """
    given = [n for n, v in (("scale", scale), ("size", size), ("long_edge", long_edge)) if v is not None]
    w, h = image_size
    if not given:
        crop = (w // multiple * multiple, h // multiple * multiple)
        return None, (crop[0] * preset_scale, crop[1] * preset_scale), ""
    if len(given) > 1:
        raise ValueError(f"give at most one of scale, size and long_edge, got {', '.join(given)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= preset_scale:
            raise ValueError(f"scale must be a whole number in 1..{preset_scale} (this preset's factor), got {scale!r}")
        want = (w * scale, h * scale)
    elif size is not None:
        want = tuple(size)
        if len(want) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in want):
            raise ValueError(f"size must be a (width, height) pair of positive ints, got {size!r}")
    else:
        if isinstance(long_edge, bool) or not isinstance(long_edge, int) or long_edge <= 0:
            raise ValueError(f"long_edge must be a positive int, got {long_edge!r}")
        want = (long_edge, round(long_edge * h / w)) if w >= h else (round(long_edge * w / h), long_edge)
    step = multiple * preset_scale
    out = tuple(max(step, round(v / step) * step) for v in want)
    message = ""
    if out != want:
        message = (f"requested output {want[0]}x{want[1]} snapped to {out[0]}x{out[1]} (this preset produces "
                   f"multiples of {step} px)")
    return (out[0] // preset_scale, out[1] // preset_scale), out, message


def upscale_inputs(images: Any) -> list:
    """`PiDPipeline.upscale`'s ``images``, a PIL image or a list of them, as a non-empty list."""
    from PIL import Image

    images = [images] if isinstance(images, Image.Image) else list(images)
    if not all(isinstance(im, Image.Image) for im in images):
        raise ValueError("upscale takes a PIL image or a list of PIL images")
    if not images:
        raise ValueError("upscale got an empty list of images; give at least one")
    return images


def plan_upscale(image: Any, *, preset_scale: int, multiple: int, **request: Any) -> tuple[tuple[int, int] | None,
                                                                                       tuple[int, int]]:
    """`plan_upscale_size` for one PIL image (``request``: scale, size or long_edge), refusing an image smaller than
    ``multiple`` and logging a snapped request as a warning. Returns (input size to resize to or None, output size).
    """
    resize, out_size, message = plan_upscale_size(image.size, preset_scale=preset_scale, multiple=multiple, **request)
    if out_size[0] <= 0 or out_size[1] <= 0:
        raise ValueError(
            f"image of {image.size[0]}x{image.size[1]} (WxH) is smaller than the required multiple of {multiple} pixels"
        )
    if message:
        logger.warning("%s", message)
    return resize, out_size


def resize_cover(image: Any, size: tuple[int, int]) -> Any:
    """Resize (Lanczos) a PIL image to cover ``size`` (W, H) keeping its aspect, then centre-crop to exactly it."""
    from PIL import Image

    rgb = _to_rgb8(image)
    w, h = rgb.size
    factor = max(size[0] / w, size[1] / h)
    cover = (max(size[0], round(w * factor)), max(size[1], round(h * factor)))
    if cover != (w, h):
        rgb = rgb.resize(cover, Image.LANCZOS)
    left, top = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    return rgb.crop((left, top, left + size[0], top + size[1]))
