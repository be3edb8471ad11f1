"""Time the 4-step PiD decode of a preset (or the "medium" test size) with random weights.

    python bench/decode.py --size medium --height 512 --width 512 --dtype bf16 --threads 2 --runs 3
    python bench/decode.py --size flux-4k --resolutions 1024 2048 4096 --chunks auto all 8192    # on a GPU

Prints one JSON line per case (resolution x chunk): median/min seconds per decode, peak RSS (and on a GPU the
peak of `torch.cuda.max_memory_allocated`, weights included), achieved TFLOP/s, the settings and the
single-case command that reproduces the line. The network is built once for all cases. Random weights: speed
and memory do not depend on the values. On CUDA the noise comes from a CUDA generator, as in the reference,
and the time is taken between device synchronisations (the image stays on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pid_decoder import PiDNet, resolve_preset, sample, set_attention_backend  # noqa: E402
from pid_decoder.config import LQConfig, NetConfig  # noqa: E402
from pid_decoder.model.attention import ATTENTION_BACKENDS  # noqa: E402
from pid_decoder.model.memory import choose_chunk  # noqa: E402

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


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"768x1024"`` -> (768, 1024) (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"resolution must look like 1024 or 768x1024, got {text!r}")
    return parts[0], parts[1]


def parse_chunk(text: str) -> str | int:
    """``auto`` (from --max-memory / the device), ``all`` (no chunking) or a number of patch tokens."""
    if text in ("auto", "all"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"chunk must be 'auto', 'all' or a positive integer, got {text!r}")
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(net, cfg, args, device, dtype, height, width, chunk_arg) -> dict:
    k = cfg.lq.pixels_per_latent
    if height % k or width % k:
        raise SystemExit(f"height/width must be multiples of {k} for this size, got {height}x{width}")
    gen = torch.Generator(device).manual_seed(0)
    latent = torch.randn(args.batch, cfg.lq.latent_channels, height // k, width // k, generator=gen, device=device)
    text = torch.randn(args.batch, cfg.txt_max_length, cfg.txt_embed_dim, generator=gen, device=device)
    tokens = args.batch * (height // cfg.patch_size) * (width // cfg.patch_size)
    if chunk_arg == "auto":
        chunk = choose_chunk(cfg, tokens, device, dtype, args.max_memory)
    else:
        chunk = tokens if chunk_arg == "all" else min(int(chunk_arg), tokens)
    chunk = None if chunk is None or chunk >= tokens else chunk  # None: one pass over all tokens

    decode = sample
    kwargs = {"height": height, "width": width, "steps": args.steps, "chunk": chunk if chunk is not None else tokens}
    if args.tile:
        from pid_decoder.tiling import sample_tiled

        decode = sample_tiled
        kwargs.update(tile=min(args.tile, height, width), overlap=args.overlap)
        if chunk_arg == "auto":  # the chunk applies to one window: let the sampler choose it for the tile
            kwargs["chunk"] = None
    if args.accel == "cuda-graph":
        from pid_decoder.accel import sample_cuda_graph

        graphs: dict = {}
        decode = lambda *a, **kw: sample_cuda_graph(*a, graphs=graphs, **kw)  # noqa: E731

    cpu_times = []

    def run() -> float:
        _sync(device)
        cpu_start = time.process_time()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            out = decode(net, latent, text, 0.0, generator=torch.Generator(device).manual_seed(0), **kwargs)
        if device.type == "cuda":
            _sync(device)
        else:
            out.cpu()
        elapsed = time.perf_counter() - start
        cpu_times.append(time.process_time() - cpu_start)
        return elapsed

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        run()
    cpu_times.clear()
    times = [run() for _ in range(args.runs)]
    flops = network_flops(cfg, height, width, text.shape[1]) * args.steps * args.batch
    dtype_name = "autocast-bf16" if args.autocast else args.dtype
    command = ["python", "bench/decode.py", "--size", args.size, "--height", str(height), "--width", str(width),
               "--dtype", args.dtype, "--device", str(device), "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--batch", str(args.batch), "--chunks", str(chunk_arg)]
    if args.autocast:
        command.append("--autocast")
    if args.accel != "none":
        command += ["--accel", args.accel]
    if args.attention != "auto":
        command += ["--attention", args.attention]
    if args.max_memory is not None:
        command += ["--max-memory", str(args.max_memory)]
    if args.tile:
        command += ["--tile", str(args.tile), "--overlap", str(args.overlap)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = {
        "size": args.size, "height": height, "width": width, "dtype": dtype_name, "device": str(device),
        "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch, "runs": args.runs,
        "chunk": chunk, "chunk_arg": chunk_arg, "max_memory": args.max_memory, "accel": args.accel,
        "attention": args.attention, "tile": args.tile or None,
        "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
        # CPU seconds of this process per decode (all threads): on a shared machine, not inflated by steal time
        "cpu_s": round(statistics.median(cpu_times), 3),
        "tflops": round(flops / statistics.median(times) / 1e12, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "command": shlex.join(command),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
        if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
            result["alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", help="'medium' or a preset name/alias (full model)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--resolutions", nargs="+", type=parse_resolution, default=None,
                        help="several cases in one process, e.g. 1024 2048 768x1024 (overrides --height/--width)")
    parser.add_argument("--chunks", nargs="+", type=parse_chunk, default=None,
                        help="pixel-pathway chunks to time: auto (default), all, or patch tokens")
    parser.add_argument("--chunk", type=parse_chunk, default=None, help="one chunk (same as --chunks N)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-memory", default=None, help="memory budget for the pixel pathway (chunk auto), e.g. 4GB")
    parser.add_argument("--accel", choices=["none", "compile", "cuda-graph", "offload"], default="none",
                        help="optional acceleration (pid_decoder.accel; compile time is in the warm-up) or "
                             "sequential block offload (weights of the blocks in CPU memory)")
    parser.add_argument("--tile", type=int, default=0, help="approximate tiled decode with this tile size (pixels)")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap in pixels (with --tile)")
    parser.add_argument(
        "--autocast", action="store_true",
        help="reference-style precision: float32 weights under bf16 autocast (a proxy for the reference's timing)",
    )
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                        help="CUDA attention kernel order (pid_decoder.set_attention_backend)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, profile one decode of the first case and print the top kernels")
    parser.add_argument("--out", type=Path, default=None, help="also append each JSON line to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    set_attention_backend(args.attention)
    dtype = torch.bfloat16 if args.dtype == "bf16" and not args.autocast else torch.float32
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = SIZES[args.size] if args.size in SIZES else resolve_preset(args.size).net
    torch.manual_seed(0)
    with torch.device("cpu" if args.accel == "offload" else device):
        net = PiDNet(cfg)
    net = net.to(dtype).eval().requires_grad_(False)
    if args.accel == "offload":
        from pid_decoder.accel import enable_sequential_offload

        enable_sequential_offload(net, device)
    if args.accel == "compile":
        from pid_decoder.accel import compile_network

        compile_network(net)
    resolutions = args.resolutions or [(args.height, args.width)]
    chunks = args.chunks or [args.chunk if args.chunk is not None else "auto"]
    for height, width in resolutions:
        for chunk_arg in chunks:
            result = run_case(net, cfg, args, device, dtype, height, width, chunk_arg)
            line = json.dumps(result)
            print(line, flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(line + "\n")
    if args.profile:
        profile(net, cfg, args, device, *resolutions[0], chunks[0])


def profile(net, cfg, args, device, height, width, chunk_arg) -> None:
    """One decode under torch.profiler; the kernels with the most self time, to stdout."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    saved = args.runs, args.warmup
    args.runs, args.warmup = 1, 0
    with torch_profile(activities=activities) as prof:
        run_case(net, cfg, args, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                 height, width, chunk_arg)
    args.runs, args.warmup = saved
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:  # the device key's name changed across torch versions
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
            return
        except (AttributeError, KeyError, ValueError):
            continue


if __name__ == "__main__":
    main()
