"""Export a run's weights as a file `load_network` reads: the release layout (``.pth``) or our safetensors.

    export_run("runs/tiny", "tiny.pth")                                # EMA, bf16, keys net.<module path>
    export_run("runs/tiny", "tiny.safetensors", format="safetensors")  # EMA, bf16, config in the metadata

The network config comes from the run's ``config.json``; the weights from its newest complete checkpoint (or
``checkpoint=``): the ``net_ema`` entry (``which="ema"``, what the releases ship) or ``net`` (the raw weights).
A v1.5 teacher trained with the aux LQ-RGB head exports it as the released ``*_undistilled`` files do
(``lq_proj.lq_aux_rgb_head.*``); inference loading drops it, ``load_network(training=True)`` keeps it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..checkpoints import PREFIX, atomic_write, build_network, parse_dtype, save_safetensors
from ..keys import key_problems
from .checkpoint import CheckpointError, CheckpointManager, read_tensors
from .config import config_from_dict

logger = logging.getLogger(__name__)

FORMATS = ("pth", "safetensors")


def export_format(out: str | os.PathLike, format: str | None) -> str:
    """The format to write: ``format`` if given, else from the suffix (``.safetensors``/``.sft`` or ``.pth``/``.pt``)."""
    suffix = Path(out).suffix.lower()
    if format is None:
        if suffix in (".safetensors", ".sft"):
            return "safetensors"
        if suffix in (".pth", ".pt"):
            return "pth"
        raise ValueError(f"cannot tell the export format from {Path(out).name!r}: name it .pth or .safetensors, "
                         "or pass format='pth' / 'safetensors'")
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    return format


def load_run_network(
    run_dir: str | os.PathLike, *, which: str = "ema", checkpoint: str | os.PathLike | None = None
) -> torch.nn.Module:
    """The run's network (float32, CPU, eval) with the weights of ``which`` ("ema" or "net") from a checkpoint."""
    run_dir = Path(run_dir)
    if which not in ("ema", "net"):
        raise ValueError(f"which must be 'ema' or 'net', got {which!r}")
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no config.json)")
    path = Path(checkpoint) if checkpoint is not None else CheckpointManager(run_dir).latest()
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet (nothing under {run_dir / 'checkpoints'})")
    if checkpoint is not None and not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    if (path / "config.json").is_file():  # the config the checkpoint was written with
        config_file = path / "config.json"
    cfg = config_from_dict(json.loads(config_file.read_text()))
    entry = "net_ema" if which == "ema" else "net"
    tensors = read_tensors(path, entry)
    net_config = cfg.net_config
    aux = net_config.lq is not None and net_config.lq.aux_rgb_head
    net = build_network(net_config, device="cpu", aux_head=aux)
    # Checkpoints hold the tensors in the module's storage layout (named_parameters / buffers).
    own = dict(net.named_parameters())
    own.update(dict(net.named_buffers()))
    buffers = [name for name, _ in net.named_buffers()]
    if which == "ema" and buffers:  # the EMA covers parameters; buffers come from the network entry
        net_entry = read_tensors(path, "net")
        tensors = {**{k: net_entry[k] for k in buffers if k in net_entry}, **tensors}
    shape = lambda v: tuple(v.shape) if v.ndim else (1,)
    problems = key_problems({k: shape(v) for k, v in own.items()}, {k: shape(v) for k, v in tensors.items()})
    if problems:
        raise CheckpointError(f"checkpoint {path} ({entry}) does not match the run's network: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(tensors[name].reshape(tensor.shape))  # FSDP2 runs store 0-d parameters as (1,)
    net.requires_grad_(False)
    logger.info("loaded %s weights of %s", entry, path)
    return net.eval()


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    format: str | None = None,
    which: str = "ema",
    *,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
) -> Path:
    """Write the weights of a training run to ``out`` (atomically) and return its path.

    Args:
        format: "pth" (the release layout: a flat dict ``net.<module path>`` -> tensor, like
            ``model_ema_bf16.pth``) or "safetensors" (our layout: no prefix, `NetConfig` JSON in the metadata);
            None = from the file suffix.
        which: "ema" (the released choice) or "net" (the optimizer's weights).
        checkpoint: a checkpoint folder of the run (default: the newest complete one).
        dtype: stored dtype (bf16 as released; float32 for exact continuation).
    """
    fmt = export_format(out, format)
    dtype = parse_dtype(dtype)
    out = Path(out)
    _check_writable(out)
    net = load_run_network(run_dir, which=which, checkpoint=checkpoint)
    if fmt == "safetensors":
        return save_safetensors(net, out, dtype=dtype)
    state = {PREFIX + k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    return atomic_write(out, lambda tmp: torch.save(state, tmp))


def _check_writable(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write {out}: {existing} is not writable")
