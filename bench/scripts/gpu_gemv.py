"""Batch-1 GEMV on the GPU: kernels/gemv.py vs cuBLAS (F.linear) on the Llama-2-7B shapes;
CUDA-graph timing (20 calls per replay); prints a table, writes $OUT/gemv.json.
`--sweep`: instead, a tile sweep of the kernel (tuning aid), written to $OUT/gemv_sweep.json."""
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton

from turbollm.kernels import gemv

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}


def graph_us(fn, reps=20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


def compare() -> None:
    rows, record = [], []
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        err = (gemv.gemv(x, w).float() - gemv.gemv_ref(x, w).float()).abs().max().item()
        cublas = graph_us(lambda: F.linear(x, w))
        ours = graph_us(lambda: gemv.gemv(x, w))
        gbs = lambda us: n * k * 2 / us / 1e3  # noqa: E731
        record.append({"shape": name, "n": n, "k": k, "cublas_us": cublas, "ours_us": ours, "err": err})
        rows.append(f"| {name} {n}x{k} | {cublas:.1f} ({gbs(cublas):.0f} GB/s) | {ours:.1f} ({gbs(ours):.0f} GB/s) | "
                    f"{cublas / ours:.2f}x | {err:.2g} |")
        print(rows[-1], flush=True)
    json.dump(record, open(os.path.join(OUT, "gemv.json"), "w"), indent=1)
    print("| shape (M = 1) | cuBLAS us | gemv us | speedup | max err |\n|---|---|---|---|---|")
    print("\n".join(rows))


def sweep() -> None:
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


if __name__ == "__main__":
    sweep() if "--sweep" in sys.argv else compare()
