#!/bin/bash
# Twelfth session, fifth visit (one call, ~4 min; carry .whl): where Llama-2-7B's offline time goes
# in bf16 and with FP8 W8A8 (issue 5's 1.19x against 1.3x): mixed-step and decode-step seconds,
# and a kernel breakdown of steps 20-23, with the settings of the throughput runs (256 sequences,
# 8,192 batched tokens).
source bench/scripts/gpu_env.sh
for q in none fp8; do
  flags=(); [ $q = fp8 ] && flags=(--quantization fp8)
  timeout 110 python3 bench/scripts/gpu_offline_profile.py --model llama-2-7b --max-num-seqs 256 \
    --max-num-batched-tokens 8192 --profile-steps 4 "${flags[@]}" 2>&1 | grep -v -i warn | tee "$OUT/profile-$q.log" \
    | grep -E "^(output_tok_s|mixed|decode|profiled)" 
  mv "$OUT/offline_profile.json" "$OUT/profile-$q.json"; mv "$OUT/offline_profile_kernels.txt" "$OUT/profile-$q-kernels.txt"
done
