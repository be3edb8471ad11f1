"""Position tables: 2-D RoPE (original / NTK-aware), 1-D text RoPE, per-pixel sin-cos embedding.

Every table depends only on sizes, so it is computed once per (size, device) and cached. The cached tables are
made outside inference mode, so one first computed while sampling still serves a training step's autograd.
"""

from __future__ import annotations

import functools

import torch

# (N, head_dim / 2, 2) float32: (cos, sin) of each rotation angle; `torch.view_as_complex` turns it into the
# unit complex numbers the pairs of a query/key are multiplied by.
RopeTable = torch.Tensor


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def rope_2d(
    grid_h: int, grid_w: int, head_dim: int, mode: str, ref_grid: tuple[int, int], device: torch.device
) -> RopeTable:
    """2-D RoPE for a ``grid_h x grid_w`` token grid, row-major.

    Pair ``2m`` rotates with the column position and frequency ``m``, pair ``2m + 1`` with the row.
    """
    theta_y = theta_x = 10000.0
    if mode == "ntk_aware":
        a = head_dim / 2
        exponent = a / (a - 2)
        # parity: NTK scaling is applied per axis, also for grids smaller than the reference.
        theta_y = 10000.0 * (grid_h / ref_grid[0]) ** exponent
        theta_x = 10000.0 * (grid_w / ref_grid[1]) ** exponent
    k = torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim
    freq_x = 1.0 / (theta_x**k)  # (d/4,)
    freq_y = 1.0 / (theta_y**k)
    # parity: positions span [0, 16] whatever the grid size (linspace, not integer indices).
    xs = torch.linspace(0, 16, grid_w)
    ys = torch.linspace(0, 16, grid_h)
    ang_x = torch.outer(xs, freq_x)  # (Wg, d/4)
    ang_y = torch.outer(ys, freq_y)  # (Hg, d/4)
    angle = torch.stack(
        [ang_x[None, :, :].expand(grid_h, -1, -1), ang_y[:, None, :].expand(-1, grid_w, -1)], dim=-1
    ).reshape(grid_h * grid_w, head_dim // 2)  # (Hg*Wg, d/2), interleaved x0, y0, x1, y1, ...
    return _table(angle, device)


def _table(angle: torch.Tensor, device: torch.device) -> RopeTable:
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1).to(device)  # (N, d/2, 2)


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)
def rope_1d(length: int, head_dim: int, theta: float, device: torch.device) -> RopeTable:
    """1-D RoPE for text positions ``0 .. length-1``."""
    freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angle = torch.outer(torch.arange(length, dtype=torch.float32), freq)  # (T, d/2)
    return _table(angle, device)


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)
def pixel_sincos(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """Separable halves of the per-pixel 2-D sin-cos embedding of the full image.

    Returns ``(col, row)`` with shapes (W, dim/2) and (H, dim/2); the embedding of pixel (i, j) is
    ``cat([col[j], row[i]])`` (column half first). Computed in float64, then cast, as the reference does;
    keeping the halves apart keeps memory O(H + W) instead of O(H * W).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)

    def half(n: int) -> torch.Tensor:
        out = torch.outer(torch.arange(n, dtype=torch.float64), omega)  # (n, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1).to(device=device, dtype=dtype)  # (n, dim/2)

    return half(width), half(height)
