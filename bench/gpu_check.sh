#!/usr/bin/env bash
# Everything we check on a GPU, in one run (a lent GPU machine is short-lived): the environment and its
# matrix-product ceiling, golden parity on CUDA, attention kernels, the decode benchmarks of the full model,
# the GPU tests, the compiled path and a profile. Each part has its own time limit; results land in $OUT
# (default bench/results/gpu). PARTS selects parts (default: all, in this order).
#
#     OUT=/tmp/gpu bash bench/gpu_check.sh
#     PARTS="env attention decode" bash bench/gpu_check.sh
#
# Benchmark lines go to $OUT/gpu.jsonl (render with: python bench/render.py --input $OUT/gpu.jsonl ...).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
R="$OUT/gpu.jsonl"
SIZE=${SIZE:-flux-4k}
PARTS=${PARTS:-env parity attention decode reference fp32 graphs tests compile memory profile offload tiled}
B=(timeout 240 "$PY" bench/decode.py --size "$SIZE" --out "$R")
part() { echo; echo "== $* ($(date +%T))"; }

env_() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/env.txt"
import torch, time
print("torch", torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"bf16 8192^3 matmul: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PYEOF
}
parity_() { timeout 120 "$PY" bench/parity.py --device cuda | tee "$OUT/parity.jsonl"; }
attention_() { timeout 120 "$PY" bench/attention.py --sizes 2048 4096 | tee "$OUT/attention.jsonl"; }
decode_() {
  "${B[@]}" --resolutions 512 1024 2048 4096 --chunks auto --runs 3 --warmup 3
  "${B[@]}" --resolutions 2048 4096 --attention flash --runs 3 --warmup 2
}
reference_() { "${B[@]}" --autocast --resolutions 1024 2048 4096 --chunks all --attention torch --runs 2 --warmup 2; }
fp32_() { "${B[@]}" --dtype fp32 --resolutions 1024 2048 --runs 2; }
graphs_() { "${B[@]}" --accel cuda-graph --resolutions 512 1024 2048 --runs 5 --warmup 2; }
tests_() { timeout 200 "$PY" -m pytest -q -m gpu ${TESTS:-tests/test_gpu.py tests/test_accel.py} 2>&1 | tail -25 | tee "$OUT/pytest.txt"; }
compile_() { timeout 240 "$PY" bench/decode.py --size "$SIZE" --out "$R" --accel compile --resolutions 2048 4096 --runs 3 --warmup 2; }
memory_() { PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "${B[@]}" --resolutions 4096 --runs 1 --warmup 1; }
offload_() { "${B[@]}" --accel offload --resolutions 2048 --runs 2 --warmup 1; }
tiled_() {
  "${B[@]}" --tile 2048 --overlap 128 --resolutions 4096 --runs 1 --warmup 1
  "${B[@]}" --tile 2048 --overlap 128 --resolutions 8192 --runs 1 --warmup 1
}
profile_() { "${B[@]}" --resolutions 2048 --runs 1 --warmup 2 --profile > "$OUT/profile.txt"; tail -40 "$OUT/profile.txt"; }

for p in $PARTS; do
  part "$p"
  "${p}_"
done

part summary
"$PY" - "$R" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['dtype']:>14} {r['accel']:>10} {r.get('attention', '-'):>6} {r['height']:>5} chunk={str(r['chunk']):>6} "
          f"{r['median_s']:8.3f} s {r['tflops']:6.1f} TFLOP/s peak {r['peak_cuda_mb'] / 1024:6.2f} GiB "
          f"(reserved {r['peak_reserved_mb'] / 1024:.2f})")
PYEOF
