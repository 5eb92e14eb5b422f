#!/bin/bash
# One GPU visit for issues 5 and 6 (Llama-2-7B preset, dummy weights): quantized decode vs
# bf16, FP8 W8A8 and FP8 KV cache offline vs bf16, speculative verify cost. JSON under $OUT.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
T="python3 -m turbollm.cli bench"
M="--model llama-2-7b --load-format dummy"
run() { echo "### $*"; "$@" 2>&1 | grep -v -i -E 'warn|^round|Generating' | tail -${TAIL:-6}; }
for q in none int8 int4 fp8; do
  flag=""; [ "$q" != none ] && flag="--quantization $q --group-size 128"
  run $T latency $M --batch-sizes 1,64 --input-len 128 --output-len 128 $flag --output-json $OUT/lat-$q.json
done
for extra in "" "--quantization fp8" "--kv-cache-dtype fp8"; do
  tag=$(echo "bf16 $extra" | tr -d ' -' ); TAIL=3 run $T throughput $M --dataset random --num-prompts 500 \
    --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 --max-num-batched-tokens 8192 \
    $extra --output-json $OUT/offline-$tag.json
done
if [ -f bench/scripts/gpu_spec_verify_cost.py ]; then
  TAIL=30 run python3 bench/scripts/gpu_spec_verify_cost.py
fi
