"""Time the 4-step PiD decode of a preset (or the "medium" test size) with random weights.

    python bench/decode.py --size medium --height 512 --width 512 --dtype bf16 --threads 2 --runs 3

Prints one JSON line: median/min seconds per decode, peak RSS (and peak CUDA memory on a GPU), achieved
TFLOP/s, and the settings. Random weights: speed and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pid_decoder import PiDNet, resolve_preset, sample  # noqa: E402
from pid_decoder.config import LQConfig, NetConfig  # noqa: E402

MEDIUM = NetConfig(
    hidden_size=768, num_groups=12, patch_depth=6, patch_size=16, pixel_hidden_size=16, pixel_attn_hidden_size=576,
    pixel_num_groups=8, pixel_depth=2, txt_embed_dim=2304, txt_max_length=300, rope_ref_h=2048, rope_ref_w=2048,
    lq=LQConfig(latent_channels=16, hidden_dim=256, num_res_blocks=4, padding_mode="replicate",
                gate_type="sigma_aware_per_token", interval=2, sr_scale=4, latent_down_factor=8, pit_inject=True),
)
SIZES = {"medium": MEDIUM}


def network_flops(cfg: NetConfig, height: int, width: int, text_len: int) -> float:
    """Multiply-add FLOPs (x2) of one network evaluation (matrix products and attention only)."""
    ps = cfg.patch_size
    L, T, D = (height // ps) * (width // ps), min(text_len, cfg.txt_max_length), cfg.hidden_size
    P, C, A = ps * ps, cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size
    ff = int(2 * 4 * D / 3)
    per_block = (L + T) * (3 * D * D + D * D + 3 * D * ff) + 2 * (L + T) ** 2 * D
    flops = cfg.patch_depth * per_block + L * 3 * P * D
    per_pixel_block = L * (6 * P * C * D + 2 * P * C * A + 4 * A * A) + 2 * L * L * A + L * P * 2 * 4 * C * C
    flops += cfg.pixel_depth * per_pixel_block
    return 2.0 * flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", help="'medium' or a preset name/alias (full model)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-memory", default=None, help="memory budget for the pixel pathway, e.g. 4GB")
    parser.add_argument("--chunk", type=int, default=None, help="explicit pixel-pathway chunk (patch tokens)")
    parser.add_argument(
        "--autocast", action="store_true",
        help="reference-style precision: float32 weights under bf16 autocast (a proxy for the reference's timing)",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" and not args.autocast else torch.float32
    device = torch.device(args.device)
    cfg = SIZES[args.size] if args.size in SIZES else resolve_preset(args.size).net
    torch.manual_seed(0)
    with torch.device(device):
        net = PiDNet(cfg)
    net = net.to(dtype).eval().requires_grad_(False)
    k = cfg.lq.pixels_per_latent
    if args.height % k or args.width % k:
        raise SystemExit(f"height/width must be multiples of {k} for this size")
    latent = torch.randn(args.batch, cfg.lq.latent_channels, args.height // k, args.width // k)
    text = torch.randn(args.batch, cfg.txt_max_length, cfg.txt_embed_dim)
    kwargs = dict(height=args.height, width=args.width, steps=args.steps, chunk=args.chunk)
    if args.max_memory is not None:
        kwargs["max_memory"] = args.max_memory

    from pid_decoder.model.memory import choose_chunk

    tokens = args.batch * (args.height // cfg.patch_size) * (args.width // cfg.patch_size)
    resolved_chunk = args.chunk or choose_chunk(cfg, tokens, device, dtype, args.max_memory)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            out = sample(net, latent, text, 0.0, generator=torch.Generator().manual_seed(0), **kwargs)
        out.cpu()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        run()
    times = [run() for _ in range(args.runs)]
    flops = network_flops(cfg, args.height, args.width, text.shape[1]) * args.steps * args.batch
    result = {
        "size": args.size, "height": args.height, "width": args.width, "dtype": "autocast-bf16" if args.autocast else args.dtype,
        "device": str(device), "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch,
        "runs": args.runs, "chunk": resolved_chunk, "max_memory": args.max_memory, "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
        "tflops": round(flops / statistics.median(times) / 1e12, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
