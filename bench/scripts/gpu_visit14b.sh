#!/bin/bash
# Prepared in the thirteenth session for the next one (not yet run; one call, ~8 min on an H200,
# carry .whl): why tiles addressed a block at a time (PAGED) made decode attention 14% faster in
# Llama-3-8B's offline FP8 run but 2% slower in Llama-2-7B's (MHA), when the kernel table gave
# both ~2-3% (docs/performance.md, thirteenth session). Nsight Compute on `_decode_split_kernel`
# inside the engine's decode graphs (300 prompts -> 64 tokens; launch 3,000 on is a decode step of
# ~256 sequences: the words loop for both models), PAGED on and off for each model;
# PAGED for MHA comes from a patched copy of this tree (`_paged` true for every FP8 cache).
source bench/scripts/gpu_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
rm -rf /tmp/all /tmp/none && cp -r src /tmp/all && cp -r src /tmp/none
sed -i 's/return kv_dtype == torch.float8_e4m3fn and group > 1/return kv_dtype == torch.float8_e4m3fn/' \
  /tmp/all/turbollm/kernels/paged_attention.py
sed -i 's/return kv_dtype == torch.float8_e4m3fn and group > 1/return False/' /tmp/none/turbollm/kernels/paged_attention.py
grep -c "return False" /tmp/none/turbollm/kernels/paged_attention.py
for model in llama-3-8b llama-2-7b; do
  for tree in all none; do
    PYTHONPATH=/tmp/site:/tmp/$tree timeout 130 $NCU --clock-control none --set full --import-source no \
      --graph-profiling node -k regex:_decode_split_kernel --launch-skip 3000 --launch-count 2 -f -o "$OUT/$model-$tree" \
      python3 -m turbollm.cli bench throughput --model $model --load-format dummy --dataset random --num-prompts 300 \
      --input-len 512 --output-len 64 --ignore-eos --compare none --repeats 1 --quantization fp8 \
      --kv-cache-dtype fp8 > "$OUT/$model-$tree.log" 2>&1
    $NCU -i "$OUT/$model-$tree.ncu-rep" --page details 2>&1 | grep -E "^  _|Duration|DRAM Throughput|Registers Per|Achieved Occ|Warp Cycles Per Issued|Issue Slots|Grid Size" | head -16
    $NCU -i "$OUT/$model-$tree.ncu-rep" --page raw --csv > "$OUT/$model-$tree-raw.csv" 2>&1
    rm -f "$OUT/$model-$tree.ncu-rep"
  done
done
