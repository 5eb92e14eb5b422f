#!/bin/bash
# One GPU visit after merging: the GPU-marked tests of the quantized kernels, the batch-1 GEMV,
# attention, quantized layers and the engine. Carry .whl. Log under $OUT.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/quant tests/layers \
  tests/engine/test_cuda_graphs.py tests/engine/test_gpu.py 2>&1 | tail -${TAIL:-15}
