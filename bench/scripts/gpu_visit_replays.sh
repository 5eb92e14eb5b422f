#!/bin/bash
# One visit: decode-graph replay times (GPU only, ctx 256; bench/scripts/gpu_b1_probe.py
# --replay-only). int8 batch 1 with its first GEMV tile loaded early (this tree) against
# .carry_old/src, 2 rounds; the int4 batch-1 replay's kernels; batch 64 bf16 / int4 / int8
# (this tree) with the int4 kernels. Usage: bash bench/scripts/gpu_visit_replays.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q tests/kernels/test_gemv.py -p no:cacheprovider 2>&1 | tail -1
P="python3 bench/scripts/gpu_b1_probe.py --kernels-only --replay-only"
for r in 1 2; do for tree in new old; do
  src=src; [ $tree = old ] && src=.carry_old/src
  echo "### round $r int8 b1 $tree: $(OUT=$OUT/x PYTHONPATH=/tmp/site:$src timeout 90 $P --quantization int8 2>&1 | grep 'graph replay')"
done; done
echo "### int4 b1 kernels"; OUT=$OUT/x timeout 90 $P --quantization int4 --profile-replay 2>&1 | grep -v -i warn | tail -17
for q in none int4 int8 none; do
  flag=""; [ $q != none ] && flag="--quantization $q"
  extra=""; [ $q = int4 ] && extra="--profile-replay"
  echo "### b64 $q"; OUT=$OUT/x timeout 90 $P --batch 64 $flag $extra 2>&1 | grep -v -i warn | grep -v "cold start" | tail -17
done
