"""Atomic, resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a run directory::

    RUN/config.json                         the run's TrainConfig (written at the start)
    RUN/checkpoints/step_000001000/         one DCP checkpoint: .metadata, __<rank>_0.distcp, config.json, meta.json
    RUN/checkpoints/.tmp-step_000002000/    a save in progress (ignored; removed by the next save)

A save writes every rank's shards into a temp directory, fsyncs the files and the directory, and renames it
into place (rename is atomic on one filesystem), so a crash at any point leaves the previous checkpoint whole.
Then only the newest ``keep_last`` checkpoints are kept.

    manager = CheckpointManager(run_dir, keep_last=3, info=info, config=cfg.to_dict())
    state = {"net": ModelState(model), "optim": OptimizerState(model, opt), "rng": RNGState({"data": gen}), ...}
    manager.save(step, state)               # collective: call on every rank
    step = manager.load(manager.latest(), state)

``state`` maps names to objects with ``state_dict()`` / ``load_state_dict()`` (DCP's Stateful protocol) or to
plain dicts of tensors. Loading never unpickles code: non-tensor values are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .config import config_differences
from .distributed import DistInfo, barrier, broadcast_object, unwrap

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, from another config)."""


# --------------------------------------------------------------------------- stateful adapters
class ModelState:
    """A (possibly DDP/FSDP2-wrapped) network's parameters and buffers under the network's own names.

    The tensors are the parameters themselves (FSDP2: their DTensor shards), in the module's storage layout
    (``named_parameters``, not the reference-layout ``state_dict()``), so DCP reads into them in place and an
    EMA saved by parameter name has the same layout. `export` converts to the release layout.
    """

    def __init__(self, model: nn.Module) -> None:
        self.net = unwrap(model)

    def state_dict(self) -> dict[str, Any]:
        out = {name: p.detach() for name, p in self.net.named_parameters()}
        out.update({name: b for name, b in self.net.named_buffers() if _persistent(self.net, name)})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state.keys() != mine.keys():
            missing, extra = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
            raise CheckpointError(f"checkpoint network does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in mine.items():
            if state[name] is not tensor:
                tensor.copy_(state[name])


def _persistent(net: nn.Module, name: str) -> bool:
    module_name, _, buffer = name.rpartition(".")
    module = net.get_submodule(module_name) if module_name else net
    return buffer not in module._non_persistent_buffers_set


class OptimizerState:
    """An optimizer's state keyed by parameter names (so it loads under any sharding and world size)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.net, self.optimizer = unwrap(model), optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.net, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.net, self.optimizer, state)


class RNGState:
    """The process-global RNGs (torch CPU/CUDA, Python, NumPy) plus named ``torch.Generator`` s, as tensors.

    RNG states differ per rank, so the keys carry the rank: a resume needs the same world size for exact
    continuation (a different world size loads this rank's state if it exists, else keeps the seeded one).
    """

    def __init__(self, generators: Mapping[str, torch.Generator], rank: int = 0) -> None:
        self.generators, self.rank = dict(generators), rank

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state(), "numpy": _numpy_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state()
        for name, gen in self.generators.items():
            out[f"gen_{name}"] = gen.get_state()
        return {f"rank{self.rank}": out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state[f"rank{self.rank}"]
        torch.set_rng_state(mine["torch"])
        _set_python_state(mine["python"])
        _set_numpy_state(mine["numpy"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
        for name, gen in self.generators.items():
            gen.set_state(mine[f"gen_{name}"])


def _python_state() -> dict[str, torch.Tensor]:
    version, internal, gauss = random.getstate()
    return {
        "ints": torch.tensor([version, *internal], dtype=torch.int64),
        "gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
    }


def _set_python_state(state: dict[str, torch.Tensor]) -> None:
    values = state["ints"].tolist()
    gauss = float(state["gauss"][0])
    random.setstate((values[0], tuple(values[1:]), None if math.isnan(gauss) else gauss))


def _numpy_state() -> dict[str, torch.Tensor]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "ints": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "cached": torch.tensor([cached], dtype=torch.float64),
    }


def _set_numpy_state(state: dict[str, torch.Tensor]) -> None:
    ints = state["ints"].tolist()
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(ints[0]), int(ints[1]), float(state["cached"][0])))


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values are unpickled with ``weights_only=True`` (no code from the file)."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Save / find / load the checkpoints of one run directory (see the module docstring)."""

    def __init__(
        self, run_dir: str | os.PathLike, keep_last: int = 3, *, info: DistInfo | None = None, config: dict | None = None
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.info = info or DistInfo()
        self.config = config

    # ------------------------------------------------------------------ finding
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically (a collective: every rank calls it with its shards)."""
        final = self.folder / f"{PREFIX}{step:09d}"
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        if self.info.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):  # a save that crashed earlier
                shutil.rmtree(stale, ignore_errors=True)
        barrier(self.info)
        with _single_process_quiet():
            dcp.save(dict(state), checkpoint_id=str(tmp), no_dist=not self.info.enabled)
        barrier(self.info)
        if self.info.is_main:
            if self.config is not None:
                (tmp / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))
            (tmp / META).write_text(json.dumps({"step": step, "world": self.info.world}))
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            self._prune()
            logger.info("saved checkpoint %s", final)
        barrier(self.info)
        return final

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def resolve(self, resume: str | os.PathLike | bool | None) -> Path | None:
        """``True``/"latest" -> the newest checkpoint of this run (None if there is none); a path -> that checkpoint."""
        if resume in (None, False, ""):
            return None
        if resume is True or str(resume) == "latest":
            return self.latest()
        path = Path(resume)
        if (path / CHECKPOINTS).is_dir():  # a run directory: its newest checkpoint
            found = CheckpointManager(path).latest()
            if found is None:
                raise CheckpointError(f"--resume {path}: the run directory has no complete checkpoint")
            return found
        if not (path / META).is_file():
            raise CheckpointError(
                f"--resume {path}: not a complete checkpoint (expected a folder with {META}, e.g. "
                f"{self.folder / (PREFIX + '000005000')}, or a run directory)"
            )
        return path

    def check_config(self, path: Path) -> None:
        """Refuse a checkpoint written with a different config (names the keys that differ)."""
        if self.config is None:
            return
        saved_file = path / CONFIG
        if not saved_file.is_file():
            raise CheckpointError(f"checkpoint {path} has no {CONFIG}; cannot check that it belongs to this config")
        diffs = config_differences(json.loads(saved_file.read_text()), self.config)
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: it was written with a different config ({'; '.join(diffs)}). "
                "Start a new run directory (run.dir) or resume with the original config."
            )

    def load(self, path: str | os.PathLike, state: Mapping[str, Any]) -> int:
        """Load checkpoint ``path`` into ``state`` in place (every rank); returns its step."""
        path = Path(path)
        self.check_config(path)
        meta = json.loads((path / META).read_text())
        state = dict(state)
        saved = _saved_prefixes(path)
        for name, value in list(state.items()):
            if isinstance(value, RNGState) and f"{name}.rank{value.rank}" not in saved:
                # another world size: per-rank RNG states exist only for the ranks that wrote the checkpoint
                logger.warning("checkpoint %s has no RNG state for rank %d; keeping the seeded one", path, value.rank)
                del state[name]
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), planner=_SafeLoadPlanner(), no_dist=not self.info.enabled)
        step = int(broadcast_object(meta["step"], self.info))
        logger.info("resumed from %s (step %d)", path, step)
        return step


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _saved_prefixes(path: Path) -> set[str]:
    """``entry.sub`` prefixes (first two name parts) of a checkpoint's keys."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {".".join(k.split(".")[:2]) for k in keys}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Read the full tensors whose names start with ``prefix.`` from a DCP checkpoint, in one process, whatever the
    world size it was written with. Keys are returned without the prefix (``net_ema.x.weight`` -> ``x.weight``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    head = prefix + "."
    template = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(head) and isinstance(meta, TensorStorageMetadata)
    }
    if not template:
        names = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata})
        raise CheckpointError(f"checkpoint {path} has no '{prefix}' entry; it holds: {', '.join(names)}")
    with _single_process_quiet():
        dcp.load(template, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=True)
    return {k[len(head):]: v for k, v in template.items()}
