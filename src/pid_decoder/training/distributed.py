"""One code path for one process, DDP and FSDP2: process group, model wrapping, activation checkpointing.

    info = init_distributed("auto")                     # torchrun env: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    model = wrap_model(net, "fsdp", checkpointing=True, info=info)
    losses = teacher_losses(model, ...)                 # runs through the DDP / FSDP2 forward hooks
    unwrap(model)                                       # the PiDNet (FSDP2: its parameters are DTensor shards)

Everything is applied from outside the network: `fully_shard` per transformer block and on the root, DDP around
`TrainingForward` (whose ``forward`` is ``net.forward_train``), and activation checkpointing by wrapping each block's ``forward`` in
``torch.utils.checkpoint.checkpoint``, so parameter names never change. ``gloo`` on CPU, ``nccl`` on CUDA.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ..devices import check_device

logger = logging.getLogger(__name__)

Mode = Literal["single", "ddp", "fsdp"]
MODES = ("single", "ddp", "fsdp")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``backend`` is None without a process group (one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTROL_GROUP: Any = None  # a gloo group for host-side flags (stop requests) that never touches the GPU stream


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is present, else ``cpu`` (training skips MPS); ``cuda`` ->
    ``cuda:LOCAL_RANK``; else a device this machine has (`pid_decoder.devices.check_device`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device is 'cuda' but CUDA is not available; use run.device = \"cpu\" or \"auto\"")
        return torch.device("cuda", local_rank)
    try:
        return check_device(device)
    except ValueError as err:
        raise ValueError(f"run.device: {err}") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else return a one-process `DistInfo`.

    The backend is ``nccl`` for CUDA devices and ``gloo`` otherwise; the CUDA device is ``cuda:LOCAL_RANK``.
    """
    global _CONTROL_GROUP
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _CONTROL_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    logger.info("rank %d of %d (local %d) on %s, backend %s", rank, world, local_rank, dev, backend)
    return DistInfo(rank, world, local_rank, dev, backend)


def shutdown(info: DistInfo) -> None:
    """Barrier, then leave the process group (no-op for one process)."""
    global _CONTROL_GROUP
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (a host-side gloo all-reduce; no GPU sync)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(value.item())


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (small metadata only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a metrics tensor over ranks (call at logging intervals only)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.AVG if info.backend == "nccl" else dist.ReduceOp.SUM)
        if info.backend != "nccl":  # gloo has no AVG
            values /= info.world
    return values


def choose_mode(requested: str, info: DistInfo) -> Mode:
    """``auto`` -> ``ddp`` under torchrun with more than one process, else ``single``."""
    if requested == "auto":
        return "ddp" if info.world > 1 else "single"
    if requested not in MODES:
        raise ValueError(f"parallel mode must be one of auto, {', '.join(MODES)}; got {requested!r}")
    if requested != "single" and not info.enabled:
        logger.info("parallel mode %s with one process: running as a single process", requested)
        return "single"
    if requested == "single" and info.world > 1:
        raise ValueError("run.parallel = \"single\" cannot run under torchrun with several processes; use ddp or fsdp")
    return requested  # type: ignore[return-value]


# --------------------------------------------------------------------------- wrapping
def default_blocks(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a PiDNet (patch then pixel blocks): the units of sharding and recomputation."""
    blocks: list[nn.Module] = []
    for name in ("patch_blocks", "pixel_blocks", "blocks"):
        container = getattr(net, name, None)
        if isinstance(container, nn.ModuleList):
            blocks.extend(container)
    return blocks


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's forward in the backward pass (``torch.utils.checkpoint``, non-reentrant).

    The block's ``forward`` is replaced on the instance, so parameter and state-dict names stay unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_pid_checkpointed", False):
            continue
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
        block._pid_checkpointed = True


class TrainingForward(nn.Module):
    """``forward`` = ``net.forward_train`` (the training evaluation), so DDP's hooks see it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net.forward_train(*args, **kwargs)


class TrainDDP(nn.parallel.DistributedDataParallel):
    """DDP around `TrainingForward(net)`: ``forward_train`` runs through DDP (gradient all-reduce), and the
    net's other attributes (``config``) read through. Only ``forward_train`` may run the network."""

    def forward_train(self, *args, **kwargs):
        return self(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = super().__getattr__("module")
            return getattr(inner.net if isinstance(inner, TrainingForward) else inner, name)


def wrap_model(
    net: nn.Module,
    mode: Mode = "single",
    *,
    checkpointing: bool = False,
    info: DistInfo | None = None,
    blocks: Iterable[nn.Module] | None = None,
    forward_methods: tuple[str, ...] = ("forward_train",),
) -> nn.Module:
    """Prepare ``net`` (already on its device, float32, trainable flags set) for training.

    Args:
        mode: "single" (no wrapper), "ddp" (gradients all-reduced every backward; the net must not have
            trainable parameters unused by the forward) or "fsdp" (FSDP2 ``fully_shard`` on every block, then on
            the root: parameters, gradients and optimizer state sharded over the ranks).
        checkpointing: activation checkpointing of every block (applied before sharding).
        blocks: the blocks to shard / recompute (default: `default_blocks`, a PiDNet's patch and pixel blocks).
        forward_methods: methods besides ``forward`` that run the network (FSDP2 registers their hooks).

    Returns the module to train: the net itself ("single", "fsdp", where FSDP2 hooks ``forward_train`` too) or
    `TrainDDP` (``forward_train`` through DDP); each has ``forward_train`` and ``config``, so `teacher_losses`
    takes it as it is. `unwrap` gives the net.
    Build optimizers and EMAs from ``unwrap(model).parameters()`` AFTER this call (FSDP2 replaces them).
    """
    info = info or DistInfo()
    blocks = list(default_blocks(net) if blocks is None else blocks)
    if checkpointing:
        apply_activation_checkpointing(blocks)
    if mode == "single":
        return net
    if not info.enabled:
        raise ValueError(f"parallel mode {mode!r} needs a process group: launch with torchrun")
    if mode == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        inner = TrainingForward(net) if hasattr(net, "forward_train") else net
        return TrainDDP(inner, device_ids=device_ids, find_unused_parameters=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # The blocks return tensors that are views (e.g. the unchanged text stream of the last block); the network
        # never modifies a block output in place under autograd, which is what FSDP2 warns about (the two-rank
        # equality test checks the gradients).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(info.device.type, (info.world,))
        _scalars_to_vectors(net)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        for method in forward_methods:
            if hasattr(net, method):
                register_fsdp_forward_method(net, method)
        return net
    raise ValueError(f"parallel mode must be one of {', '.join(MODES)}, got {mode!r}")


def _scalars_to_vectors(net: nn.Module) -> None:
    """FSDP2 cannot shard 0-d parameters (the gates' ``log_alpha``): make them shape (1,), same name and value.

    The network broadcasts them as before; their checkpoints under FSDP2 hold (1,) tensors, which `export`
    and the validation copy reshape back.
    """
    for module in net.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.ndim == 0:
                module._parameters[name] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a `wrap_model` result (the model itself for "single" and "fsdp")."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.net if isinstance(model, TrainingForward) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly DTensor-sharded) tensor; a collective under FSDP2: call on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
