"""Decode attention at small batch: time per layer-call of `paged_decode_attention` under a
CUDA graph of 32 calls (one KV cache per layer, like a 32-layer step), over a sweep of
BLOCK_N and num_splits, Llama-2-7B heads (H = KV = 32, D = 128), graph bound 4096.

Prints a table and writes $OUT/decode_small_batch.json.
Usage: python bench/scripts/gpu_decode_small_batch.py [--pipeline]
(--pipeline: single-split variants at batch 1 over BLOCK_N, warps and pipeline stages)
"""
import itertools
import json
import os
import statistics
import sys

import torch

from turbollm.kernels import paged_attention as pa

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
LAYERS, H, KV, D, BS, BOUND = 32, 32, 32, 128, 16, 4096


def run(batch: int, ctx: int, block_n: int, splits: int | None, warps: int = 4, stages: int | None = None) -> float:
    nb = batch * BOUND // BS
    caches = [torch.randn(2, nb, BS, KV, D, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(nb, device="cuda").view(batch, BOUND // BS)
    seq = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
    pa._DECODE_BLOCK_N = block_n
    pa._DECODE_WARPS, pa._DECODE_STAGES = warps, stages

    def step():
        for c in caches:
            pa.paged_decode_attention(q, c, perm, seq, D**-0.5, max_seq_len=BOUND, num_splits=splits)

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 10 / LAYERS * 1e3)
    del caches
    return statistics.median(ts)


def pipeline_sweep() -> None:
    """Single-split (no combine) variants at batch 1: is the KV loop latency-bound?"""
    res = []
    for ctx in (128, 256, 384, 1024):
        base = run(1, ctx, 64, None)
        rows = []
        for block_n, warps, stages in itertools.product((32, 64, 128, 256), (2, 4, 8), (1, 2, 3, 4)):
            try:
                rows.append((run(1, ctx, block_n, 1, warps, stages), block_n, warps, stages))
            except Exception as e:  # noqa: BLE001 - a sweep: report and go on
                print(f"ctx{ctx} bn{block_n} w{warps} st{stages}: {type(e).__name__}"[:120])
        rows.sort()
        res.append({"ctx": ctx, "default_us": base, "best_single_split": rows[:6]})
        print(f"b1 ctx{ctx}: default (splits + combine) {base:.2f} us; best single split: "
              + "; ".join(f"{t:.2f} (BLOCK_N {bn}, warps {w}, stages {st})" for t, bn, w, st in rows[:4]), flush=True)
    with open(os.path.join(OUT, "decode_b1_pipeline.json"), "w") as f:
        json.dump(res, f, indent=1)


def main() -> None:
    if "--pipeline" in sys.argv:
        pipeline_sweep()
        return
    res = []
    for batch, ctxs in ((1, (128, 256, 1024, 2048)), (8, (256, 1024))):
        for ctx in ctxs:
            for block_n in (16, 32, 64):
                for splits in (None, 1, 4, 8, 16, 32, 64):
                    try:
                        us = run(batch, ctx, block_n, splits)
                    except Exception as e:  # noqa: BLE001 - a sweep: report and go on
                        print(f"b{batch} ctx{ctx} bn{block_n} s{splits}: {type(e).__name__} {e}"[:200])
                        continue
                    kv_bytes = batch * ctx * KV * D * 2 * 2
                    res.append({"batch": batch, "ctx": ctx, "block_n": block_n, "splits": splits, "us": us,
                                "gbps": kv_bytes / us / 1e3})
                    print(f"b{batch:2d} ctx{ctx:5d} BLOCK_N {block_n:3d} splits {str(splits):>4s}: "
                          f"{us:6.2f} us/layer ({kv_bytes / us / 1e3:6.0f} GB/s)", flush=True)
    with open(os.path.join(OUT, "decode_small_batch.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n== best per (batch, ctx) ==")
    for key in sorted({(r["batch"], r["ctx"]) for r in res}):
        rs = [r for r in res if (r["batch"], r["ctx"]) == key]
        cur = next(r for r in rs if r["block_n"] == 64 and r["splits"] is None)
        best = min(rs, key=lambda r: r["us"])
        print(f"b{key[0]} ctx{key[1]}: current {cur['us']:.2f} us; best {best['us']:.2f} us "
              f"(BLOCK_N {best['block_n']}, splits {best['splits']})")


if __name__ == "__main__":
    main()
