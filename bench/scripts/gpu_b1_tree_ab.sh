#!/bin/bash
# One GPU visit: the kernel / CUDA-graph / engine GPU tests, then batch-1 decode (Llama-2-7B
# dummy, prompt 128, 256 new) with this tree ("new") and an older tree carried as
# .carry_old/src ("old", e.g. `git archive <rev> src | tar -x -C .carry_old`), two alternating
# rounds in the same visit. Carry .whl and .carry_old.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_gemv.py tests/kernels/test_paged_attention.py \
  tests/engine/test_cuda_graphs.py tests/engine/test_gpu.py -p no:cacheprovider 2>&1 | tail -4
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1 --input-len 128 --output-len 256"
for round in 1 2; do
  for tree in new old; do
    p=src; [ $tree = old ] && p=.carry_old/src
    echo "### $tree round $round"
    PYTHONPATH=/tmp/site:$p $L --output-json "$OUT/lat-$tree-$round.json" 2>&1 | grep -v -i warn | tail -3
  done
done
