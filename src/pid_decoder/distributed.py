"""Data parallelism for the CLI under ``torchrun``: every rank takes items ``rank::world`` of the sorted inputs.

Nothing here is needed for a single process: without ``WORLD_SIZE > 1`` in the environment `init` returns a
one-rank context and touches no process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def shard(self, n: int) -> list[int]:
        """Indices of the ``n`` (sorted) items this rank processes."""
        return list(range(self.rank, n, self.world))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def init(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl for CUDA, gloo otherwise."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Context()
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and str(device) in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("rank %d of %d (local %d), backend %s", rank, world, local_rank, backend)
    return Context(rank, world, local_rank, backend)


def rank_device(device: str, ctx: Context) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for "auto"/"cuda" under torchrun with CUDA, else as given."""
    if ctx.enabled and ctx.backend == "nccl" and str(device) in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    return device


def total(ctx: Context, counts: list[int]) -> list[int]:
    """Sum integer counters over all ranks (identity without a process group)."""
    if not ctx.enabled:
        return counts
    import torch.distributed as dist

    device = f"cuda:{ctx.local_rank}" if ctx.backend == "nccl" else "cpu"
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def finish(ctx: Context) -> None:
    """Barrier, then leave the process group."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
