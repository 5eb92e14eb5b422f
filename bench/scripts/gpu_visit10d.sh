#!/bin/bash
# Tenth session, last visit (one call): KV splits for decode attention over an FP8 cache, and
# where the Llama-3-8B FP8 recipe's offline run spends its time (mixed vs decode-only steps,
# kernels of four mixed steps).
source bench/scripts/gpu_env.sh
timeout 100 python3 bench/scripts/gpu_decode_attn_fp8.py --splits 2>&1 | grep -v -i warn | tee "$OUT/splits.log" | tail -7
timeout 170 python3 bench/scripts/gpu_offline_profile.py --model llama-3-8b --quantization fp8 --kv-cache-dtype fp8 \
  --profile-at 20 --profile-steps 4 2>&1 | grep -v -i warn | tee "$OUT/profile.log" | tail -32
