#!/bin/bash
# One GPU visit for the "packed" (inline PTX) dequantization of the batch-1 GEMV: GPU tests of
# kernels/gemv.py, then the int4 / int8 tile sweeps of this tree, with the default tiling of
# an older tree (carried as .carry_old/src, `git archive <rev> src | tar -x -C .carry_old`)
# timed by the same script for a same-visit baseline. Carry .whl (gguf) and .carry_old.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_S:-200}" python3 -m pytest -q ${TESTS:-tests/kernels/test_gemv.py tests/quant/test_gpu_quant.py} -p no:cacheprovider \
  2>&1 | tail -15 | tee "$OUT/tests.log"
for fmt in ${FMTS:-int4 int8}; do
  if [ -d .carry_old/src ]; then
    echo "### old $fmt"; OUT="$OUT/old" PYTHONPATH=/tmp/site:.carry_old/src python3 bench/scripts/gpu_gemv_tune.py --fmt $fmt --budget 0 2>&1 | grep -v -i warn
  fi
  echo "### new $fmt"; python3 bench/scripts/gpu_gemv_tune.py --fmt $fmt --budget "${BUDGET:-20}" --dequant "${DEQ:-3}" 2>&1 | grep -v -i warn
done
