"""Training of PiD networks: stage 0 (PixelDiT finetune), stage 1 (the LQ-conditioned teacher), stage 2 (DMD2).

``model/`` never imports this package, and ``import pid_decoder`` does not import it; the names below are
imported on first use::

    from pid_decoder.training import TrainConfig, load_config, train, export_run
    train(load_config("configs/train/tiny-cpu.toml"))
    export_run("runs/tiny", "tiny.safetensors", format="safetensors")

Reusable pieces for other loops live in the submodules: `distributed` (process group, DDP/FSDP2 wrapping,
activation checkpointing), `checkpoint` (atomic DCP checkpoints), `trainer` (optimizer, schedule, step, stop
signal), `logging` (progress, metrics, validation grids), `export`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "teacher_losses": "losses",
    "TrainConfig": "config",
    "load_config": "config",
    "train": "trainer",
    "export_run": "export",
    "distill_student_losses": "distill_losses",
    "distill_critic_losses": "distill_losses",
    "distill": "distiller",
}

__all__ = ["TrainConfig", "distill", "distill_critic_losses", "distill_student_losses", "export_run", "load_config",
           "teacher_losses", "train"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pid_decoder.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"checkpoint", "config", "distributed", "export", "logging", "trainer"})
