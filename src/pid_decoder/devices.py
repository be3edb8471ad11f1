"""Devices, dtypes and seeds: what the CLI, the web app, the pipeline and training resolve "auto" to, and the checks
that refuse a device this machine lacks or a seed a generator cannot take, before any model is loaded."""

from __future__ import annotations

from typing import Any

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds


def check_device(device: str | torch.device | None) -> None:
    """Raise ValueError unless ``device`` is "auto" or a device this machine has (cpu, cuda[:N], mps)."""
    if device is None:
        return
    text = str(device).strip()
    if text == "auto":
        return
    if not text:
        raise ValueError("device is empty; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {text!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} requested but CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {text!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device {text!r} requested but MPS (Apple GPU) is not available on this machine; use 'cpu'"
            )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; else a device this machine has (`check_device`)."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(device)
    return torch.device(str(device).strip()) if not isinstance(device, torch.device) else device


def check_seed(seed: Any, count: int = 1, name: str = "seed") -> int:
    """``seed`` as an int, checked so that ``seed .. seed + count - 1`` are all valid generator seeds."""
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a whole number in [0, 2**64 - 1], got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX - max(count - 1, 0):
        last = f" (item seeds run up to {name} + {count - 1})" if count > 1 else ""
        raise ValueError(f"{name} must be in [0, 2**64 - 1]{last}, got {seed}")
    return seed


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; "bf16" / "fp32" (and torch dtypes) as given."""
    from .checkpoints import parse_dtype

    if dtype is None or str(dtype) == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def resolve_noise_device(noise_device: str | torch.device, device: torch.device) -> torch.device:
    """"auto" -> ``device`` when it is CUDA (the reference's generator), else cpu; else that device."""
    if str(noise_device) == "auto":
        return device if device.type == "cuda" else torch.device("cpu")
    dev = torch.device(noise_device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"noise device must be 'auto', 'cpu' or a CUDA device, got {str(noise_device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"noise device {str(noise_device)!r} requested but CUDA is not available")
    return dev
