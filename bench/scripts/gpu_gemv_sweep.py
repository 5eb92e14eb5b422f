"""Tile sweep for kernels/gemv.py on the Llama-2-7B batch-1 shapes (tuning aid; prints the
best configs per shape and writes $OUT/gemv_sweep.json)."""
import itertools
import json
import os
import statistics

import torch
import triton

from turbollm.kernels import gemv

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
SHAPES = {"qkv": (12288, 4096), "gate_up": (22016, 4096), "down": (4096, 11008), "o": (4096, 4096)}


def graph_us(fn, reps=20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


res = {}
for name, (n, k) in SHAPES.items():
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(3, n, device="cuda", dtype=torch.float32)
    rows = []
    for bn, bk, split, warps, stages in itertools.product((8, 16, 32), (256, 512, 1024), (1, 2, 3), (4, 8), (3, 4, 5)):
        kps = -(-(-(-k // split)) // bk) * bk
        if kps * (split - 1) >= k:
            continue
        def fn():
            gemv._gemv_kernel[(triton.cdiv(n, bn), split)](
                x, w, x, out, n, k, kps, w.stride(0), out.stride(0),
                HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        try:
            t = graph_us(fn)
        except Exception:  # noqa: BLE001 - out of shared memory etc.
            continue
        rows.append((t, f"bn{bn} bk{bk} s{split} w{warps} st{stages}"))
    rows.sort()
    base = graph_us(lambda: gemv.gemv(x, w))
    res[name] = {"launcher_us": base, "best": rows[:5]}
    print(f"{name} {n}x{k}: launcher {base:.1f} us; best " +
          "; ".join(f"{t:.1f} {c} ({n * k * 2 / t / 1e3:.0f} GB/s)" for t, c in rows[:4]), flush=True)
json.dump(res, open(os.path.join(OUT, "gemv_sweep.json"), "w"), indent=1)
