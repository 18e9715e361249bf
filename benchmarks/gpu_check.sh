#!/usr/bin/env bash
# GPU check (issue 8): the Triton kernels' tests compiled on CUDA, core parity on CUDA and
# timings, as JSON lines. Under 8 minutes.
# Usage on a GPU host, from the repository root: bash benchmarks/gpu_check.sh [--quick|--seconds 1]
# Where gymnasium and ale-py import (carry their wheels to a bare host), it also runs the central
# inference server's tests, whose server then runs on CUDA. To carry them:
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#       gymnasium==1.4.0 ale-py==0.12.1 farama-notifications==0.0.4
set -uo pipefail
cd "$(dirname "$0")/.."
# Wheels carried in .whl/ (a bare GPU host has no package index) are installed first, with the
# python3 that runs the checks (the host's bare `pip` may belong to another interpreter).
if [ -d .whl ] && ! python3 -c "import gymnasium, ale_py" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl || true
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Kernels vs per-step references and the torch fast path (compiled, not interpreted, on CUDA).
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
kernels=$?
PYTHONUNBUFFERED=1 timeout 330 python3 benchmarks/gpu_bench.py "$@"
bench=$?
central=0
if python3 -c "import gymnasium, ale_py" 2>/dev/null; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_central_inference.py
    central=$?
else
    echo "gpu_check: gymnasium/ale-py missing, central inference tests skipped"
fi
echo "gpu_check: kernel tests exit $kernels, gpu_bench exit $bench, central inference exit $central"
exit $((kernels || bench || central))
