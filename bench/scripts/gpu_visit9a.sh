#!/bin/bash
# Ninth session, first visit (one call, < 10 minutes): what the non-GEMV kernels cost a
# batch-1 decode step under PDL (graph ablations), int8 pre-wait tiles per prologue, what
# sampling costs batch 1, and the GPU tests of the sampler (changed on CPU last session).
source bench/scripts/gpu_env.sh
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
