"""Time the DMD2 distillation iterations (student step and critic step) of the tiny, "medium" and full networks.

    python bench/distill.py --threads 2                                  # CPU: tiny and medium
    python bench/distill.py --cases full --resolutions 1024 2048         # CUDA: the full model (released recipe)
    python bench/distill.py --out bench/results/distill.jsonl            # also append the lines to a file

Prints one JSON line per case (after the machine's GEMM-rate line of bench/train.py): seconds per student
iteration and per critic iteration (median over --steps after --warmup), images/s of a 1-in-6 cycle, and memory:
the resident size of each network (weights; + gradients and AdamW state after a step for the trainable ones; the
student's EMA), and the peak of each phase (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak
RSS, one number). Each case runs in its own process. Inputs are synthetic (random image and latent, zero text);
weights are random: speed and memory do not depend on them. The teacher holds bf16 weights under bf16
precision on CUDA, as `distill` builds it; student and fake score are float32 with bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train import _sizes, gemm_rate

MB = 2**20


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _net_memory(module, optimizer=None) -> dict:
    params = list(module.parameters())
    out = {"weights_mb": round(_bytes(params) / MB, 1)}
    if optimizer is not None:  # gradients exist during the step (freed by zero_grad): one per trainable weight
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        out["grads_mb"] = round(_bytes([p for p in params if p.requires_grad]) / MB, 1)
        out["optimizer_mb"] = round(_bytes(state) / MB, 1)
    return out


def run_case(case: dict) -> dict:
    import dataclasses

    from pid_decoder.model.net import PiDNet
    from pid_decoder.training.discriminator import Discriminator, TeacherWithFeatures
    from pid_decoder.training.distill_losses import draw_randomness
    from pid_decoder.training.distiller import (
        CRITIC,
        STUDENT,
        DistillNets,
        OptimSettings,
        build_optimizers,
        distill_step,
        phase_of,
    )
    from pid_decoder.training.distributed import apply_activation_checkpointing, default_blocks
    from pid_decoder.training.params import set_trainable
    from pid_decoder.training.schedules import EMA

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    cfg, _ = _sizes()[case["size"]]
    cfg = dataclasses.replace(cfg, lq=dataclasses.replace(cfg.lq, aux_rgb_head=False))
    bf16 = case["precision"] == "bf16"
    torch.manual_seed(0)
    with torch.device(device):
        student, fake, teacher = PiDNet(cfg), PiDNet(cfg), PiDNet(cfg)
        disc = Discriminator(cfg.hidden_size, (min(7, cfg.patch_depth - 1),), cfg.patch_depth)
    teacher = teacher.to(torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32).requires_grad_(False).eval()
    for net in (student, fake):
        set_trainable(net, "full")
    if case["checkpointing"]:
        for net in (student, fake, teacher):
            apply_activation_checkpointing(default_blocks(net))
    opts, scheds = build_optimizers(student, fake, disc, OptimSettings(student_warmup=0),
                                    fused=device.type in ("cuda", "cpu"))
    ema = EMA(student.named_parameters())
    b, h, w = case["batch"], case["height"], case["width"]
    k = cfg.lq.pixels_per_latent
    gen = torch.Generator(device).manual_seed(0)
    batch = {
        "hq": torch.rand(b, 3, h, w, generator=gen, device=device) * 2 - 1,
        "lq_latent": torch.randn(b, cfg.lq.latent_channels, h // k, w // k, generator=gen, device=device),
        "text": torch.zeros(b, cfg.txt_max_length, cfg.txt_embed_dim, device=device),
        "degrade_sigma": torch.full((b,), 0.2, device=device),
    }
    null = torch.zeros(1, cfg.txt_max_length, cfg.txt_embed_dim, device=device)
    nets = DistillNets(student, TeacherWithFeatures(teacher, disc.indices), fake, disc, null, gan_warmup=0,
                       amp_dtype=torch.bfloat16 if bf16 else None)
    times = {STUDENT: [], CRITIC: []}
    peaks = {STUDENT: 0, CRITIC: 0}
    total = case["warmup"] + case["steps"]
    for it in range(6 * total):  # whole cycles: 1 student + 5 critic iterations each
        phase = phase_of(it, 6)
        draws = draw_randomness(gen, tuple(batch["hq"].shape), critic=phase == CRITIC, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        distill_step(nets, opts, scheds, ema.update, batch, draws, it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated(device))
        if it >= 6 * case["warmup"]:
            times[phase].append(time.perf_counter() - start)
    s_student, s_critic = statistics.median(times[STUDENT]), statistics.median(times[CRITIC])
    cycle = s_student + 5 * s_critic
    result = {
        "case": "distill_step", "size": case["size"], "height": h, "width": w, "batch": b,
        "precision": "autocast-bf16" if bf16 else "fp32", "checkpointing": case["checkpointing"],
        "device": str(device), "threads": torch.get_num_threads(), "cycles": case["steps"],
        "student_s": round(s_student, 4), "critic_s": round(s_critic, 4),
        "images_per_s": round(6 * b / cycle, 4),
        "memory": {
            "student": _net_memory(student, opts["net"]) | {"ema_mb": round(_bytes(ema.shadow.values()) / MB, 1)},
            "fake_score": _net_memory(fake, opts["fake_score"]),
            "teacher": _net_memory(teacher),
            "discriminator": _net_memory(disc, opts["discriminator"]),
        },
        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "command": shlex.join(case_command(case)),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = {p: round(v / MB, 1) for p, v in peaks.items()}
    return result


def case_command(case: dict) -> list[str]:
    return [sys.executable, "bench/distill.py", "--cases", case["size"], "--resolutions", str(case["height"]),
            "--batch", str(case["batch"]), "--precision", case["precision"], "--device", case["device"],
            "--threads", str(case["threads"]), "--steps", str(case["steps"]), "--warmup", str(case["warmup"])] + (
        ["--checkpointing"] if case["checkpointing"] else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium", "full"])
    p.add_argument("--resolutions", nargs="+", type=int, default=None, help="square sizes (default: per case)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=2, help="timed cycles (6 iterations each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed cycles first")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_case(json.loads(args.one))), flush=True)
        return
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    default_res = {"tiny": [64], "medium": [256], "full": [1024]}
    lines = [gemm_rate(device, args.threads or torch.get_num_threads())]
    print(json.dumps(lines[0]), flush=True)
    for size in args.cases:
        for res in args.resolutions or default_res[size]:
            case = {"size": size, "height": res, "width": res, "batch": args.batch, "precision": precision,
                    "device": args.device, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                    "checkpointing": args.checkpointing or size == "full"}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True, check=False,
                                  cwd=ROOT)
            if proc.returncode:
                line = {"case": "distill_step", "size": size, "height": res, "error": proc.stderr.strip()[-800:]}
            else:
                line = json.loads(proc.stdout.strip().splitlines()[-1])
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
