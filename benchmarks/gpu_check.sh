#!/usr/bin/env bash
# GPU check (issue 8): core parity on CUDA and timings, as JSON lines. Under 8 minutes.
# Usage on a GPU host, from the repository root: bash benchmarks/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 460 python3 benchmarks/gpu_bench.py "$@"
