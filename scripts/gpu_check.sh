#!/usr/bin/env bash
# The attention backends on a GPU, in one command:
#   1. the backend tests and the batching tests, on the GPU (Triton compiled, not interpreted;
#      the slow ones included),
#   2. every backend timed at prefill and decode in the embedded model's shape (bfloat16),
#      printed and written with the card's name and the date to docs/gpu_results.md.
# Without CUDA it runs a reduced CPU mode (Triton interpreted, 2 layers, short lengths) that
# only checks the script works, and writes to /tmp instead of docs/.
set -uo pipefail
cd "$(dirname "$0")/.."

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=0            # tests/conftest.py defaults it to 1 (the CPU's case)
    python -m pytest -q tests/engine/test_attention.py tests/engine/test_attention_generate.py \
        tests/engine/test_attention_measure.py tests/engine/test_batch.py
    tests=$?
    python scripts/gpu_check.py --out docs/gpu_results.md "$@"
    timing=$?
else
    echo "no CUDA device: reduced CPU mode (checks the script, numbers mean little)"
    export TRITON_INTERPRET=1
    tests=0                              # the CPU runs these tests in the normal suite
    python scripts/gpu_check.py --quick --out "${GPU_CHECK_OUT:-/tmp/gpu_results_cpu.md}" "$@"
    timing=$?
fi
echo "tests exit status: $tests, timing exit status: $timing"
[ "$tests" -eq 0 ] && [ "$timing" -eq 0 ]
