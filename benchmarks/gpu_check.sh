#!/usr/bin/env bash
# The GPU check, in one command, for a machine with an NVIDIA GPU and no network:
#
#     bash benchmarks/gpu_check.sh [WHEEL ...]
#
# Its Python must already have numba, numba-cuda, llvmlite, numpy, torch and pytest. Anything
# else cnnc needs (lark, hypothesis, ...) comes from the wheel files given as arguments, made
# beforehand on a machine with network access:
#
#     pip download --only-binary=:all: -d wheels lark hypothesis setuptools wheel
#     bash benchmarks/gpu_check.sh wheels/*.whl
#
# It runs the CUDA tests on the real GPU (NUMBA_ENABLE_CUDASIM=0: the tests marked for a GPU
# run too), then benchmarks W1-W4 against PyTorch with cuDNN (TF32 off), and prints the
# table. Everything it writes goes to $OUT (default gpu_check_out/). Bounded to 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

if [ "$#" -gt 0 ]; then
    python -m pip install --no-index --no-deps --quiet "$@" || exit 1
fi
python -m pip install --no-index --no-deps --no-build-isolation --quiet . || exit 1

export NUMBA_ENABLE_CUDASIM=0
status=0
timeout 240 python -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.txt" || status=1
timeout 240 python benchmarks/gpu_bench.py --repeats 7 --json "$OUT/gpu_bench.json" 2>&1 \
    | tee "$OUT/bench.txt" || status=1
exit $status
