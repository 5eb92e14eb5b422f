#!/bin/bash
# One visit: int4 GEMV with 16-byte weight loads (this tree) against the tree in .carry_old/src:
# GPU tests, the default tiling of each Llama-2-7B shape in both trees, then batch-1 / batch-64
# decode (bf16, int4 new, int4 old). Usage: bash bench/scripts/gpu_visit_int4_vec16.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
for tree in src .carry_old/src; do
  echo "### kernel defaults, $tree"
  PYTHONPATH=/tmp/site:$tree OUT=$OUT/$(basename $(dirname $tree))-k python3 bench/scripts/gpu_gemv_tune.py --fmt int4 --budget 0 2>&1 | grep -v -i warn | sed 's/; best.*//' | tail -4
done
QS="none int4" bash bench/scripts/gpu_quant_gemv_ab.sh
