"""What a trainer sees: a rank-0 progress bar, a JSONL metrics log, TensorBoard events, validation grids.

    log = RunLogger(run_dir, total_steps, start_step, info=info, tensorboard=True, progress=True)
    log.step(step, images)                           # every step: advances the bar (no device sync)
    log.metrics(step, {"loss": 0.12, "lr": 5e-5})   # at logging intervals: JSONL line, TensorBoard, bar postfix
    log.close()

    save_grid(path, rows)                            # rows of (3, H, W) images in [-1, 1], written atomically

Only rank 0 writes anything; other ranks get a logger whose methods do nothing. Never wandb.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .distributed import DistInfo

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class RunLogger:
    """Progress bar (loss, lr, images/s, ETA), ``metrics.jsonl`` and optional TensorBoard for one run."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        *,
        info: DistInfo | None = None,
        tensorboard: bool = True,
        progress: bool = True,
        desc: str = "train",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.active = (info or DistInfo()).is_main
        self.total, self.start = total_steps, start_step
        self._bar = None
        self._tb = None
        self._images = 0
        self._t0 = time.perf_counter()
        self._last_step, self._last_images, self._last_time = start_step, 0, self._t0
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS
        _truncate_after(self.metrics_path, start_step)  # a resumed run rewrites what came after its checkpoint
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: optional
                logger.info("tensorboard is not installed; metrics go to %s only", self.metrics_path)
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def step(self, step: int, images: int) -> None:
        """One optimizer step done (``step`` = steps completed), ``images`` = global images in it."""
        if not self.active:
            return
        self._images += images
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def metrics(self, step: int, values: Mapping[str, float]) -> dict[str, Any]:
        """Write one metrics record (adds images/s and ETA over the interval since the previous record)."""
        if not self.active:
            return {}
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        record: dict[str, Any] = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if steps > 0:
            record["images_per_s"] = round((self._images - self._last_images) / dt, 4)
            record["s_per_step"] = round(dt / steps, 4)
            record["eta_s"] = round((self.total - step) * dt / steps, 1)
        record["time"] = round(time.time(), 3)
        self._last_step, self._last_images, self._last_time = step, self._images, now
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "lr", "images_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        return record

    def image(self, tag: str, step: int, path: Path) -> None:
        """Record a saved image (TensorBoard shows it too)."""
        if not self.active or self._tb is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            self._tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def message(self, text: str) -> None:
        """A line for the user (through the bar when there is one, so it is not overwritten)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            logger.info("%s", text)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps > ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a torn last line from a crash
    if len(kept) != len(lines):
        from ..checkpoints import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8"))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- image grids
def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[torch.Tensor]], pad: int = 4) -> Path:
    """Write a grid PNG atomically: one row per sample, images (3, H, W) in [-1, 1], each column resized
    (nearest) to the row's largest image so an LQ decode shows at the HQ size next to the HQ target."""
    from PIL import Image

    from ..checkpoints import atomic_write

    prepared = []
    for row in rows:
        h = max(int(img.shape[-2]) for img in row)
        w = max(int(img.shape[-1]) for img in row)
        cells = [
            F.interpolate(img[None].float().cpu(), size=(h, w), mode="nearest")[0] if img.shape[-2:] != (h, w)
            else img.float().cpu()
            for img in row
        ]
        prepared.append(cells)
    width = max(sum(c.shape[-1] for c in row) + pad * (len(row) + 1) for row in prepared)
    height = sum(row[0].shape[-2] for row in prepared) + pad * (len(prepared) + 1)
    canvas = torch.ones(3, height, width)
    y = pad
    for row in prepared:
        x = pad
        for cell in row:
            canvas[:, y : y + cell.shape[-2], x : x + cell.shape[-1]] = cell.clamp(-1, 1) * 0.5 + 0.5
            x += cell.shape[-1] + pad
        y += row[0].shape[-2] + pad
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
