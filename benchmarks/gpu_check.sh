#!/usr/bin/env bash
# The first thing to run on a machine with a GPU (under 8 minutes on an H100):
#   1. the CUDA-marked tests (bf16 training, fused AdamW, moments off the GPU between rounds,
#      a leaf's model sharded by FSDP2 over NCCL),
#   2. the local-training benchmark on the GPU: worldlm's leaf step against a plain PyTorch
#      loop on the same model, bf16 autocast, block 1024, presets small / 125m / 250m, and
#      125m with torch.compile,
#   3. one table of tokens/s, the worldlm/plain ratio and MFU (benchmarks/gpu_summary.py).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default /tmp/gpu_check
#
# Needs the project installed (pip install -e '.[dev]'). Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/gpu_check}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# A failing test is reported, and the benchmarks still run (their numbers are wanted either way).
python -m pytest -q -m cuda tests/test_cuda.py tests/test_fsdp.py -p no:cacheprovider 2>&1 | tee "$out/tests.txt" \
  || echo "CUDA tests FAILED; see $out/tests.txt"

bench() {  # NAME ARGS...: one benchmark row set, its JSON under $out
  local name="$1"; shift
  python benchmarks/local_training.py --device cuda --block-size 1024 --vocab 32000 \
    --blocks 64 --warmup 2 --reps 5 "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 \
    || { echo "benchmark $name failed; see $out/$name.txt"; tail -5 "$out/$name.txt"; }
}
bench small --preset small --batch-size 16 --steps 10
bench 125m --preset 125m --batch-size 8 --steps 10
bench 125m-compile --preset 125m --batch-size 8 --steps 10 --compile
bench 250m --preset 250m --batch-size 8 --steps 8

shopt -s nullglob
results=("$out"/*.json)
if ((${#results[@]})); then
  python benchmarks/gpu_summary.py "${results[@]}" | tee "$out/summary.txt"
else
  echo "no benchmark finished; see $out/*.txt"
fi
