"""Tile sweep of the batch-1 GEMV through its real launchers (the prologue each projection
uses in the model, the split-K sum included), on Llama-2-7B and Llama-3-8B shapes; weights
cycle over enough copies that none stays in L2. CUDA-graph timing. Tuning aid for
`kernels/gemv.gemv_config`; prints the best tilings and writes $OUT/gemv_tune.json.
Usage: python bench/scripts/gpu_gemv_tune.py
"""
import itertools
import json
import os
import statistics

import torch

from turbollm.kernels import gemv

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
# name: (N, K, prologue)
SHAPES = {
    "l2 qkv": (12288, 4096, "norm"), "l2 o": (4096, 4096, "plain"), "l2 gate_up": (22016, 4096, "norm"),
    "l2 down": (4096, 11008, "silu"), "l2 lm_head": (32000, 4096, "plain"),
    "l3 qkv": (6144, 4096, "norm"), "l3 gate_up": (28672, 4096, "norm"), "l3 down": (4096, 14336, "silu"),
}


def graph_us(fns, reps=4) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps / len(fns))
    return statistics.median(ts)


def main() -> None:
    res = {}
    configs = list(itertools.product((8, 16), (256, 512, 1024), (1, 2, 3), (4, 8), (3, 4)))
    for name, (n, k, pro) in SHAPES.items():
        copies = max(1, -(-160_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)

        def call(w, cfg):
            if pro == "norm":
                return lambda: gemv.gemv_rmsnorm(x, r, nw, 1e-5, w, config=cfg)
            if pro == "silu":
                return lambda: gemv.gemv_silu_mul(gu, w, config=cfg)
            return lambda: gemv.gemv(x, w, config=cfg)

        base = graph_us([call(w, None) for w in ws])
        rows = []
        for cfg in configs:
            try:
                t = graph_us([call(w, cfg) for w in ws])
            except Exception:  # noqa: BLE001 - out of resources etc.
                continue
            rows.append((t, cfg))
        rows.sort()
        gbs = lambda us: n * k * 2 / us / 1e3  # noqa: E731
        res[name] = {"n": n, "k": k, "default": gemv.gemv_config(n, k), "default_us": base,
                     "best": [(t, list(c)) for t, c in rows[:8]],
                     "all": [(t, list(c)) for t, c in rows]}
        print(f"{name} {n}x{k} ({pro}): default {base:.1f} us ({gbs(base):.0f} GB/s); best "
              + "; ".join(f"{t:.1f} {c} ({gbs(t):.0f})" for t, c in rows[:4]), flush=True)
        del ws
    json.dump(res, open(os.path.join(OUT, "gemv_tune.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
