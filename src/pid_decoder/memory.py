"""Device memory: what a new allocation can still get, the least a decode needs, and what to do when it runs out.

The pixel-pathway chunk that bounds a decode's activations is planned in `model.memory`; this module answers the
questions about the machine (free device memory, cgroup and ulimit limits) that the pipeline asks before a decode
(`check_output_memory`), and holds its policy when a decode runs out of memory (`retry_with_half_chunk`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PiDOutOfMemoryError(RuntimeError):
    """A decode does not fit in the memory of its device (also after one retry with half the pixel chunk).

    ``height``/``width`` are the output size, ``device`` where it ran; ``needed``/``available`` (bytes) are set when
    the up-front check refused it.
    """

    def __init__(self, message: str, *, height: int, width: int, device: torch.device, needed: int | None = None,
                 available: int | None = None):
        super().__init__(message)
        self.height, self.width, self.device = height, width, device
        self.needed, self.available = needed, available


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation can still get on ``device`` (None when unknown).

    CUDA: the free device memory. CPU: the smallest of the kernel's MemAvailable, the cgroup's limit minus its
    usage (containers) and the address-space limit (``ulimit -v``) minus the process's size.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        limit, usage = (cg / "memory.max").read_text().strip(), (cg / "memory.current").read_text().strip()
        if limit != "max":
            limits.append(max(int(limit) - int(usage), 0))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            size = 0
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmSize:"):
                        size = int(line.split()[1]) * 1024
            limits.append(max(soft - size, 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def minimum_memory(height: int, width: int, batch: int = 1) -> int:
    """A lower bound of the activation memory of one decode of ``height x width``: whatever the chunk or tiling,
    the student loop holds the image, its velocity, its x0 estimate and the step noise (float32, 3 channels)."""
    return 4 * batch * 3 * height * width * 4


def check_output_memory(height: int, width: int, device: torch.device) -> None:
    """Refuse (`PiDOutOfMemoryError`) an output whose unavoidable tensors cannot fit in the memory of ``device``."""
    available = available_memory(device)
    if available is None:
        return
    needed = minimum_memory(height, width)
    if needed > available:
        raise PiDOutOfMemoryError(
            f"an output of {width}x{height} needs at least {gib(needed)} on {device} for the image "
            f"tensors alone, but only {gib(available)} is available; decode a smaller output (upscale: "
            f"scale=, size=, long_edge=; decode: a smaller latent) or use a device with more memory "
            f"(max_memory= and tile= bound the network's activations, not these tensors)",
            height=height, width=width, device=device, needed=needed, available=available,
        )


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def retry_with_half_chunk(
    decode: Callable[[int | None], T],
    chunk: int | None,
    auto_chunk: Callable[[], int],
    *,
    height: int,
    width: int,
    device: torch.device,
) -> T:
    """``decode(chunk)``; after an out-of-memory error, once more with half the pixel-pathway chunk.

    The chunk only changes float rounding, so the retry gives the same image for the same seed. ``auto_chunk()``
    is the chunk the sampler chose by itself (``chunk`` None). A second out-of-memory error is a
    `PiDOutOfMemoryError` that names the options bounding memory; any other error passes through.
    """
    try:
        return decode(chunk)
    except Exception as err:
        if not is_oom(err):
            raise
        first = err
    used = chunk if chunk is not None else auto_chunk()
    half = max(1, used // 2)
    _empty_cache(device)
    logger.warning("out of memory decoding %dx%d on %s with a pixel chunk of %d patch tokens (%s); retrying "
                   "once with half the chunk (%d)", width, height, device, used,
                   str(first).splitlines()[0] if str(first) else type(first).__name__, half)
    try:
        return decode(half)
    except Exception as err:
        if not is_oom(err):
            raise
        _empty_cache(device)
        raise PiDOutOfMemoryError(
            f"out of memory decoding {width}x{height} on {device}, also with half the pixel chunk ({half} "
            "patch tokens); pass a smaller max_memory= budget, tile= for the approximate tiled decode, or decode "
            "a smaller output",
            height=height, width=width, device=device,
        ) from err
