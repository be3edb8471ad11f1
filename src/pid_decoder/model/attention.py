"""The one home of rotary application and scaled-dot-product attention (and its CUDA kernel choice).

Legend: B batch, N tokens, h heads, d head dim.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from .positions import RopeTable

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

# Which fused kernel computes attention on CUDA, in order of preference (the first that supports the inputs
# runs). "auto" puts cuDNN's fused attention first: on Hopper it is the fastest for PiD's head sizes (64 and
# 72) at 2K-4K, where attention is most of the work (docs/performance.md). "torch" keeps PyTorch's own order.
_ORDERS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "math": ("MATH",),
}
_ORDERS["auto"] = _ORDERS["cudnn"]
ATTENTION_BACKENDS = ("auto", "torch", *sorted(k for k in _ORDERS if k != "auto"))
_SET_PRIORITY = sdpa_kernel is not None and "set_priority" in inspect.signature(sdpa_kernel).parameters
_cuda_order: list | None = None


def set_attention_backend(name: str = "auto") -> None:
    """Choose the CUDA attention kernel order: "auto" (cuDNN, then flash...), "cudnn", "flash", "efficient",
    "math", or "torch" (PyTorch's default order). Process-wide; CPU and MPS are not affected."""
    global _cuda_order
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "torch" or not _SET_PRIORITY:
        _cuda_order = None
        return
    available = set(SDPBackend.__members__)
    _cuda_order = [getattr(SDPBackend, b) for b in _ORDERS[name] if b in available]


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """Context in which `attention` on ``device`` uses the chosen kernel order (see `set_attention_backend`).

    Entered once per network evaluation (`PiDNet.denoise`), so compiled blocks are traced under it too.
    """
    if device.type != "cuda" or _cuda_order is None:
        return contextlib.nullcontext()
    return sdpa_kernel(_cuda_order, set_priority=True)


set_attention_backend("auto")


def apply_rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (B, N, h, d) in float32 by the table (N, d/2, 2).

    One complex multiplication per pair (a single elementwise kernel; the same products and sums as
    ``(x0 cos - x1 sin, x0 sin + x1 cos)``); written out on MPS, which has no complex arithmetic.
    """
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))  # (B, N, h, d/2, 2)
    if x.device.type == "mps":
        x0, x1 = pairs.unbind(-1)
        cos, sin = table[:, None, :, 0], table[:, None, :, 1]  # (N, 1, d/2)
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table)[:, None, :])
    return out.flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal, unmasked) attention. q (B, Nq, h, d), k/v (B, Nk, h, d) -> (B, Nq, h*d)."""
    dtype = v.dtype
    out = F.scaled_dot_product_attention(
        q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
    )  # (B, h, Nq, d)
    return out.transpose(1, 2).flatten(2)  # (B, Nq, h*d)
