#!/bin/bash
# One visit: PDL in the quantized matmuls. GPU tests (quant_matmul, quantized layers), then
# batch-64 decode (prompt 128, 128 new) of bf16 and int4 g128, this tree and .carry_old/src.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
PYTHONPATH=/tmp/site:src timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_quant_matmul.py tests/quant/test_gpu_quant.py -p no:cacheprovider 2>&1 | tail -2
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 64 --input-len 128 --output-len 128"
for v in "new none" "new int4" "old int4"; do
  set -- $v; src=src; [ $1 = old ] && src=.carry_old/src
  flag=""; [ $2 != none ] && flag="--quantization $2 --group-size 128"
  echo "### $1 $2"; PYTHONPATH=/tmp/site:$src $L $flag --output-json "$OUT/lat64-$1-$2.json" 2>&1 | grep -v -i warn | tail -2
done
