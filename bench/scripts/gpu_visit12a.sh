#!/bin/bash
# Prepared in the eleventh session for the next one (one call, ~7 min): the cold run's JIT list, the GPU tests of the
# experimental FP8 decode-attention variants, their A/B against the shipped kernel and a bf16
# cache, and the fused SwiGLU's one-pass / two-pass question. Carry .whl.
source bench/scripts/gpu_env.sh
# First, on the fresh machine's empty Triton cache: which kernel variants the offline FP8 run
# compiles after start-up (the cold run lost ~10% in the tenth and eleventh sessions).
timeout 150 python3 bench/scripts/gpu_offline_profile.py --model llama-3-8b --quantization fp8 --kv-cache-dtype fp8 \
  --profile-steps 1 --log-jit 2>&1 | grep -v -i warn | tee "$OUT/offline_jit.log" | grep -A30 "first loaded" | head -32
timeout 150 "${P[@]}" -m gpu --tb=short -rf --durations=8 tests/kernels/test_paged_attention.py -k "gpu or e4m3" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|passed|failed|s call" | tail -14
timeout 200 python3 bench/scripts/gpu_decode_fp8_variants.py --json "$OUT/decode_fp8_variants.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/decode_fp8_variants.log" | tail -30
timeout 120 python3 bench/scripts/gpu_fp8_fused.py --json "$OUT/fp8_fused.json" 2>&1 | grep -v -i warn \
  | tee "$OUT/fp8_fused.log" | tail -16
