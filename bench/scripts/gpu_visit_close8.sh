#!/bin/bash
# The eighth session's closing visit, in two calls (each under the 10-minute limit):
#   bash bench/scripts/gpu_visit_close8.sh tests   # GPU tests of the session's code + gpu_pdl_early.py
#   bash bench/scripts/gpu_visit_close8.sh latency # turbollm bench latency, batch 1, bf16/int4/int8 alternating
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-tests}" = tests ]; then
  P=(python3 -m pytest -q -o "pythonpath=/tmp/site src" -p no:cacheprovider)
  timeout 300 "${P[@]}" -m gpu tests/kernels/test_gemv.py tests/kernels/test_top_p_kernel.py tests/sample \
    tests/engine/test_gpu.py tests/engine/test_cuda_graphs.py 2>&1 | tail -3
  timeout 60 "${P[@]}" tests/kernels/test_gemv.py -k early_tile 2>&1 | tail -1
  timeout 240 python3 bench/scripts/gpu_pdl_early.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_pdl_early.log" | tail -14
else
  L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1 --input-len 128 --output-len 256"
  i=0; for q in none int4 int8 none int4 int8; do i=$((i+1))
    flag=""; [ $q != none ] && flag="--quantization $q --group-size 128"
    echo "### $i $q"; timeout 90 $L $flag --output-json "$OUT/lat-$i-$q.json" 2>&1 | grep -v -i warn | grep "batch\|copy"
  done
fi
