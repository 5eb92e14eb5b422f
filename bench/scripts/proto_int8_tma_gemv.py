"""Prototype: the batch-1 int8 GEMV with its weight tiles staged by TMA (tensor descriptors,
software-pipelined by Triton over num_stages), against the shipped GEMV (kernels/gemv.py).

Why: the shipped int8 GEMV runs at the speed of a plain-load stream of its own tile shape, and
its compute-only twin is 26-40% faster (docs/performance.md, seventh session). So the int8 step
is bound by how the tile streams memory. TMA issues a whole [BN, 256] tile with one
instruction and keeps num_stages tiles in flight without registers.

Plain prologue only (x is the input row), per-row scales, K a multiple of 256.

Status (H100, 2026-11-27): correct, but not faster. Best of 7 tilings: qkv 19.7 µs against
19.5 shipped, o 9.0 against 7.7, gate_up 38.1 against 37.8, down 19.1 against 18.8 (raw
bench/results/proto-int8-tma-gemv-h100-2026-11-27.json). The shipped int8 GEMV already
streams 2.4-2.6 TB/s, within ~7% of the best plain-load stream of these bytes
(gpu_gemv_bounds.py --memory-sweep). Not wired in.

CPU:  python bench/scripts/proto_int8_tma_gemv.py sass [--bn 16 --stages 4 --warps 4]
GPU:  python bench/scripts/proto_int8_tma_gemv.py bench   -> table + $OUT/proto_int8_tma_gemv.json
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from turbollm.kernels._quant_matmul_kernels import _i8_to_f32

BK = 256  # a TMA box holds at most 256 elements a dimension


@triton.jit
def int8_tma_gemv(w_desc, x_ptr, s_ptr, out_ptr, N, K, BN: tl.constexpr, BK_: tl.constexpr,
                  STAGES: tl.constexpr):
    row0 = tl.program_id(0) * BN
    offs_k = tl.arange(0, BK_)
    acc = tl.zeros([BN, BK_], tl.float32)
    for k0 in tl.range(0, K, BK_, num_stages=STAGES):
        w = w_desc.load([row0, k0])  # [BN, BK] int8, staged through shared memory
        x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)  # [BK]
        acc += _i8_to_f32(w, 1) * x[None, :]  # fp32 bit trick, as the shipped int8 GEMV
    rows = row0 + tl.arange(0, BN)
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))


def launch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bn: int, stages: int, warps: int,
           desc: TensorDescriptor | None = None) -> torch.Tensor:
    n, k = q.shape
    desc = desc or TensorDescriptor.from_tensor(q, [bn, BK])
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    int8_tma_gemv[(n // bn,)](desc, x, s, out, n, k, BN=bn, BK_=BK, STAGES=stages, num_warps=warps)
    return out


def sass(a) -> None:  # type: ignore[no-untyped-def]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, os.path.dirname(__file__))
    from cpu_sass import loop_report, sass_of
    sig = {"w_desc": f"tensordesc<i8[{a.bn}, {BK}]>", "x_ptr": "*bf16", "s_ptr": "*bf16", "out_ptr": "*bf16",
           "N": "i32", "K": "i32", "BN": "constexpr", "BK_": "constexpr", "STAGES": "constexpr"}
    const = {"BN": a.bn, "BK_": BK, "STAGES": a.stages}
    src = ASTSource(int8_tma_gemv, sig, const, {(i,): [["tt.divisibility", 16]] for i in (1, 2, 3, 4, 5)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": a.warps})
    ttgir = k.asm["ttgir"]
    print("TMA ops in TTGIR:", sum("async_tma" in l or "tma" in l for l in ttgir.splitlines()),
          " shared bytes:", k.metadata.shared)
    loop_report(sass_of(k))


def bench(a) -> None:  # type: ignore[no-untyped-def]
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_gemv_tune import graph_us
    from turbollm.kernels import gemv
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {}
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    for name, (n, k) in shapes.items():
        if k % BK:
            k_pad = -(-k // BK) * BK  # down: 11008 -> 11264 columns, zeros past K (TMA pads too)
        else:
            k_pad = k
        copies = max(1, -(-160_000_000 // (n * k)))
        qs = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
        s = torch.rand(n, device="cuda", dtype=torch.bfloat16) / 500
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        xp = torch.zeros(1, k_pad, device="cuda", dtype=torch.bfloat16)
        xp[:, :k] = x
        shipped = graph_us([(lambda q=q: gemv.gemv(x, gemv.QuantWeight(q, s))) for q in qs])
        ref = gemv.gemv_ref(x, gemv.QuantWeight(qs[0], s)).float()
        row = {"shipped_us": shipped}
        for bn, stages, warps in ((8, 4, 4), (16, 4, 4), (16, 6, 4), (32, 4, 4), (32, 4, 8), (16, 3, 4), (64, 3, 8)):
            key = f"tma BN{bn} S{stages} W{warps}"
            try:
                descs = [TensorDescriptor(q, [n, k], [k, 1], [bn, BK]) for q in qs]  # OOB columns read as 0
                got = launch(xp, qs[0], s, bn, stages, warps, descs[0]).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                t = graph_us([(lambda q=q, d=d: launch(xp, q, s, bn, stages, warps, d)) for q, d in zip(qs, descs)])
                row[key] = {"us": t, "max_rel_err": err}
            except Exception as e:  # noqa: BLE001
                row[key] = str(e)[:100]
        res[name] = row
        mb = n * k / 1e6
        print(f"{name} {n}x{k} ({mb:.1f} MB): shipped {shipped:.1f} us ({mb / shipped * 1e3:.0f} GB/s); " + "; ".join(
            f"{key} {v['us']:.1f} us ({mb / v['us'] * 1e3:.0f} GB/s, err {v['max_rel_err']:.1e})" if isinstance(v, dict)
            else f"{key} {v}" for key, v in row.items() if key != "shipped_us"), flush=True)
        del qs
    json.dump(res, open(os.path.join(out_dir, "proto_int8_tma_gemv.json"), "w"), indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sass", "bench"])
    ap.add_argument("--bn", type=int, default=16)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--warps", type=int, default=4)
    a = ap.parse_args()
    sass(a) if a.mode == "sass" else bench(a)


if __name__ == "__main__":
    main()
