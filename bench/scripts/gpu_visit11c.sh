#!/bin/bash
# Eleventh session, closing visit (one call): the fused-FP8 model test at 300 prompt tokens
# (torch._scaled_mm route), then issue 5's FP8 W8A8 offline ratio on Llama-2-7B with a warm
# Triton cache (a 200-prompt run of each first), bf16 and W8A8 alternating.
source bench/scripts/gpu_env.sh
timeout 100 "${P[@]}" -m gpu --tb=short -rf tests/quant/test_fp8_fused_layers.py 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -E "^FAILED|passed|failed" | tail -4
tp() {  # tag prompts flags...
  local tag=$1 n=$2; shift 2
  timeout 150 python3 -m turbollm.cli bench throughput --model llama-2-7b --load-format dummy \
    --dataset random --num-prompts $n --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --max-num-batched-tokens 8192 --output-json "$OUT/offline-llama-2-7b-$tag.json" "$@" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-llama-2-7b-$tag.json'))['runs'][0]; print('$tag', round(r['tok_per_s'], 1))"
}
tp warm-bf16 200; tp warm-fp8 200 --quantization fp8
tp bf16 1000; tp fp8 1000 --quantization fp8
