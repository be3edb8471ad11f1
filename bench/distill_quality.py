"""Student vs teacher before and after a tiny distillation (the tiny CPU configs), on held-out latents.

    python bench/distill_quality.py                       # student = teacher (the recipe), 3 distillation seeds
    python bench/distill_quality.py --init-steps 200      # student = the teacher run after 200 steps
    python bench/distill_quality.py --set distill.gan_weight=0 --set optim.lr=1e-4

Trains the tiny teacher (configs/train/tiny-cpu.toml at 32x32 on configs/train/tiny-data, ``--teacher-steps``),
distills it ``--runs`` times with run.seed 0, 1, ... (configs/distill/tiny-cpu.toml plus --set overrides), then
compares on held-out latents (the four training images rotated by 90 degrees, LQ latents noised with sigma 0.2)
the 4-step student sampler with the teacher's own sampler (16 steps), over K seeds each (``--seeds``), for the
student's initial weights ("before") and each run's student EMA ("after"). With ``--init-steps N`` the student
starts from a second teacher run stopped after N steps (same seed: the teacher's state at step N) instead of the
teacher itself, which gives the student a real gap to close.

Distances to the teacher's samples (pixels in [-1, 1]):
- ``energy``: energy distance 2 E|S - T| - E|S - S'| - E|T - T'| over the K x K seed pairs, |.| the per-image RMS
  difference, averaged over images: a distance between the two output distributions (0 when they are equal; it
  does not reward blur). ``floor`` is its value between two independent sets of K teacher samples (the noise level
  of the estimate); ``energy_l1`` the same with the mean absolute difference;
- ``pointwise``: mean |student - teacher| with the same seed (what the validation grid logs; it rewards blur);
- ``mean_gap``: mean |E_seeds S - E_seeds T| (content/colour drift), ``hf``: mean |x - box3(x)| (sharpness),
  ``spread``: E|S - S'| (diversity) -- the teacher's are printed as ``teacher``.

One JSON line with the numbers and the command. Everything runs in a temporary folder (or --work).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
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


def _pairs(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    d = a[:, None] - b[None]  # (K, K', B, 3, n, n)
    return d.square().flatten(3).mean(-1).sqrt() if kind == "l2" else d.abs().flatten(3).mean(-1)  # (K, K', B)


def energy_distance(S: torch.Tensor, T: torch.Tensor, kind: str = "l2") -> float:
    """S (K, B, 3, n, n), T (K', B, 3, n, n): sample sets per image -> energy distance averaged over images."""
    off_s, off_t = ~torch.eye(S.shape[0], dtype=torch.bool), ~torch.eye(T.shape[0], dtype=torch.bool)
    return float(2 * _pairs(S, T, kind).mean() - _pairs(S, S, kind)[off_s].mean() - _pairs(T, T, kind)[off_t].mean())


def _hf(x: torch.Tensor) -> float:
    y = x.flatten(0, 1)  # (K*B, 3, n, n)
    return float((y - F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, 1)).abs().mean())


def _spread(S: torch.Tensor) -> float:
    return float(_pairs(S, S, "l1")[~torch.eye(S.shape[0], dtype=torch.bool)].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--init-steps", type=int, default=0, help="student from the teacher run after N steps (0: teacher)")
    p.add_argument("--distill-steps", type=int, default=240)
    p.add_argument("--runs", type=int, default=3, help="distillation runs (run.seed 0, 1, ...)")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--seeds", type=int, default=16, help="sampling seeds per image")
    p.add_argument("--steps", type=int, nargs="+", default=[4], help="student sampler steps to compare (4 = released)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="distillation config override")
    p.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[],
                   help="teacher config override (e.g. loss.base_size=32: the recipe's shift 6 at this resolution)")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    args = p.parse_args()

    from pid_decoder.sampling import sample, sample_teacher
    from pid_decoder.training.config import config_from_dict, load_config
    from pid_decoder.training.degrade import downsample_lq
    from pid_decoder.training.distiller import distill
    from pid_decoder.training.export import load_run_network
    from pid_decoder.training.trainer import PixelsBackbone, _shift, train

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-quality-"))
    common = [f'data.path="{ROOT / "configs/train/tiny-data"}"', "log.progress=false", "log.tensorboard=false",
              "validation.every=0", f'data.buckets="square-{args.res}"', "checkpoint.every=100000"]

    def teacher_run(name: str, steps: int) -> None:
        train(load_config(ROOT / "configs/train/tiny-cpu.toml", common + [
            f'run.dir="{work / name}"', f"run.max_steps={steps}", "data.batch_size=4", "optim.lr=3e-3",
            *args.teacher_overrides]))

    t0 = time.perf_counter()
    teacher_run("teacher", args.teacher_steps)
    init = []
    if args.init_steps:
        teacher_run("init", args.init_steps)
        init = [f'distill.student_init="{work / "init"}"']
    t1 = time.perf_counter()
    for r in range(args.runs):
        distill(load_config(ROOT / "configs/distill/tiny-cpu.toml", common + [
            f'run.dir="{work / f"student{r}"}"', f'distill.teacher="{work / "teacher"}"', f"run.seed={r}",
            f"run.max_steps={args.distill_steps}", "data.batch_size=2", "run.threads=1", *init, *args.overrides]))
    t2 = time.perf_counter()

    n, K = args.res, args.seeds
    hq = _heldout(n)
    B = hq.shape[0]
    z = PixelsBackbone().encode(downsample_lq(hq))  # (B, 12, n/8, n/8)
    z = 0.8 * z + 0.2 * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    sigma, text = torch.full((B,), 0.2), torch.zeros(B, 8, 24)
    teacher = load_run_network(work / "teacher", which="ema")
    teacher_cfg = config_from_dict(json.loads((work / "teacher" / "config.json").read_text()))
    shift = _shift(teacher_cfg, n, n)  # the teacher's own training shift at this resolution

    def gen(s):
        return torch.Generator().manual_seed(1000 + s)

    def teacher_samples(first: int) -> torch.Tensor:  # (K, B, 3, n, n)
        return torch.stack([sample_teacher(teacher, z, text, sigma, height=n, width=n, steps=16, cfg_scale=1.0,
                                           shift=shift, generator=gen(first + s)) for s in range(K)])

    T = teacher_samples(0)

    def stats(net) -> dict:
        return {str(steps): stats_at(net, steps) for steps in args.steps}

    def stats_at(net, steps: int) -> dict:
        S = torch.stack([sample(net, z, text, sigma, height=n, width=n, steps=steps, generator=gen(s))
                         for s in range(K)])
        return {"energy": round(energy_distance(S, T), 4), "energy_l1": round(energy_distance(S, T, "l1"), 4),
                "pointwise": round(float((S - T).abs().mean()), 4),
                "mean_gap": round(float((S.mean(0) - T.mean(0)).abs().mean()), 4),
                "hf": round(_hf(S), 4), "spread": round(_spread(S), 4)}

    before = stats(load_run_network(work / "init", which="ema") if args.init_steps else teacher)
    after = [stats(load_run_network(work / f"student{r}", which="ema")) for r in range(args.runs)]

    def summary(steps: str, key: str) -> list[float]:
        values = [a[steps][key] for a in after]
        return [round(statistics.mean(values), 4), round(statistics.pstdev(values), 4)]

    record = {
        "case": "distill_quality", "res": n, "seeds": K, "teacher_steps": args.teacher_steps,
        "init_steps": args.init_steps, "distill_steps": args.distill_steps, "runs": args.runs,
        "overrides": args.overrides, "teacher_overrides": args.teacher_overrides, "teacher_shift": round(shift, 3),
        "teacher_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1),
        "teacher": {"hf": round(_hf(T), 4), "spread": round(_spread(T), 4)},
        "floor": round(energy_distance(teacher_samples(K), T), 4),
        "before": before, "after_ema": after,
        "after_mean_std": {st: {k: summary(st, k) for k in ("energy", "pointwise", "mean_gap", "hf", "spread")}
                           for st in before},
        "command": shlex.join(["python", "bench/distill_quality.py", *sys.argv[1:]]),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
