#!/usr/bin/env bash
# The checks that need a real CUDA GPU, in one go: the GPU tests, then the benchmarks
# that have a GPU half. Run it in a checkout on a GPU machine where gpufaas is installed
# with the gpu extra (`pip install -e '.[dev,gpu]'` after torch); CI machines have no GPU
# and skip these tests.
#
#   bash scripts/gpu_checks.sh [OUT_DIR]     (default: gpu-results/)
#
# Each step's output goes to OUT_DIR/<step>.log as well as the terminal; a failing step
# does not stop the next one, and the script exits non-zero if any failed.
set -uo pipefail
out=${1:-gpu-results}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME COMMAND...
    local name=$1
    shift
    echo "=== $name: $*" | tee "$out/$name.log"
    if ! "$@" 2>&1 | tee -a "$out/$name.log"; then
        echo "=== $name FAILED" | tee -a "$out/$name.log"
        failed=1
    fi
}

step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Other torch/CUDA builds warn differently: warnings are shown here, not made errors.
step tests "$python" -m pytest tests/gpu -v -rA -p no:cacheprovider -W default
step h2d_copy "$python" bench/h2d_copy.py --sizes 16,64,256,1024 --reps 10
step memory_alloc "$python" bench/memory_alloc.py --ops 20000
step batching "$python" bench/batching.py --devices auto --clients 32 --seconds 5 --rounds 2
exit $failed
