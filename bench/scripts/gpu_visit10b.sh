#!/bin/bash
# Tenth session, second FP8-KV visit, on the same warm machine as gpu_visit10a.sh (Triton's
# cache already holds both trees' kernels, so neither run pays JIT compiles): the offline
# runs with an FP8 KV cache again, the committed tree first this time.
source bench/scripts/gpu_env.sh
tp() {  # tree model tag flags...
  local tree=$1 model=$2 tag=$3; shift 3
  PYTHONPATH=/tmp/site:$tree timeout 170 python3 -m turbollm.cli bench throughput --model $model --load-format dummy \
    --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --output-json "$OUT/offline-$model-$tag.json" "$@" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$model-$tag.json'))['runs'][0]; print('$model $tag', round(r['tok_per_s'], 1))"
}
for tree in .stage/old/src src; do
  t=$([ $tree = src ] && echo new || echo old)
  tp $tree llama-3-8b fp8kv-$t-2 --quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384
  tp $tree llama-2-7b kvfp8-$t-2 --kv-cache-dtype fp8 --max-num-batched-tokens 8192
done
