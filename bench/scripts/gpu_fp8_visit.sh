#!/bin/bash
# One GPU visit for FP8 W8A8 speed (issue 5), Llama-2-7B preset with dummy weights: the FP8
# kernels' GPU tests, kernel microbenchmarks (gpu_fp8_kernels.py), then the engine benchmarks,
# each FP8 run with its bf16 baseline in the same visit. STEPS picks the steps (in order);
# each step is skipped when less than its estimate is left of BUDGET seconds. Logs and JSON
# under $OUT (one log, visit.log; bench JSON beside it).
# KARGS: arguments of gpu_fp8_kernels.py (default --sweep).
#   STEPS="tests kernels lat-none lat-fp8 off-none off-fp8" BUDGET=280 bash bench/scripts/gpu_fp8_visit.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-280}
STEPS=${STEPS:-"tests kernels lat-none lat-fp8 off-none off-fp8"}
T0=$(date +%s)
LOG=$OUT/visit.log
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() {  # name, seconds it needs, command...
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "### SKIP $name: $(left)s left < ${need}s" | tee -a "$LOG"; return; fi
  echo "### $name ($(left)s left): $*" | tee -a "$LOG"
  local t=$(date +%s)
  timeout $(( $(left) - 3 )) "$@" > /tmp/step.log 2>&1
  local rc=$?
  cat /tmp/step.log >> "$LOG"
  grep -v -i -E 'warn|^round |Generating|^\s*$' /tmp/step.log | tail -"${TAIL:-6}"
  echo "### $name: rc=$rc, $(( $(date +%s) - t ))s" | tee -a "$LOG"
}
B="python3 -m turbollm.cli bench"
M="--model llama-2-7b --load-format dummy"
OFF="--dataset random --num-prompts ${PROMPTS:-1000} --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1 --max-num-batched-tokens 8192"
export PYTHONUNBUFFERED=1
for s in $STEPS; do
  case $s in
    tests) TAIL=4 step tests 30 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_matmul.py \
             tests/quant/test_gpu_quant.py ;;
    kernels) TAIL=40 step kernels 60 python3 bench/scripts/gpu_fp8_kernels.py ${KARGS---sweep} ;;
    lat-none) step lat-none 45 $B latency $M --batch-sizes 1,64 --input-len 128 --output-len 128 \
                --output-json "$OUT/lat-none.json" ;;
    lat-fp8) step lat-fp8 45 $B latency $M --batch-sizes 1,64 --input-len 128 --output-len 128 \
               --quantization fp8 --output-json "$OUT/lat-fp8.json" ;;
    off-none) TAIL=3 step off-none 90 $B throughput $M $OFF --output-json "$OUT/off-none.json" ;;
    off-fp8) TAIL=3 step off-fp8 80 $B throughput $M $OFF --quantization fp8 --output-json "$OUT/off-fp8.json" ;;
    off-fp8kv) TAIL=3 step off-fp8kv 80 $B throughput $M $OFF --quantization fp8 --kv-cache-dtype fp8 \
                 --output-json "$OUT/off-fp8kv.json" ;;
    off-kv) TAIL=3 step off-kv 80 $B throughput $M $OFF --kv-cache-dtype fp8 --output-json "$OUT/off-kv.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "visit: $(( $(date +%s) - T0 ))s"
