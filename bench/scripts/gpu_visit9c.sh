#!/bin/bash
# Ninth session, closing visit, two calls:
#   bash bench/scripts/gpu_visit9c.sh          # GPU tests: quantized paths, GEMV, sampler, greedy parity, graphs
#   bash bench/scripts/gpu_visit9c.sh latency  # bench latency b1 / b64 (bf16, int8, int8 + head, int4 + head) + head timing
source bench/scripts/gpu_env.sh
[ "${1:-}" = latency ] || timeout 540 "${P[@]}" -m gpu tests/quant tests/kernels/test_gemv.py tests/sample tests/engine/test_gpu.py \
  tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
if [ "${1:-}" = latency ]; then
  L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 --output-len 256"
  i=0; for q in none int8 int8h int4h none int8 int8h int4h; do i=$((i+1))
    case $q in none) flag="";; int4h) flag="--quantization int4 --group-size 128 --quantize-lm-head";;
      int8) flag="--quantization int8";; int8h) flag="--quantization int8 --quantize-lm-head";; esac
    echo "### $i $q"; timeout 100 $L $flag --output-json "$OUT/lat-$i-$q.json" 2>&1 | grep -v -i warn | grep "batch\|copy" | head -4
  done
  timeout 120 python3 bench/scripts/gpu_lm_head.py 2>&1 | grep -v -i warn | tail -6
fi
