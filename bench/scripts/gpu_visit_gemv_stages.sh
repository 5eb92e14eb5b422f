#!/bin/bash
# GPU tests of the GEMV, then int4 / int8 sweeps. Used for the pipelined-loads experiment
# (docs/performance.md: its kernel loop `tl.range(..., num_stages=STAGES)` and the sweep's
# stages 1 / 2 / 3 were reverted after it). Carry .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
timeout 120 python3 -m pytest -q tests/kernels/test_gemv.py -p no:cacheprovider 2>&1 | tail -3
python3 bench/scripts/gpu_gemv_tune.py --fmt int4 --budget 30 --dequant 3 2>&1 | grep -v -i warn
python3 bench/scripts/gpu_gemv_tune.py --fmt int8 --budget 30 --dequant 1 2>&1 | grep -v -i warn
