"""Device memory: what a new allocation can still get, the least a decode needs, and the out-of-memory error.

The pixel-pathway chunk that bounds a decode's activations is planned in `model.memory`; this module answers the
questions about the machine (free device memory, cgroup and ulimit limits) that the pipeline asks before and after
a decode.
"""

from __future__ import annotations

from pathlib import Path

import torch


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
