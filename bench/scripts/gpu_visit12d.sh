#!/bin/bash
# Twelfth session, fourth visit (one call, ~6 min; carry .whl): the GPU tests visit 12c's time-out
# cut off (the FP8 decode loops first), then issue 5's FP8 offline ratios on Llama-2-7B in one
# visit: bf16, W8A8, W8A8 + FP8 KV cache (1000 x 512 -> 256).
source bench/scripts/gpu_env.sh
timeout 130 "${P[@]}" -m gpu --tb=short -rf "tests/kernels/test_paged_attention.py::test_gpu_decode_fp8_variants_real_shapes" \
  "tests/kernels/test_paged_attention.py::test_gpu_fp8_variants_accuracy" tests/quant/test_fp8_fused_layers.py \
  tests/engine/test_fp8_kv_cache.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|^E  |passed|failed" | tail -8
tp() {  # tag flags...
  local tag=$1; shift
  timeout 150 python3 -m turbollm.cli bench throughput --model llama-2-7b --load-format dummy \
    --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --max-num-batched-tokens 8192 --output-json "$OUT/offline-llama-2-7b-$tag.json" "$@" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-llama-2-7b-$tag.json'))['runs'][0]; print('$tag', round(r['tok_per_s'], 1))"
}
tp bf16; tp fp8 --quantization fp8; tp fp8-fp8kv --quantization fp8 --kv-cache-dtype fp8
