#!/bin/bash
# Thirteenth session, first visit (one call, ~8 min; carry .whl), the first on an H200:
# Nsight Compute over the batch-1 GEMVs and decode attention (gpu_ncu_probe.py), the FP8 decode
# loops' timing table on this card, then the GPU test cut off in the twelfth session.
source bench/scripts/gpu_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
$NCU --version | tail -1
timeout 300 $NCU --clock-control none --set full --import-source no --nvtx --nvtx-include "PROFILE/" -f \
  -o "$OUT/probe" python3 bench/scripts/gpu_ncu_probe.py > "$OUT/ncu_run.log" 2>&1; echo "ncu rc $?"
grep -E "^case|rror" "$OUT/ncu_run.log" | head -20
$NCU -i "$OUT/probe.ncu-rep" --page details > "$OUT/details.txt" 2>&1
$NCU -i "$OUT/probe.ncu-rep" --page raw --csv > "$OUT/raw.csv" 2>&1
$NCU -i "$OUT/probe.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/source.csv.gz"
grep -E "^  [_a-z]|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy" \
  "$OUT/details.txt" | head -120
rm -f "$OUT/probe.ncu-rep"
timeout 100 python3 bench/scripts/gpu_decode_fp8_variants.py --rounds 1 --variants shipped,plain,fp8_words \
  --json "$OUT/fp8_variants.json" 2>&1 | tail -12
timeout 120 "${P[@]}" -m gpu --tb=short -rf "tests/engine/test_fp8_kv_cache.py::test_gpu_fp8_cache_scales_end_to_end" \
  2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^FAILED|^E  |passed|failed" | tail -6
