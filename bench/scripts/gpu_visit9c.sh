#!/bin/bash
# Ninth session, closing visit (one call): the GPU tests of the quantized paths, the GEMV, the
# sampler, greedy parity with transformers and graph replay, on the final tree.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
P=(python3 -m pytest -q -o "pythonpath=/tmp/site src" -p no:cacheprovider)
timeout 540 "${P[@]}" -m gpu tests/quant tests/kernels/test_gemv.py tests/sample tests/engine/test_gpu.py \
  tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
