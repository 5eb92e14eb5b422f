#!/bin/bash
# Twelfth session, third visit (one call, ~8 min; carry .whl and .stage/old = `git archive eec0f22 src`,
# the eleventh session's tree): GPU tests of the FP8 decode loop chosen by the grid and the
# one-pass SwiGLU, then the offline Llama-3-8B FP8 recipe (W8A8 + FP8 KV): first this tree on
# the fresh machine's empty Triton cache (cold: the prefill kernel's JIT misses are gone), then
# a warm-up of the old tree, then old / new / old / new.
source bench/scripts/gpu_env.sh
timeout 150 "${P[@]}" -m gpu --tb=short -rf tests/kernels/test_fp8_fused.py tests/quant/test_fp8_fused_layers.py \
  tests/engine/test_fp8_kv_cache.py "tests/kernels/test_paged_attention.py::test_gpu_decode_fp8_variants_real_shapes" \
  "tests/kernels/test_paged_attention.py::test_gpu_fp8_variants_accuracy" 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -E "^FAILED|^E  |passed|failed" | tail -8
tp() {  # tree tag prompts
  PYTHONPATH=/tmp/site:$1 timeout 150 python3 -m turbollm.cli bench throughput --model llama-3-8b --load-format dummy \
    --dataset random --num-prompts $3 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384 \
    --output-json "$OUT/offline-$2.json" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$2.json'))['runs'][0]; print('$2', round(r['tok_per_s'], 1))"
}
tp src cold-new 1000; tp .stage/old/src warm-old 300
for r in 1 2; do tp .stage/old/src old-$r 1000; tp src new-$r 1000; done
