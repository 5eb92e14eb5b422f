#!/bin/bash
# Thirteenth session, fifth and sixth visits (one call each, ~1 min on a warm H200; carry .whl and
# .stage/old = `git archive 98d46d7 src`): where the offline FP8 recipe's decode attention time went
# with tiles addressed a block at a time (this tree, PAGED for every FP8 cache at the time) and with
# the per-key loop (the old tree): 400 prompts, decode-only steps profiled.
# Usage: bash bench/scripts/gpu_visit13e.sh llama-2-7b 256 8192 120   (visit 13e)
#        bash bench/scripts/gpu_visit13e.sh llama-3-8b 512 16384 60   (visit 13f)
source bench/scripts/gpu_env.sh
for t in src .stage/old/src; do
  tag=$(echo $t | tr '/.' '__')
  PYTHONPATH=/tmp/site:$t timeout 110 python3 bench/scripts/gpu_offline_profile.py --model $1 --max-num-seqs $2 \
    --max-num-batched-tokens $3 --num-prompts 400 --quantization fp8 --kv-cache-dtype fp8 --profile-at $4 \
    --profile-steps 3 > $OUT/prof_$tag.log 2>&1
  mv $OUT/offline_profile_kernels.txt $OUT/kern_$tag.txt
  grep -E "decode_split" $OUT/kern_$tag.txt | head -3; grep -E "^steps|mixed_steps|decode_steps:" $OUT/prof_$tag.log
done
