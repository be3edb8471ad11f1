"""Time each CUDA attention kernel on PiD's attention shapes, and check it against a float32 result.

    python bench/attention.py                     # 2048 and 4096 outputs of the full model
    python bench/attention.py --sizes 1024 2048 --runs 10

Shapes (full model): patch attention h=24, d=64 over L + 300 text tokens; pixel (compressed) attention h=16,
d=72 over L tokens; L = (H/16)(W/16). One JSON line per shape and kernel: milliseconds, TFLOP/s (4 N^2 h d
per call) and the rel-L2 error of its bf16 output against the memory-efficient kernel in float32.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, runs: int) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    for size in args.sizes:
        L = (size // 16) ** 2
        for name, n, h, d in (("patch", L + 300, 24, 64), ("pixel", L, 16, 72)):
            # (B, N, h, d) laid out as the network produces them, viewed as (B, h, N, d)
            q, k, v = (torch.randn(1, n, h, d, generator=g, device="cuda").transpose(1, 2) for _ in range(3))
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                ref = F.scaled_dot_product_attention(q, k, v)
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            for kernel, backend in KERNELS.items():
                def call(backend=backend, qkv=(qb, kb, vb)):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(*qkv)
                try:
                    out = call()
                except RuntimeError as err:
                    print(json.dumps({"size": size, "attention": name, "kernel": kernel,
                                      "error": str(err).splitlines()[0][:200]}), flush=True)
                    continue
                err = float((out.float() - ref).norm() / ref.norm())
                ms = time_ms(call, args.runs)
                print(json.dumps({"size": size, "attention": name, "N": n, "heads": h, "head_dim": d,
                                  "kernel": kernel, "ms": round(ms, 3),
                                  "tflops": round(4 * n * n * h * d / ms / 1e9, 1), "rel_l2_vs_fp32": float(f"{err:.3g}")}),
                      flush=True)
            del q, k, v, ref, qb, kb, vb, call


if __name__ == "__main__":
    main()
