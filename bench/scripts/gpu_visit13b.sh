#!/bin/bash
# Thirteenth session, second visit (one call, ~9 min, H200; carry .whl and .stage/old = `git archive
# 98d46d7 src`, the twelfth session's tree): decode attention with whole tiles addressed a block at a
# time (PAGED) against the per-key loop, kernel table first; its GPU tests; then the offline FP8
# recipes, new / old trees alternating (the first run of each tree compiles its kernels).
# gpu_visit13c.sh runs this with VARIANT_FLAGS, VARIANTS and TESTS_K set.
source bench/scripts/gpu_env.sh
timeout 170 python3 bench/scripts/gpu_decode_fp8_variants.py --rounds 2 ${VARIANT_FLAGS:-} \
  --variants "${VARIANTS:-shipped,bf16 cache per key,words per key,plain per key,fp8_words,plain}" \
  --json "$OUT/fp8_variants.json" 2>&1 | tail -11
timeout 90 "${P[@]}" -m gpu --tb=short -rf tests/kernels/test_paged_attention.py -k "${TESTS_K:-gpu}" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|^E  |passed|failed" | tail -6
tp() {  # tree tag model prompts flags...
  local tree=$1 tag=$2 model=$3 n=$4; shift 4
  PYTHONPATH=/tmp/site:$tree timeout 100 python3 -m turbollm.cli bench throughput --model $model --load-format dummy \
    --dataset random --num-prompts $n --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 \
    --output-json "$OUT/offline-$tag.json" "$@" 2>&1 | grep -i "error" | tail -2
  python3 -c "import json; r=json.load(open('$OUT/offline-$tag.json'))['runs'][0]; print('$tag', round(r['tok_per_s'], 1))"
}
L3=(--quantization fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --max-num-batched-tokens 16384)
L2=(--quantization fp8 --kv-cache-dtype fp8 --max-num-batched-tokens 8192)
for r in 1 2; do
  tp src l3-new-$r llama-3-8b 1000 "${L3[@]}"; tp .stage/old/src l3-old-$r llama-3-8b 1000 "${L3[@]}"
done
for r in 1 2; do
  tp src l2-new-$r llama-2-7b 1000 "${L2[@]}"; tp .stage/old/src l2-old-$r llama-2-7b 1000 "${L2[@]}"
done
