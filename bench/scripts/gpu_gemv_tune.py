"""Tile sweep of the batch-1 GEMV through its real launchers (the prologue each projection
uses in the model, the split-K sum included), on Llama-2-7B and Llama-3-8B shapes; weights
cycle over enough copies that none stays in L2. CUDA-graph timing. Tuning aid for
`kernels/gemv.gemv_config`; prints the best tilings and writes $OUT/gemv_tune[_FMT].json.
With --fmt int8 / int4 (group 128) the weights are weight-only quantized (Llama-2-7B shapes),
and the table also times kernels/quant_matmul.py's M = 1 path and the bf16 GEMV on the same
shape (the ratio a quantized batch-1 step can gain).
--small sweeps int4 tiles of few rows and short K steps instead (4-16 rows, 256-1024 columns,
2-8 warps: the shapes that stream the bytes fastest in gpu_gemv_bounds.py --memory-sweep), and
--shapes picks shapes by name (e.g. "l2 down").
Usage: python bench/scripts/gpu_gemv_tune.py [--fmt bf16|int8|int4] [--budget SECONDS] [--dequant 3,1]
       [--small] [--shapes "l2 down,l2 qkv"]
"""
import argparse
import itertools
import time
import json
import os
import statistics

import torch

from turbollm.kernels import gemv, quant_matmul
from turbollm.kernels.activation import silu_and_mul
from turbollm.kernels.rmsnorm import fused_add_rmsnorm

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


def _weights(fmt: str, n: int, k: int, copies: int) -> list:
    if fmt == "bf16":
        return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    if fmt == "int8":
        return [gemv.QuantWeight(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                                 torch.rand(n, device="cuda", dtype=torch.bfloat16) / 500) for _ in range(copies)]
    return [gemv.QuantWeight(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
                             torch.rand(n, k // 128, device="cuda", dtype=torch.bfloat16) / 100,
                             torch.randint(0, 16, (n, k // 128), device="cuda").bfloat16(), 128)
            for _ in range(copies)]


def _nbytes(w) -> int:
    if isinstance(w, gemv.QuantWeight):
        return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros) if t is not None)
    return w.numel() * w.element_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", choices=("bf16", "int8", "int4"), default="bf16")
    ap.add_argument("--budget", type=float, default=1e9, help="stop sweeping a shape after this many seconds")
    ap.add_argument("--dequant", type=lambda v: [int(d) for d in v.split(",")], default=[3],
                    help="quantized formats: dequantization modes to sweep (0 cvt, 1 magic, 3 packed)")
    ap.add_argument("--small", action="store_true", help="int4: tiles of 4-16 rows and 256-1024 columns")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all of the format)")
    args = ap.parse_args()
    fmt = args.fmt
    res = {}
    if fmt == "bf16":
        configs = list(itertools.product((8, 16), (256, 512, 1024), (1, 2, 3), (4, 8), (3, 4)))
        shapes = SHAPES
    else:
        configs = [(bn, bk, sp, wa, 3, deq) for deq, bk, bn, wa, sp in itertools.product(
            args.dequant, (1024, 512, 2048) if fmt == "int4" else (512, 1024, 2048),
            (16, 32, 64) if fmt == "int4" else (4, 8, 16), (4, 8), (1, 2))]
        shapes = {k: v for k, v in SHAPES.items() if k.startswith("l2") and k != "l2 lm_head"}
    if args.small:
        configs = [(bn, bk, sp, wa, 3, deq) for deq, bk, bn, wa, sp in itertools.product(
            args.dequant, (256, 512, 1024), (4, 8, 16), (2, 4, 8), (1, 2))]
    if args.shapes:
        shapes = {k: SHAPES[k.strip()] for k in args.shapes.split(",")}
    for name, (n, k, pro) in shapes.items():
        per = n * k * (2 if fmt == "bf16" else 1 if fmt == "int8" else 0.5)
        copies = max(1, -(-160_000_000 // int(per)))
        ws = _weights(fmt, n, k, copies)
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
        extra = {}
        if fmt != "bf16":  # the other M = 1 paths on the same shape (no prologue)
            if fmt == "int8":
                extra["quant_matmul_us"] = graph_us([
                    (lambda w=w: quant_matmul.int8_weight_only_linear(x, w.qweight, w.scales)) for w in ws])
            else:
                extra["quant_matmul_us"] = graph_us([
                    (lambda w=w: quant_matmul.int4_weight_only_linear(x, w.qweight, w.scales, w.zeros, 128))
                    for w in ws])
            extra["plain_us"] = graph_us([(lambda w=w: gemv.gemv(x, w)) for w in ws])
            qm = (lambda h, w: quant_matmul.int8_weight_only_linear(h, w.qweight, w.scales)) if fmt == "int8" else \
                (lambda h, w: quant_matmul.int4_weight_only_linear(h, w.qweight, w.scales, w.zeros, 128))
            if pro == "norm":  # the unfused pair the model ran before: RMSNorm kernel, then quant_matmul
                extra["unfused_us"] = graph_us([(lambda w=w: qm(fused_add_rmsnorm(x, r, nw, 1e-5)[0], w))
                                                for w in ws])
            elif pro == "silu":
                extra["unfused_us"] = graph_us([(lambda w=w: qm(silu_and_mul(gu), w)) for w in ws])
            bws = _weights("bf16", n, k, max(1, -(-160_000_000 // (n * k * 2))))
            extra["bf16_gemv_us"] = graph_us([(lambda w=w: gemv.gemv(x, w)) for w in bws])
            del bws
        rows = []
        t0 = time.time()
        for cfg in configs:
            if time.time() - t0 > args.budget:
                break
            if fmt != "bf16" and k < 8192 and cfg[2] > 1:  # quantized: split K only where it is long
                continue
            try:
                t = graph_us([call(w, cfg) for w in ws])
            except Exception:  # noqa: BLE001 - out of resources etc.
                continue
            rows.append((t, cfg))
        rows.sort()
        nb = _nbytes(ws[0])
        gbs = lambda us: nb / us / 1e3  # noqa: E731
        res[name] = {"n": n, "k": k, "fmt": fmt, "default": gemv.gemv_config(n, k, {"bf16": 0, "int8": 1, "int4": 2}[fmt]), "default_us": base, **extra,
                     "best": [(t, list(c)) for t, c in rows[:8]],
                     "all": [(t, list(c)) for t, c in rows]}
        more = "; ".join(f"{key} {v:.1f}" for key, v in extra.items())
        print(f"{name} {n}x{k} {fmt} ({pro}): default {base:.1f} us ({gbs(base):.0f} GB/s) {more}; best "
              + "; ".join(f"{t:.1f} {c} ({gbs(t):.0f})" for t, c in rows[:4]), flush=True)
        del ws
    suffix = "" if fmt == "bf16" else f"_{fmt}"
    json.dump(res, open(os.path.join(OUT, f"gemv_tune{suffix}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
