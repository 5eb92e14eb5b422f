#!/bin/bash
# Thirteenth session, third visit (one call, ~8 min, H200; carry .whl and .stage/old = `git archive
# 98d46d7 src`): visit 13b again with the paged tiles in one masked loop (this tree at the time),
# the kernel table with lengths jittered into the last tile and a words loop of 64 keys, a subset
# of the GPU tests (the new paged-vs-per-key one among them); the offline JSONs come back as one tgz.
VARIANT_FLAGS=--jitter VARIANTS="shipped,bf16 cache per key,words per key,plain per key,fp8_words,plain,words 64" \
  TESTS_K="paged_tiles or fp8_variants or decode_real or decode_fp8_cache or long_context" \
  bash bench/scripts/gpu_visit13b.sh
(cd "${OUT:-out}" && tar czf offline.tgz offline-*.json && rm offline-*.json)
