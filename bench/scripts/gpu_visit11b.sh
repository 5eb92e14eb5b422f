#!/bin/bash
# Eleventh session, second visit (one call): the GPU tests the first visit's time-out cut off,
# issue 5's FP8 W8A8 offline ratio on Llama-2-7B (bf16 and W8A8 in the same visit), and the
# Llama-3-8B FP8 recipe with all layers FP8 and with the last decoder layer in bf16.
source bench/scripts/gpu_env.sh
timeout 200 "${P[@]}" -m gpu --tb=short -rf tests/quant/test_fp8_fused_layers.py tests/kernels/test_rope_cache.py \
  tests/quant/test_gpu_quant.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|passed|failed" | tail -8
tp() {  # model tag flags...
  local model=$1 tag=$2; shift 2
  timeout 170 python3 -m turbollm.cli bench throughput --model $model --load-format dummy \
    --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --output-json "$OUT/offline-$model-$tag.json" "$@" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$model-$tag.json'))['runs'][0]; print('$model $tag', round(r['tok_per_s'], 1))"
}
tp llama-2-7b fp8 --quantization fp8 --max-num-batched-tokens 8192
tp llama-2-7b bf16 --max-num-batched-tokens 8192
F8=(--quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384)
tp llama-3-8b fp8kv "${F8[@]}"
tp llama-3-8b fp8kv-last-bf16 "${F8[@]}" --quantization-ignore 'model.layers.31.*'
tp llama-3-8b fp8kv-2 "${F8[@]}"
