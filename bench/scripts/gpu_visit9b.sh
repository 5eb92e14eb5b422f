#!/bin/bash
# Ninth session, second visit, two calls (each under the 10-minute limit):
#   bash bench/scripts/gpu_visit9b.sh ablate   # GPU test of the quantized LM head; decode-attention settings in the b1 graph
#   bash bench/scripts/gpu_visit9b.sh latency  # bench latency b1 / b64: bf16, int4 and int8 with and without --quantize-lm-head
source bench/scripts/gpu_env.sh
if [ "${1:-ablate}" = ablate ]; then
  timeout 120 "${P[@]}" -m gpu tests/quant/test_gpu_quant.py -k "lm_head" 2>&1 | tail -2
  timeout 400 python3 bench/scripts/gpu_pdl_early.py --ablate --formats int4,bf16 2>&1 | grep -v -i warn \
    | tee "$OUT/gpu_ablate_attn.log" | tail -22
else
  L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 --output-len 256"
  i=0; for q in none int4 int4h int8 int8h none int4 int4h; do i=$((i+1))
    case $q in none) flag="";; int4) flag="--quantization int4 --group-size 128";;
      int8) flag="--quantization int8";; int4h) flag="--quantization int4 --group-size 128 --quantize-lm-head";;
      int8h) flag="--quantization int8 --quantize-lm-head";; esac
    echo "### $i $q"; timeout 100 $L $flag --output-json "$OUT/lat-$i-$q.json" 2>&1 | grep -v -i warn | grep "batch\|copy" | head -4
  done
fi
