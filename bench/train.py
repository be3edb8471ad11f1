"""Time one training step (stage-1 teacher losses, backward, clip, AdamW, EMA) of the tiny, "medium" and full networks.

    python bench/train.py --threads 2                                   # CPU: tiny and medium, AC off/on
    python bench/train.py --cases full --resolutions 1024 2048          # CUDA: the full model (teacher recipe)
    python bench/train.py --out bench/results/train.jsonl               # also append the lines to a file

Prints one JSON line per case: seconds per optimizer step (median over --steps after --warmup), images/s, peak
memory (CPU: the case process's peak RSS; CUDA: ``torch.cuda.max_memory_allocated``), the model FLOP rate
(3 x forward FLOPs per image, recomputation not counted), and the command of that case. The first line is the
machine's measured GEMM rate (fp32 on CPU, bf16 on CUDA) so step times can be compared across machines.

What a step covers: `teacher_losses` (forward with the aux head) under the run's precision, backward, NaN
scrub + clip + fused AdamW, the power-EMA update. Inputs are synthetic (random image, latent; zero text of
the network's text length): data loading, the VAE encode and Gemma are not included. Each case runs in its own
process, so peak memory is that case's alone. Weights are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
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

from decode import MEDIUM, network_flops

from pid_decoder.config import LQConfig, NetConfig

TINY = NetConfig(
    hidden_size=32, num_groups=2, patch_depth=2, patch_size=16, pixel_hidden_size=16, pixel_attn_hidden_size=16,
    pixel_num_groups=2, pixel_depth=1, txt_embed_dim=24, txt_max_length=8, rope_ref_h=64, rope_ref_w=64,
    lq=LQConfig(latent_channels=12, latent_down_factor=2, hidden_dim=16, num_res_blocks=1, padding_mode="replicate",
                gate_type="sigma_aware_per_token", interval=1, sr_scale=4, pit_inject=True, aux_rgb_head=True),
)  # the network of configs/train/tiny-cpu.toml


def _sizes() -> dict[str, tuple[NetConfig, str]]:
    """name -> (network config, trainable mode). "full" is the released v1.5 teacher (FLUX latents) recipe."""
    import dataclasses

    from pid_decoder.presets import resolve_preset

    medium = dataclasses.replace(MEDIUM, lq=dataclasses.replace(MEDIUM.lq, aux_rgb_head=True))
    return {"tiny": (TINY, "full"), "medium": (medium, "full"),
            "full": (resolve_preset("flux-4k-undistilled").net, "fix_backbone")}


def gemm_rate(device: torch.device, threads: int) -> dict:
    """Measured matmul rate: fp32 2048^3 on CPU, bf16 8192^3 on CUDA (median of 5)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(7):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"case": "gemm", "device": str(device), "dtype": str(dtype).removeprefix("torch."), "n": n,
            "threads": threads, "tflops": round(2 * n**3 / statistics.median(times) / 1e12, 4),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: dict) -> dict:
    """One case in this process: build, warm up, time ``steps`` optimizer steps."""
    from pid_decoder.model.net import PiDNet
    from pid_decoder.training.config import OptimConfig
    from pid_decoder.training.distributed import apply_activation_checkpointing, default_blocks
    from pid_decoder.training.losses import teacher_losses
    from pid_decoder.training.params import set_trainable
    from pid_decoder.training.schedules import EMA
    from pid_decoder.training.trainer import build_optimizer, build_scheduler, optimizer_step

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    cfg, mode = _sizes()[case["size"]]
    torch.manual_seed(0)
    with torch.device(device):
        net = PiDNet(cfg, aux_head=True)
    set_trainable(net, mode)
    if case["checkpointing"]:
        apply_activation_checkpointing(default_blocks(net))
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optim = OptimConfig(lr=1e-5, warmup_steps=0)
    optimizer = build_optimizer(params, optim, device)
    scheduler = build_scheduler(optimizer, optim)
    ema = EMA(net.named_parameters())
    b, h, w = case["batch"], case["height"], case["width"]
    k = cfg.lq.pixels_per_latent
    gen = torch.Generator(device).manual_seed(0)
    hq = torch.rand(b, 3, h, w, generator=gen, device=device) * 2 - 1
    lq = torch.randn(b, cfg.lq.latent_channels, h // k, w // k, generator=gen, device=device)
    text = torch.zeros(b, cfg.txt_max_length, cfg.txt_embed_dim, device=device)
    sigma = torch.full((b,), 0.2, device=device)
    bf16 = case["precision"] == "bf16"

    def step(i: int) -> float:
        _sync(device)
        start = time.perf_counter()
        t = torch.rand(b, generator=gen, device=device)
        noise = torch.randn(hq.shape, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = teacher_losses(net, hq, lq, text, sigma, t=t, noise=noise, shift=6.0, validate=False)
        losses["total"].backward()
        optimizer_step(params, optimizer, scheduler, optim.grad_clip)
        ema.update(i)
        _sync(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(case["warmup"]):
        step(i)
    times = [step(case["warmup"] + i) for i in range(case["steps"])]
    median = statistics.median(times)
    flops = 3 * network_flops(cfg, h, w, cfg.txt_max_length) * b
    result = {
        "case": "train_step", "size": case["size"], "trainable": mode, "height": h, "width": w, "batch": b,
        "precision": "autocast-bf16" if bf16 else "fp32", "checkpointing": case["checkpointing"],
        "device": str(device), "threads": torch.get_num_threads(), "steps": case["steps"],
        "median_s": round(median, 4), "min_s": round(min(times), 4), "images_per_s": round(b / median, 4),
        "model_tflops": round(flops / median / 1e12, 4),
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "command": shlex.join(case_command(case)),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def case_command(case: dict) -> list[str]:
    cmd = ["python", "bench/train.py", "--cases", case["size"], "--resolutions", f"{case['height']}x{case['width']}",
           "--batch", str(case["batch"]), "--precision", case["precision"], "--device", case["device"],
           "--steps", str(case["steps"]), "--warmup", str(case["warmup"]),
           "--checkpointing", "on" if case["checkpointing"] else "off"]
    if case["threads"]:
        cmd += ["--threads", str(case["threads"])]
    return cmd


DEFAULT_RESOLUTIONS = {"tiny": ["64"], "medium": ["256"], "full": ["1024", "2048"]}
DEFAULT_BATCH = {"tiny": 2, "medium": 1, "full": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--cases", nargs="+", choices=["tiny", "medium", "full"],
                        default=["tiny", "medium", "full"] if cuda else ["tiny", "medium"])
    parser.add_argument("--resolutions", nargs="+", default=None,
                        help="HxW or N per case (default: tiny 64, medium 256, full 1024 and 2048)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: tiny 2, else 1)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32",
                        help="bf16 autocast over fp32 weights (the recipe) or plain fp32 (default on CPU)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also append each JSON line to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    emit(gemm_rate(device, torch.get_num_threads()), args.out)
    for size in args.cases:
        for res in args.resolutions or DEFAULT_RESOLUTIONS[size]:
            h, _, w = res.lower().partition("x")
            for ckpt in args.checkpointing:
                case = {"size": size, "height": int(h), "width": int(w or h), "batch": args.batch or DEFAULT_BATCH[size],
                        "precision": args.precision, "device": args.device, "threads": args.threads,
                        "steps": args.steps, "warmup": args.warmup, "checkpointing": ckpt == "on"}
                proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, check=False,
                                      text=True, cwd=ROOT)
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["failed"]
                    emit({"case": "train_step", **case, "error": tail[0], "command": shlex.join(case_command(case))},
                         args.out)
                    continue
                emit(json.loads(proc.stdout.strip().splitlines()[-1]), args.out)


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
