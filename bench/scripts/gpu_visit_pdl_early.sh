#!/bin/bash
# One visit: GPU tests of the session's changes (GEMV early tile / trigger placements, the top-p
# kernel and its warm-up, the sampler), then bench/scripts/gpu_pdl_early.py.
# Usage: bash bench/scripts/gpu_visit_pdl_early.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 -m pytest -q -o pythonpath="/tmp/site src" -x -m gpu tests/kernels/test_top_p_kernel.py \
  tests/sample tests/kernels/test_gemv.py 2>&1 | tail -5
timeout 60 python3 -m pytest -q -o pythonpath="/tmp/site src" -x tests/kernels/test_gemv.py -k early_tile 2>&1 | tail -2
timeout 330 python3 bench/scripts/gpu_pdl_early.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_pdl_early.log" | tail -22
