#!/bin/bash
# Tenth session, first FP8-KV visit (one call, < 10 minutes): decode attention over an FP8
# cache (fp16 multiply, keys a step) swept at the offline batches, then the offline runs with
# an FP8 KV cache, the committed tree (.stage/old/src, carried) against this one, alternating.
source bench/scripts/gpu_env.sh
timeout 150 python3 bench/scripts/gpu_decode_attn_fp8.py 2>&1 | grep -v -i warn | tee "$OUT/decode_attn_sweep.log" | tail -7
tp() {  # tree model tag flags...
  local tree=$1 model=$2 tag=$3; shift 3
  PYTHONPATH=/tmp/site:$tree timeout 170 python3 -m turbollm.cli bench throughput --model $model --load-format dummy \
    --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --output-json "$OUT/offline-$model-$tag.json" "$@" 2>&1 | grep -i "tok/s\|error" | tail -2
}
for tree in src .stage/old/src; do
  t=$([ $tree = src ] && echo new || echo old)
  echo "== llama-3-8b fp8 W8A8 + fp8 KV, $t"; tp $tree llama-3-8b fp8kv-$t --quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384
  echo "== llama-2-7b fp8 KV, $t"; tp $tree llama-2-7b kvfp8-$t --kv-cache-dtype fp8 --max-num-batched-tokens 8192
done
