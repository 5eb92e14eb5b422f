#!/bin/bash
# One visit: GPU tests of decode attention / rotary loading before their PDL wait, then the
# replay A/B (bench/scripts/gpu_pdl_early.py --attention) at batch 1 and 64.
# Usage: bash bench/scripts/gpu_visit_attn_early.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
P=(python3 -m pytest -q -o "pythonpath=/tmp/site src" -p no:cacheprovider)
timeout 240 "${P[@]}" -m gpu tests/kernels/test_paged_attention.py tests/kernels/test_rope_cache.py \
  tests/engine/test_gpu.py tests/engine/test_cuda_graphs.py tests/engine/test_fp8_kv_cache.py 2>&1 | tail -3
timeout 300 python3 bench/scripts/gpu_pdl_early.py --attention --formats bf16,int4 --batches 1,64 2>&1 \
  | grep -v -i warn | tee "$OUT/gpu_pdl_early.log" | tail -12
