#!/bin/bash
# One visit: what bounds the int4 GEMV (gpu_gemv_bounds.py), then PDL in the quantized
# matmuls (tree .carry_pdlq/src) against this tree: GPU tests of the quantized kernels, and
# int4 / int8 decode at batch 1 and 64 (prompt 128, 256 new). Usage: bash bench/scripts/gpu_visit_bounds_pdlq.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
(cd bench/scripts && PYTHONPATH=/tmp/site:../../src timeout 240 python3 gpu_gemv_bounds.py 2>&1 | tee "$OUT/gemv_bounds.log" | grep -v -i warn)
PYTHONPATH=/tmp/site timeout 300 python3 -m pytest -q -m gpu -o pythonpath=.carry_pdlq/src tests/kernels/test_quant_matmul.py tests/kernels/test_fp8_matmul.py -p no:cacheprovider 2>&1 | tail -3
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 --output-len 256"
for q in int4 int8; do
  flag="--quantization $q --group-size 128"
  for tree in pdlq main; do
    src=src; [ $tree = pdlq ] && src=.carry_pdlq/src
    echo "### $tree $q"; PYTHONPATH=/tmp/site:$src timeout 150 $L $flag --output-json "$OUT/lat-$tree-$q.json" 2>&1 | grep -v -i warn | tail -3
  done
done
