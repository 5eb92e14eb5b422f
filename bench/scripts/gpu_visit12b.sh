#!/bin/bash
# Twelfth session, second visit (one call, ~6 min; carry .whl): the prefill kernel no longer
# specialized on its per-step table pointers (the cold run's two JIT misses, visit 12a), the
# fp8_qk variant with its two scores accumulated apart (visit 12a: 8x the error), the decode
# variants at more batches and forced split counts, and the fused FP8 kernels' timing.
source bench/scripts/gpu_env.sh
timeout 150 python3 bench/scripts/gpu_offline_profile.py --model llama-3-8b --quantization fp8 --kv-cache-dtype fp8 \
  --profile-steps 1 --log-jit 2>&1 | grep -v -i warn | tee "$OUT/offline_jit.log" | grep -E -A4 "^output_tok_s|first loaded" | head -12
timeout 100 "${P[@]}" -m gpu --tb=short -rf tests/kernels/test_paged_attention.py -k "fp8_variants" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|^E  |passed|failed|error vs" | tail -14
timeout 240 python3 bench/scripts/gpu_decode_fp8_variants.py --json "$OUT/decode_fp8_variants.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/decode_fp8_variants.log" | sed -n '/== decode/,$p'
timeout 120 python3 bench/scripts/gpu_fp8_fused.py --json "$OUT/fp8_fused.json" 2>&1 | grep -v -i warn \
  | tee "$OUT/fp8_fused.log" | tail -16
