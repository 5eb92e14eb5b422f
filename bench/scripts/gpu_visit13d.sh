#!/bin/bash
# Thirteenth session, fourth visit (one call, ~5 min, H200; carry .whl and .stage/old = `git archive
# 98d46d7 src`): the Llama-2-7B FP8 recipe offline, old / new / new / old, so that a drift from run
# to run (visit 13c: every run faster than the one before) cancels out of the comparison.
source bench/scripts/gpu_env.sh
tp() {  # tree tag
  PYTHONPATH=/tmp/site:$1 timeout 100 python3 -m turbollm.cli bench throughput --model llama-2-7b --load-format dummy \
    --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --quantization fp8 --kv-cache-dtype fp8 --max-num-batched-tokens 8192 --output-json "$OUT/offline-$2.json" 2>&1 \
    | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$2.json'))['runs'][0]; print('$2', round(r['tok_per_s'], 1))"
}
tp .stage/old/src l2-old-1; tp src l2-new-1; tp src l2-new-2; tp .stage/old/src l2-old-2
