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
from typing import TYPE_CHECKING

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
