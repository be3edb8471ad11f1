"""Student vs teacher before and after a tiny distillation (the tiny CPU configs), on held-out latents.

    python bench/distill_quality.py                                      # teacher 1000 steps, distill 240 iterations
    python bench/distill_quality.py --teacher-steps 300 --distill-steps 120 --set optim.lr=1e-4

Trains the tiny teacher (configs/train/tiny-cpu.toml at 32x32 on configs/train/tiny-data), distills it
(configs/distill/tiny-cpu.toml plus --set overrides), then compares on held-out latents (the four training images
rotated by 90 degrees, LQ latents noised with sigma 0.2) the 4-step student sampler with the teacher's own sampler
(16 steps), K seeds each, for the undistilled weights ("before") and the student EMA and raw weights ("after"):

- ``pointwise``: mean |student - teacher| with the same seed (what the validation grid logs);
- ``energy``: 2 E|S - T| - E|S - S'| - E|T - T'| over the K x K seed pairs (a distance between the two output
  distributions that, unlike the pointwise one, does not reward blur);
- ``spread``: E|S - S'| (sample diversity; the teacher's is printed as ``teacher_spread``).

One JSON line with the numbers and the command. Everything runs in a temporary folder (or --work).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _heldout(n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    paths = sorted((ROOT / "configs" / "train" / "tiny-data").glob("*.png"))
    imgs = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for p in paths]
    hq = F.interpolate(torch.stack(imgs), size=(n, n), mode="bicubic", antialias=True).clamp(-1, 1)
    return hq.rot90(1, dims=(-2, -1)).contiguous()  # (B, 3, n, n), not seen in training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--distill-steps", type=int, default=240)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="distillation config override")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    args = p.parse_args()

    from pid_decoder.sampling import sample, sample_teacher
    from pid_decoder.training.config import load_config
    from pid_decoder.training.degrade import downsample_lq
    from pid_decoder.training.distiller import distill
    from pid_decoder.training.export import load_run_network
    from pid_decoder.training.trainer import PixelsBackbone, train

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-quality-"))
    common = [f'data.path="{ROOT / "configs/train/tiny-data"}"', "log.progress=false", "log.tensorboard=false",
              "validation.every=0", f'data.buckets="square-{args.res}"', "checkpoint.every=100000"]
    t0 = time.perf_counter()
    train(load_config(ROOT / "configs/train/tiny-cpu.toml", common + [
        f'run.dir="{work / "teacher"}"', f"run.max_steps={args.teacher_steps}", "data.batch_size=4", "optim.lr=3e-3"]))
    t1 = time.perf_counter()
    distill(load_config(ROOT / "configs/distill/tiny-cpu.toml", common + [
        f'run.dir="{work / "student"}"', f'distill.teacher="{work / "teacher"}"', f"run.max_steps={args.distill_steps}",
        "data.batch_size=2", *args.overrides]))
    t2 = time.perf_counter()

    n, K = args.res, args.seeds
    hq = _heldout(n)
    B = hq.shape[0]
    z = PixelsBackbone().encode(downsample_lq(hq))  # (B, 12, n/8, n/8)
    z = 0.8 * z + 0.2 * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    sigma, text = torch.full((B,), 0.2), torch.zeros(B, 8, 24)
    teacher = load_run_network(work / "teacher", which="ema")

    def gen(s):
        return torch.Generator().manual_seed(s)

    T = torch.stack([sample_teacher(teacher, z, text, sigma, height=n, width=n, steps=16, cfg_scale=1.0, generator=gen(s))
                     for s in range(K)])  # (K, B, 3, n, n)
    off = ~torch.eye(K, dtype=torch.bool)

    def l1(a, b):
        return (a[:, None] - b[None]).abs().flatten(3).mean(-1)  # (K, K, B)

    def stats(net) -> dict:
        S = torch.stack([sample(net, z, text, sigma, height=n, width=n, steps=4, generator=gen(s)) for s in range(K)])
        energy = 2 * l1(S, T).mean() - l1(S, S)[off].mean() - l1(T, T)[off].mean()
        return {"pointwise": round(float((S - T).abs().mean()), 4), "energy": round(float(energy), 4),
                "spread": round(float(l1(S, S)[off].mean()), 4)}

    record = {
        "case": "distill_quality", "res": n, "seeds": K, "teacher_steps": args.teacher_steps,
        "distill_steps": args.distill_steps, "overrides": args.overrides,
        "teacher_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1),
        "teacher_spread": round(float(l1(T, T)[off].mean()), 4),
        "before": stats(teacher),
        "after_ema": stats(load_run_network(work / "student", which="ema")),
        "after_raw": stats(load_run_network(work / "student", which="net")),
        "command": shlex.join([sys.executable, "bench/distill_quality.py", *sys.argv[1:]]),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
