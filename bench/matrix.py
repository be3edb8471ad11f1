"""Run `bench/decode.py` over sizes x resolutions x dtypes and append one JSON line per run to a JSONL file.

    python bench/matrix.py --sizes medium --resolutions 256 512 768 --dtypes fp32 bf16 --threads 2 --runs 3
    python bench/matrix.py --sizes pid-flux-4k --resolutions 1024 2048 4096 --dtypes bf16     # on a GPU

Each case runs in its own process (a fresh allocator, so peak memory is that case's own). A case whose
settings are already in the output file is skipped, so an interrupted matrix resumes where it stopped;
``--force`` reruns. Failed cases (out of memory, timeout) are reported on stderr and not recorded, so the
next invocation retries them. Each recorded line carries the exact command that produced it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode import parse_resolution  # noqa: E402  (one parser for both scripts)

DEFAULT_OUT = HERE / "results" / "results.jsonl"
# The settings that identify a case; a line in the output file with the same values is "already done".
KEY_FIELDS = ("size", "height", "width", "dtype", "device", "threads", "steps", "batch", "chunk_arg")


def is_done(case: dict, records: list[dict]) -> bool:
    """Whether a recorded run has the case's settings (``threads=None`` matches any thread count)."""
    fields = [f for f in KEY_FIELDS if not (f == "threads" and case[f] is None)]
    # lines written before decode.py reported chunk_arg were all automatic chunks
    return any(all(r.get(f, "auto" if f == "chunk_arg" else None) == case[f] for f in fields) for r in records)


def load_records(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: skipping a malformed line in {path}", file=sys.stderr)
    return records


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["medium"], help="'medium' and/or preset names")
    parser.add_argument("--resolutions", nargs="+", type=parse_resolution,
                        default=[parse_resolution(r) for r in ("512", "1024", "2048", "4096")])
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16"])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="pixel-pathway chunk (patch tokens)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSONL file to append to ({DEFAULT_OUT})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per case before it is abandoned")
    parser.add_argument("--force", action="store_true", help="rerun cases already in --out")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    device = args.device or default_device()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [] if args.force else load_records(args.out)
    failures = 0
    for size in args.sizes:
        for height, width in args.resolutions:
            for dtype in args.dtypes:
                key = {"size": size, "height": height, "width": width, "dtype": dtype, "device": device,
                       "threads": args.threads, "steps": args.steps, "batch": args.batch,
                       "chunk_arg": args.chunk if args.chunk is not None else "auto"}
                cmd = [sys.executable, str(HERE / "decode.py"), "--size", size, "--height", str(height),
                       "--width", str(width), "--dtype", dtype, "--device", device, "--runs", str(args.runs),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch", str(args.batch)]
                if args.threads is not None:
                    cmd += ["--threads", str(args.threads)]
                if args.chunk is not None:
                    cmd += ["--chunk", str(args.chunk)]
                shown = shlex.join(["python", "bench/decode.py", *cmd[2:]])
                if is_done(key, done):
                    print(f"skip (in {args.out.name}): {shown}", file=sys.stderr)
                    continue
                print(f"run: {shown}", file=sys.stderr, flush=True)
                if args.dry_run:
                    continue
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
                except subprocess.TimeoutExpired:
                    print(f"  timed out after {args.timeout} s", file=sys.stderr)
                    failures += 1
                    continue
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"  failed (exit {proc.returncode}): " + " | ".join(tail), file=sys.stderr)
                    failures += 1
                    continue
                record = json.loads(lines[-1])
                # decode.py's own fields win; add the settings it does not report, and the command.
                for name, value in key.items():
                    if value is not None:
                        record.setdefault(name, value)
                record["command"] = shown
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  {record['median_s']} s, peak RSS {record['peak_rss_mb']} MB"
                      + (f", peak CUDA {record['peak_cuda_mb']} MB" if "peak_cuda_mb" in record else ""),
                      file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
