#!/bin/bash
# Eleventh session, first visit (one call): GPU tests of what landed untested (one attention
# output for every route) and of this session's kernels (norm / SwiGLU writing FP8 activations,
# the wide rotary / KV-write kernel), their micro-benchmarks, then the offline Llama-3-8B FP8
# recipe (W8A8 + FP8 KV), the committed tree (.stage/old) against this one: a short warm-up run
# of each (Triton JIT), then old / new / old / new.
source bench/scripts/gpu_env.sh
timeout 260 "${P[@]}" -m gpu tests/kernels/test_fp8_fused.py tests/quant/test_fp8_fused_layers.py \
  tests/kernels/test_fp8_matmul.py tests/kernels/test_rope_cache.py tests/kernels/test_paged_attention.py \
  tests/layers/test_dense_prefill.py tests/engine/test_fp8_kv_cache.py tests/engine/test_cuda_graphs.py \
  tests/engine/test_gpu.py tests/quant/test_gpu_quant.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -12
[ -f bench/scripts/gpu_rope_rotate.py ] && timeout 60 python3 bench/scripts/gpu_rope_rotate.py --json "$OUT/rope.json" --baseline .stage/old/src/turbollm/kernels/rope_cache.py 2>&1 \
  | grep -v -i warn | tee "$OUT/rope.log" | tail -12
tp() {  # tree tag prompts
  PYTHONPATH=/tmp/site:$1 timeout 150 python3 -m turbollm.cli bench throughput --model llama-3-8b --load-format dummy \
    --dataset random --num-prompts $3 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384 \
    --output-json "$OUT/offline-$2.json" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$2.json'))['runs'][0]; print('$2', round(r['tok_per_s'], 1))"
}
tp .stage/old/src warm-old 300; tp src warm-new 300
for r in 1 2; do tp .stage/old/src old-$r 1000; tp src new-$r 1000; done
