#!/bin/bash
# One visit: the sort-free top-p kernel (kernels/top_p.py). GPU tests (kernel against the
# full sort; the sampler, incl. its one-host-sync test), the microbenchmark against the sort,
# and the engine A/B with top_p = 0.9 (Llama-3-8B dummy, vocab 128256).
# Usage: bash bench/scripts/gpu_visit_top_p_kernel.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q tests/kernels/test_top_p_kernel.py tests/sample -p no:cacheprovider 2>&1 | tail -3
timeout 120 python3 bench/scripts/gpu_top_p.py --batches 1,64,256 --vocabs 32000,128256 --top-p 0.9 --scales 3,5 --iters 30 2>&1 | grep -v -i warn | tail -14
timeout 240 python3 bench/scripts/gpu_top_p_engine.py --rounds 1 --batches 256,64 2>&1 | grep -v -i warn | tail -7
