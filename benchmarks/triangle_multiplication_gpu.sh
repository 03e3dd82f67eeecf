#!/usr/bin/env bash
# One GPU session: GPU tests of the triangle multiplication kernels, then the benchmark.
# Usage (repo root, PYTHONPATH with src and the peers): bash benchmarks/triangle_multiplication_gpu.sh OUTDIR [bench args]
set -u
out=${1:-benchmarks/results/h100}; shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_triangle_multiplication_kernel.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
python benchmarks/triangle_multiplication.py --out "$out" "$@" 2>&1 | tee "$out/bench.txt"
