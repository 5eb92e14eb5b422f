#!/bin/bash
# Ninth session, first visit (one call, < 10 minutes): what the non-GEMV kernels cost a
# batch-1 decode step under PDL (graph ablations), int8 pre-wait tiles per prologue, what
# sampling costs batch 1, and the GPU tests of the sampler (changed on CPU last session).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
P=(python3 -m pytest -q -o "pythonpath=/tmp/site src" -p no:cacheprovider)
timeout 120 "${P[@]}" -m gpu tests/sample tests/kernels/test_top_p_kernel.py 2>&1 | tail -2
timeout 200 python3 bench/scripts/gpu_pdl_early.py --ablate --formats bf16,int4 2>&1 | grep -v -i warn \
  | tee "$OUT/gpu_ablate.log" | tail -14
cp "$OUT/gpu_pdl_early.json" "$OUT/gpu_ablate.json" 2>/dev/null
timeout 120 python3 bench/scripts/gpu_pdl_early.py --formats int8 2>&1 | grep -v -i warn \
  | tee "$OUT/gpu_int8_early.log" | tail -4
for q in none int4; do
  flag=""; [ $q != none ] && flag="--quantization $q"
  timeout 100 python3 bench/scripts/gpu_b1_sampling_cost.py $flag --rounds 2 2>&1 | grep -v -i warn \
    | tee "$OUT/gpu_b1_sampling_$q.log" | tail -4
  cp "$OUT/gpu_b1_sampling_cost.json" "$OUT/gpu_b1_sampling_cost_$q.json" 2>/dev/null
done
