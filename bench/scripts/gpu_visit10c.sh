#!/bin/bash
# Tenth session, closing visit (one call): GPU tests of the attention kernels and the FP8 KV
# cache end to end, then prefill attention over an FP8 cache with and without the fp16 dots.
source bench/scripts/gpu_env.sh
timeout 300 "${P[@]}" -m gpu tests/kernels/test_paged_attention.py tests/kernels/test_rope_cache.py \
  tests/engine/test_fp8_kv_cache.py tests/layers/test_dense_prefill.py tests/engine/test_gpu.py \
  tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
timeout 120 python3 bench/scripts/gpu_decode_attn_fp8.py --prefill 2>&1 | grep -v -i warn | tee "$OUT/prefill_fp8.log" | tail -6
