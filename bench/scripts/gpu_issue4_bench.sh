#!/bin/bash
# One GPU visit for issue 4's recorded numbers (Llama-2-7B / Llama-3-8B presets, dummy weights).
# Writes JSON under $OUT; prints each command's table. Usage: bash bench/scripts/gpu_issue4_bench.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
T="python3 -m turbollm.cli bench"
run() { echo "### $*"; "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-14}; }
# decode-1 / decode-B with the bandwidth roofline; then the same without overlapped scheduling.
run $T latency --model llama-2-7b --load-format dummy --batch-sizes 1,8,32,64,128,256 \
    --input-len 128 --output-len 256 --output-json $OUT/latency-llama2-7b.json
run $T latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 \
    --output-len 256 --async-scheduling off --output-json $OUT/latency-llama2-7b-sync.json
# offline: 1000 x (512 -> 256), turbollm alone at the default memory budget.
for m in llama-2-7b llama-3-8b; do
  run $T throughput --model $m --load-format dummy --dataset random --num-prompts 1000 \
      --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
      --max-num-batched-tokens 8192 --output-json $OUT/offline-$m.json
done
# same-run transformers baseline (its copy of the weights needs room: smaller KV budget).
run $T throughput --model llama-2-7b --load-format dummy --dataset random --num-prompts 256 \
    --input-len 512 --output-len 256 --ignore-eos --compare hf --hf-single-prompts 2 \
    --hf-batch-sizes 64 --hf-num-prompts 64 --repeats 1 --max-num-batched-tokens 8192 \
    --gpu-memory-utilization 0.45 --output-json $OUT/offline-llama2-7b-vs-hf.json
