"""Choosing the pixel-pathway chunk (patch tokens processed at once) from a memory budget.

Everything in the pixel pathway except its attention acts on each patch separately, so its activation memory
is ``chunk x bytes_per_token`` instead of growing with the image. The persistent tensors (the pixel stream,
the patch conditions) still scale with the number of pixels: memory grows linearly, never quadratically.
"""

from __future__ import annotations

import re

import torch

from ..config import NetConfig

# On CPUs, chunks of a few hundred patch tokens keep the per-pixel modulation GEMM (D -> 6*P*C outputs)
# and its elementwise work in cache; measured faster than one big pass (docs/performance.md).
CPU_CHUNK = 256
# On CUDA a chunk of a few thousand patch tokens (a million pixel rows per GEMM) already fills the GPU; larger
# chunks only add memory (measured in docs/performance.md), so the automatic choice never exceeds this.
CUDA_CHUNK = 4096
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(value: float | str) -> int:
    """Bytes from ``4GB``, ``512MiB``, ``1.5g`` or a number of bytes."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory budget must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory budget {value!r}; use e.g. 4GB, 512MB or a number of bytes")
    return parse_memory(float(match.group(1)) * _UNITS[match.group(2).lower()])


def pixel_bytes_per_token(config: NetConfig, dtype: torch.dtype) -> int:
    """Peak activation bytes per patch token inside a pixel block (modulation, norms, MLP temporaries)."""
    elems = config.pixels_per_patch * config.pixel_hidden_size  # per-token pixel features (P*C)
    item = torch.finfo(dtype).bits // 8
    # 4 modulation chunks + MLP hidden (2 x 4C) in the compute dtype; residual, norm and modulation temporaries
    # in float32.
    return elems * (12 * item + 24)


def persistent_bytes(config: NetConfig, tokens: int) -> int:
    """Bytes that live across the whole pixel pathway: float32 pixel stream, conditions, compressed tokens."""
    per_token = config.pixels_per_patch * config.pixel_hidden_size * 4 + config.hidden_size * 4
    per_token += 3 * config.pixel_attn_hidden_size * 4
    return tokens * per_token


def choose_chunk(
    config: NetConfig, tokens: int, device: torch.device, dtype: torch.dtype, max_memory: int | str | None = None
) -> int | None:
    """Patch tokens per pixel-pathway chunk (None = all at once) for ``tokens = batch * patch tokens``."""
    per_token = pixel_bytes_per_token(config, dtype)
    if max_memory is None:
        if device.type != "cuda":
            return CPU_CHUNK if tokens > CPU_CHUNK else None
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8) - persistent_bytes(config, tokens)
    else:
        budget = parse_memory(max_memory) - persistent_bytes(config, tokens)
    chunk = max(1, budget // per_token)
    if device.type == "cuda":
        chunk = min(chunk, CUDA_CHUNK)
    return None if chunk >= tokens else int(chunk)
