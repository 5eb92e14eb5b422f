#!/bin/bash
# One GPU visit for the quantized batch-1 GEMV (kernels/gemv.py QuantWeight), Llama-2-7B dummy:
# GPU tests, optionally the int4 / int8 tile sweeps (TUNE=1), then batch-1 / batch-64 decode of
# bf16, int8 and int4 with this tree ("new") and with an older tree carried as .carry_old/src
# ("old", e.g. `git archive <rev> src | tar -x -C .carry_old`), all in the same visit.
# Carry .whl (the gguf wheel) and .carry_old. Logs and JSON under $OUT.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_gemv.py tests/kernels/test_quant_matmul.py tests/quant/test_gpu_quant.py -p no:cacheprovider 2>&1 | tail -4
if [ "${TUNE:-0}" = 1 ]; then
  python3 bench/scripts/gpu_gemv_tune.py --fmt int4 --budget "${BUDGET4:-55}" 2>&1 | tail -5
  python3 bench/scripts/gpu_gemv_tune.py --fmt int8 --budget "${BUDGET8:-35}" 2>&1 | tail -5
fi
L="python3 -m turbollm.cli bench latency --model llama-2-7b --load-format dummy --batch-sizes 1,64 --input-len 128 --output-len 128"
for q in ${QS:-none int8 int4}; do
  flag=""; [ "$q" != none ] && flag="--quantization $q --group-size 128"
  echo "### new $q"; $L $flag --output-json "$OUT/lat-$q.json" 2>&1 | grep -v -i warn | tail -4
  if [ "$q" != none ] && [ -d .carry_old/src ]; then
    echo "### old $q"; PYTHONPATH=/tmp/site:.carry_old/src $L $flag --output-json "$OUT/lat-old-$q.json" 2>&1 | grep -v -i warn | tail -4
  fi
done
