#!/bin/bash
# One visit: the int4 GEMV's first weight tile loaded before the RMSNorm prologue's sum of
# squares. GPU tests of the GEMV, default-tiling int4 GEMV times of both trees
# (gpu_gemv_tune.py --budget 0), then the batch-1 decode graph's replay time (ctx 256, GPU
# only: host noise out) bf16 and int4 g128, alternating this tree and .carry_old/src, 2 rounds.
# Usage: bash bench/scripts/gpu_visit_gemv_prefetch.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q tests/kernels/test_gemv.py -p no:cacheprovider 2>&1 | tail -1
for tree in new old; do
  src=../../src; [ $tree = old ] && src=../../.carry_old/src
  echo "### gemv int4 $tree"
  (cd bench/scripts && OUT=$OUT/$tree PYTHONPATH=/tmp/site:$src timeout 100 python3 gpu_gemv_tune.py --fmt int4 --budget 0 2>&1 | grep -v -i warn | grep -E "^l2" | cut -c1-60)
done
for r in 1 2; do for q in none int4; do for tree in new old; do
  src=src; [ $tree = old ] && src=.carry_old/src
  flag=""; [ $q != none ] && flag="--quantization $q"
  echo "### round $r $q $tree: $(OUT=$OUT/replay-$r-$q-$tree PYTHONPATH=/tmp/site:$src timeout 90 python3 bench/scripts/gpu_b1_probe.py --kernels-only --replay-only $flag 2>&1 | grep 'graph replay')"
done; done; done
