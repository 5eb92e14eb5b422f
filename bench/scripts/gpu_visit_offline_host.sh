#!/bin/bash
# One visit: offline throughput before / after the host-work cuts (old tree in .carry_old/src,
# same visit), then the per-step GPU timeline of the new tree. Usage: bash bench/scripts/gpu_visit_offline_host.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
T="-m turbollm.cli bench throughput --load-format dummy --dataset random --num-prompts 1000 --input-len 512 --output-len 256 --ignore-eos --compare none --repeats 1"
run() { echo "### $*"; "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-6}; }
for tree in new old; do
  src=src; [ $tree = old ] && src=.carry_old/src
  PYTHONPATH=/tmp/site:$src run python3 $T --model llama-3-8b --max-num-seqs 512 --max-num-batched-tokens 16384 \
      --output-json $OUT/offline-llama3-8b-512seqs-$tree.json
done
PYTHONPATH=/tmp/site:src run python3 $T --model llama-2-7b --max-num-batched-tokens 8192 --output-json $OUT/offline-llama2-7b-new.json
PYTHONPATH=/tmp/site:src TAIL=30 run python3 bench/scripts/gpu_offline_timeline.py --model llama-3-8b
grep -h '"tok_per_s"' $OUT/offline-*.json | head
