#!/bin/bash
# One visit: programmatic dependent launch of the GEMVs. GPU tests (GEMV kernels, CUDA-graph
# replay), then batch-1 decode, issue-4 protocol (prompt 128, 256 new), bf16 and int4 g128,
# alternating this tree ("new") and .carry_old/src ("old"). Usage: bash bench/scripts/gpu_visit_pdl.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
PYTHONPATH=/tmp/site:src timeout 300 python3 -m pytest -q -m gpu ${TESTS:-tests/kernels/test_gemv.py tests/engine/test_cuda_graphs.py tests/worker} -p no:cacheprovider 2>&1 | tail -3
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1 --input-len 128 --output-len 256"
for q in none int4; do
  flag=""; [ "$q" != none ] && flag="--quantization $q --group-size 128"
  for tree in new old; do
    src=src; [ $tree = old ] && src=.carry_old/src
    echo "### $tree $q"; PYTHONPATH=/tmp/site:$src $L $flag --output-json "$OUT/lat-pdl-$tree-$q.json" 2>&1 | grep -v -i warn | tail -2
  done
done
