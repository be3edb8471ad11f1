"""Tiled decode beyond one window (MultiDiffusion-style). Approximate; off by default.

Legend: B batch, H/W output pixels, th/tw tile pixels.

At every student step the network runs on overlapping windows of the current image; each window sees the
positions (RoPE, pixel sin-cos) and LQ features of the *full* image (`PiDNet.prepare(window=...)`), and the
per-window velocities are blended with smooth weights that ramp down across the overlaps and sum to one.
The blended velocity goes through the ordinary student update (`sampling.student_loop`), so the noise draws
are the same as `sample()`'s and a single tile covering the image reproduces `sample()` exactly.

Approximation: attention (patch and pixel pathways) only sees the tokens of one window, not the whole
image, so results differ from the exact decode; the blend hides seams. Use it when the exact path does not
fit in memory even with a small pixel-pathway chunk (the patch-block attention and the (B, L, D) residual
stream grow with the image, the chunked pixel pathway does not), e.g. 4K and above on small GPUs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model.net import Crop, PiDNet, Window
from .sampling import StepCallback, _initial_noise, _resolve_chunk, student_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """A ``height x width`` crop at pixel (top, left) of the full image."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def window(self, full_height: int, full_width: int) -> Window:
        return Window(self.top, self.left, full_height, full_width)


def _as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    return pair


def _starts(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Tile starts along one axis: stride ``tile - overlap`` (rounded down to ``multiple``), last tile flush."""
    if tile >= length:
        return [0]
    stride = (tile - overlap) // multiple * multiple
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def plan_tiles(
    height: int, width: int, tile: int | Sequence[int], overlap: int | Sequence[int], multiple: int = 16
) -> list[Tile]:
    """Overlapping tiles covering a ``height x width`` image, row-major.

    Tiles are ``tile`` (clipped to the image) pixels; neighbours overlap by at least ``overlap`` pixels (the
    last tile of a row/column is moved back flush with the edge, so its overlap can be larger). Offsets and
    sizes are multiples of ``multiple`` (the patch size), which ``height``, ``width`` and ``tile`` must be.
    """
    th, tw = _as_pair(tile, "tile")
    oh, ow = _as_pair(overlap, "overlap")
    for name, v in (("height", height), ("width", width), ("tile height", th), ("tile width", tw)):
        if v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {v}")
    th, tw = min(th, height), min(tw, width)
    for axis, length, t, o in (("height", height, th, oh), ("width", width, tw, ow)):
        needs_stride = t < length
        if o < 0 or (needs_stride and t - o < multiple):
            raise ValueError(
                f"overlap {o} px along the {axis} does not fit tiles of {t} px: the overlap must be >= 0 and at "
                f"most tile - {multiple} (the tiles must advance by at least one patch)"
            )
    return [Tile(top, left, th, tw) for top in _starts(height, th, oh, multiple) for left in _starts(width, tw, ow, multiple)]


def _ramp(length: int, lead: int, trail: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 inside, a raised-cosine ramp of ``lead``/``trail`` pixels at each end (>0 everywhere). (length,)"""
    w = torch.ones(length, dtype=dtype, device=device)
    for n, flip in ((lead, False), (trail, True)):
        n = min(n, length)
        if n > 0:
            r = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)  # (n,) in (0, 1)
            r = r.to(dtype=dtype, device=device)
            if flip:
                w[length - n:] *= r.flip(0)
            else:
                w[:n] *= r
    return w


def blend_weights(
    tiles: Sequence[Tile], height: int, width: int, overlap: tuple[int, int], device: torch.device
) -> list[torch.Tensor]:
    """Per-tile blend weights (th, tw), float32, normalised to sum to one at every pixel.

    Each tile ramps down over ``overlap`` pixels on the sides where it has a neighbour (not at the image
    border), so a pixel covered by one tile has weight exactly 1.
    """
    total = torch.zeros(height, width, dtype=torch.float32, device=device)
    raw = []
    for t in tiles:
        wy = _ramp(t.height, overlap[0] if t.top > 0 else 0, overlap[0] if t.top + t.height < height else 0,
                   torch.float32, device)
        wx = _ramp(t.width, overlap[1] if t.left > 0 else 0, overlap[1] if t.left + t.width < width else 0,
                   torch.float32, device)
        w = wy[:, None] * wx[None, :]  # (th, tw)
        total[t.slices] += w
        raw.append(w)
    return [w / total[t.slices] for w, t in zip(raw, tiles)]


@torch.inference_mode()
def sample_tiled(
    net: PiDNet,
    lq_latent: torch.Tensor,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor | float,
    *,
    height: int,
    width: int,
    tile: int | Sequence[int],
    overlap: int | Sequence[int] = 128,
    steps: int = 4,
    mode: str = "sde",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    clamp: bool = True,
    chunk: int | None = None,
    max_memory: int | str | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Approximate tiled student decode -> (B, 3, height, width) float32 in [-1, 1].

    Same arguments as `sampling.sample` (``chunk``/``max_memory`` apply to one window), plus ``tile``
    (pixels, int or (th, tw), multiples of the patch size) and ``overlap`` (pixels, int or (oh, ow)). Peak
    activation memory is that of one ``tile``-sized window; the image, the velocity, the LQ trunk's tokens and
    the position tables are full-size (a few bytes per pixel). See the module docstring.
    """
    if net.config.lq is None:
        raise ValueError("sample_tiled() is the PiD student sampler; PixelDiT has no latent input")
    if mode not in ("sde", "ode"):
        raise ValueError(f"mode must be 'sde' or 'ode', got {mode!r}")
    ps = net.config.patch_size
    tiles = plan_tiles(height, width, tile, overlap, multiple=ps)
    overlap_hw = _as_pair(overlap, "overlap")
    # Step-independent work, once per image: conditioning per window (full-image positions; the text embedding
    # and the LQ trunk run once). The per-token LQ heads run per window and step (lazy_lq), so the LQ features
    # of only one window exist at a time: memory follows the tile, not the image.
    conds = net.prepare_windows(
        text, lq_latent, degrade_sigma, height, width, [Crop(t.top, t.left, t.height, t.width) for t in tiles],
        lazy_lq=len(tiles) > 1,
    )
    log.info("tiled decode %dx%d: %d tiles of %dx%d, overlap %s", height, width, len(tiles),
             tiles[0].height, tiles[0].width, overlap_hw)
    chunk = _resolve_chunk(net, conds[0], chunk, max_memory)  # per window: the largest tile's tokens
    device = net.device
    weights = blend_weights(tiles, height, width, overlap_hw, device)
    shape = (conds[0].batch, net.config.in_channels, height, width)
    x = _initial_noise(noise, shape, generator, device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x)  # (B, 3, H, W)
        for tile_, cond, w in zip(tiles, conds, weights):
            rows, cols = tile_.slices
            v[..., rows, cols] += w * net.denoise(x[..., rows, cols], t, cond, chunk=chunk)  # (B, 3, th, tw)
        return v

    return student_loop(denoise, x, steps, mode=mode, generator=generator, step_noise=step_noise, clamp=clamp,
                        callback=callback)
