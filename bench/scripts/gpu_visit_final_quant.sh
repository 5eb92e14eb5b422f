#!/bin/bash
# One visit: the session's closing numbers for issue 5's speed targets. `turbollm bench latency`
# (llama-2-7b dummy, prompt 128, 256 new) at batch 1 and 64, alternating bf16 / int4 g128 /
# int8, bf16 and int4 twice. Usage: bash bench/scripts/gpu_visit_final_quant.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 --output-len 256"
i=0; for q in none int4 int8 none int4; do i=$((i+1))
  flag=""; [ $q != none ] && flag="--quantization $q --group-size 128"
  echo "### $i $q"; timeout 110 $L $flag --output-json "$OUT/lat-$i-$q.json" 2>&1 | grep -v -i warn | grep "batch\|copy"
done
