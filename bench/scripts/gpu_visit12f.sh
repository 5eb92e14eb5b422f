#!/bin/bash
# Twelfth session, last visit (one call, ~3 min; carry .whl): a kernel breakdown of Llama-2-7B's
# mixed steps (steps 5-7: 8,192 batched tokens of prompts beside the decodes), bf16 and FP8 W8A8,
# 300 prompts (visit 12e profiled decode-only steps).
source bench/scripts/gpu_env.sh
for q in none fp8; do
  flags=(); [ $q = fp8 ] && flags=(--quantization fp8)
  timeout 80 python3 bench/scripts/gpu_offline_profile.py --model llama-2-7b --max-num-seqs 256 --num-prompts 300 \
    --max-num-batched-tokens 8192 --profile-at 5 --profile-steps 3 "${flags[@]}" 2>&1 | grep -v -i warn \
    | tee "$OUT/profile-mixed-$q.log" | grep -E "^(profiled)" -A12 | grep -v "^decode_steps_host"
done
