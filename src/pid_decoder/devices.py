"""Devices, dtypes and seeds: what the CLI, the web app, the pipeline and training resolve "auto" to, and the checks
that refuse a device this machine lacks or a seed a generator cannot take, before any model is loaded."""

from __future__ import annotations

import numbers
from typing import Any

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")
DEVICE_NAMES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The device names this machine can run on, e.g. ["cpu", "cuda:0", "cuda:1"]."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device this machine has (cpu, cuda[:N], mps); None for "auto" (or None), which
    `resolve_device` settles. Anything else is a ValueError that names the devices there are."""
    if device is None:
        return None
    text = str(device).strip()
    if text == "auto":
        return None
    devices = ", ".join(available_devices())
    names = f"use one of {devices} or 'auto' (device names: {DEVICE_NAMES})"
    if not text:
        raise ValueError(f"device is empty (unknown device ''); {names}")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {text!r}; {names}")
    fallback = f"Available devices: {devices}; use 'cpu' (CLI: --device cpu, API: device=\"cpu\")"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {text!r} requested but CUDA is not available on this machine ({why}). {fallback}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {text!r} does not exist: this machine has {count} CUDA device(s). Available devices: {devices}"
            )
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {text!r} requested but MPS (Apple GPU) is not available on this machine. {fallback}")
    return dev


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda if available, else mps, else cpu; else a device this machine has (`check_device`)."""
    dev = check_device(device)
    if dev is not None:
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if _mps_available() else torch.device("cpu")


def check_seed(seed: Any, count: int = 1, name: str = "seed") -> int:
    """``seed`` as an int, checked so that ``seed .. seed + count - 1`` are all valid generator seeds."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a whole number in [0, 2**64 - 1], got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX - max(count - 1, 0):
        last = f" (item seeds run up to {name} + {count - 1})" if count > 1 else ""
        raise ValueError(f"{name} must be in [0, 2**64 - 1]{last}, got {seed}")
    return seed


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype from its name (fp32, bf16, fp16 and their long names) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return _DTYPES[str(dtype).lower()]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; "bf16" / "fp32" (and torch dtypes) as given."""
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
