#!/bin/bash
# One visit: the offline run's host stalls (full GC collections, new LM-head shapes) before /
# after, same visit: HEAD's src in .carry_old/src ("old") against this tree ("new"), alternating;
# then this tree's per-step timeline and the GPU tests of the engine and worker.
# Usage: bash bench/scripts/gpu_visit_offline_stalls.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
T="-m turbollm.cli bench throughput --load-format dummy --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1"
run() { echo "### $*"; "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-3}; }
for r in 1 2; do for tree in new old; do
  src=src; [ $tree = old ] && src=.carry_old/src
  PYTHONPATH=/tmp/site:$src run python3 $T --model llama-3-8b --max-num-seqs 512 --max-num-batched-tokens 16384 \
      --output-json $OUT/offline-llama3-8b-512seqs-$tree-$r.json
done; done
for tree in new old; do
  src=src; [ $tree = old ] && src=.carry_old/src
  PYTHONPATH=/tmp/site:$src run python3 $T --model llama-2-7b --max-num-batched-tokens 8192 --output-json $OUT/offline-llama2-7b-$tree.json
done
PYTHONPATH=/tmp/site:src TAIL=40 run python3 bench/scripts/gpu_offline_timeline.py --model llama-3-8b --tag new
PYTHONPATH=/tmp/site:src run python3 -m pytest -q -m gpu tests/worker tests/engine/test_cuda_graphs.py tests/engine/test_gpu.py
for f in $OUT/offline-*.json; do echo "$(basename $f) $(python3 -c "import json,sys;print(round(json.load(open(sys.argv[1]))['runs'][0]['tok_per_s'],1))" $f)"; done
