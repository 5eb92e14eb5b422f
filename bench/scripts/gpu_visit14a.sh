#!/bin/bash
# Prepared in the thirteenth session for the next one (not yet run; one call, ~9 min on an H200,
# carry .whl): the batch-1 GEMV tilings re-swept on the H200, where Nsight Compute showed the
# int4 / int8 qkv GEMVs launching less than one wave (384 / 768 programs) at 17-32% of the
# possible warps (docs/performance.md, thirteenth session); then the batch-1 ratios on this card
# with the shipped tiles, so a change has its same-run baseline.
source bench/scripts/gpu_env.sh
timeout 200 python3 bench/scripts/gpu_gemv_tune.py --fmt int4 --small --budget 25 2>&1 | tail -12
timeout 150 python3 bench/scripts/gpu_gemv_tune.py --fmt int4 --budget 25 2>&1 | tail -8
timeout 120 python3 bench/scripts/gpu_gemv_tune.py --fmt int8 --budget 20 2>&1 | tail -8
for q in none int4 int8; do
  timeout 60 python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1 \
    --input-len 128 --output-len 128 --quantization $q --group-size 128 --output-json "$OUT/latency-$q.json" 2>&1 \
    | grep -E "batch|error" | tail -3
done
