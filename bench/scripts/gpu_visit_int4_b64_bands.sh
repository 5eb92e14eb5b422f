#!/bin/bash
# One visit: the int4 M <= 64 tensor-core band (BLOCK_N, waves, max split-K) by the batch-64
# decode-graph replay (GPU only, ctx 256), bf16 beside it. Usage: bash bench/scripts/gpu_visit_int4_b64_bands.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
P="python3 bench/scripts/gpu_b1_probe.py --kernels-only --replay-only --batch 64"
echo "### bf16: $(OUT=$OUT/x timeout 90 $P 2>&1 | grep 'graph replay')"
for band in default 64,2,2 64,1,1 128,2,4 128,4,4 32,4,4; do
  opt=""; [ $band != default ] && opt="--int4-band64 $band"
  echo "### int4 $band: $(OUT=$OUT/x timeout 90 $P --quantization int4 $opt 2>&1 | grep 'graph replay')"
done
echo "### bf16: $(OUT=$OUT/x timeout 90 $P 2>&1 | grep 'graph replay')"
