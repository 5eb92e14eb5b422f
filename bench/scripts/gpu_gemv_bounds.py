"""What bounds the int4 batch-1 GEMV: its time against a compute-only and a memory-only twin.

For each Llama-2-7B shape (plain prologue, int4 g128, weights cycled out of L2):
- shipped: kernels/gemv.gemv, default tiling;
- compute only: the same launch with a row stride of 0, so every row reads the same bytes
  (L1/L2 hits): the conversion and FMA work without the HBM traffic;
- memory only: a kernel that streams the same bytes as int32 words in the same tile shape
  and XOR-folds them (about one instruction per 16 weights);
- copy: torch's device-to-device copy of the weight bytes (read + write) for reference.
If shipped ~ compute + memory, loads and math do not overlap; if ~ max(compute, memory),
they do and the larger one is the bound.

Usage (GPU): python bench/scripts/gpu_gemv_bounds.py   -> prints a table, writes $OUT/gemv_bounds.json
       python bench/scripts/gpu_gemv_bounds.py --memory-sweep   -> the memory-only twin over tile shapes
       python bench/scripts/gpu_gemv_bounds.py --int8   -> the same table for the int8 GEMV
"""
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

from gpu_gemv_tune import graph_us  # same directory: CUDA-graph timing of a list of calls
from turbollm.kernels import gemv

OUT = os.environ.get("OUT", "out")
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


@triton.jit
def _stream_kernel(w_ptr, out_ptr, KW, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """XOR of each row's int32 words (rows [pid * BLOCK_N, ...)), BLOCK_W words a step."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
    base = w_ptr + rows.to(tl.int64)[:, None] * KW
    for k0 in range(0, KW, BLOCK_W):
        acc ^= tl.load(base + k0 + offs[None, :])
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=1))


def memory_sweep() -> None:
    """The memory-only twin over tile shapes: how fast a Triton loop of plain loads streams
    rows of int4 / int8 / bf16 weight bytes (Llama-2-7B qkv, gate_up, down), by rows a
    program, row bytes a step and warps."""
    res = {}
    for fmt, per in (("int4", 0.5), ("int8", 1), ("bf16", 2)):
        for name in ("qkv", "gate_up", "down"):
            n, k = SHAPES[name]
            kw = int(k * per) // 4  # int32 words a row
            copies = max(1, -(-160_000_000 // (n * kw * 4)))
            words = [torch.randint(0, 1 << 30, (n, kw), device="cuda", dtype=torch.int32) for _ in range(copies)]
            out = torch.empty(n, device="cuda", dtype=torch.int32)
            rows = []
            widths = [w for w in (128, 256, 512) if kw % w == 0] or [32]  # down's rows: 1,376 words (int4)
            for bn, bw, warps in itertools.product((4, 8, 16, 32), widths, (4, 8)):
                if kw % bw:
                    continue
                t = graph_us([(lambda w=w: _stream_kernel[(triton.cdiv(n, bn),)](w, out, kw, BLOCK_N=bn, BLOCK_W=bw,
                                                                                   num_warps=warps)) for w in words])
                rows.append((t, (bn, bw * 4, warps)))
            rows.sort()
            gbs = n * kw * 4 / 1e3
            res[f"{fmt} {name}"] = [(t, list(c)) for t, c in rows]
            print(f"{fmt} {name} ({n * kw * 4 / 1e6:.1f} MB): best " + "; ".join(
                f"{t:.1f} us {c} ({gbs / t:.0f} GB/s)" for t, c in rows[:3]) + f"; worst {rows[-1][0]:.1f}", flush=True)
            del words
    json.dump(res, open(os.path.join(OUT, "gemv_memory_sweep.json"), "w"), indent=1)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    if "--memory-sweep" in sys.argv:
        memory_sweep()
        return
    res = {}
    int8 = "--int8" in sys.argv  # the int8 GEMV instead (per-row scales)
    row_bytes = (lambda k: k) if int8 else (lambda k: k // 2)
    print(f"{'shape':8} {'MB':>6} {'shipped':>8} {'compute':>8} {'memory':>8} {'sum':>6} {'max':>6} {'copy':>6}  (µs)")
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-160_000_000 // (n * row_bytes(k))))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        if int8:
            qs = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
            s = torch.rand(n, device="cuda", dtype=torch.bfloat16) / 500
            ws = [gemv.QuantWeight(q, s) for q in qs]
            one = gemv.QuantWeight(qs[0][:1].expand(n, k), s)
        else:
            qs = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8) for _ in range(copies)]
            s = torch.rand(n, k // 128, device="cuda", dtype=torch.bfloat16) / 100
            z = torch.randint(0, 16, (n, k // 128), device="cuda").bfloat16()
            ws = [gemv.QuantWeight(q, s, z, 128) for q in qs]
            one = gemv.QuantWeight(qs[0][:1].expand(n, k // 2), s, z, 128)
        shipped = graph_us([(lambda w=w: gemv.gemv(x, w)) for w in ws])
        # compute only: a row stride of 0 (gemv._launch skips gemv()'s contiguity check)
        compute = graph_us([lambda: gemv._launch(gemv._PLAIN, x, one, None)])
        # memory only: the same bytes as int32 words, 32 rows x 1024 words a program
        out = torch.empty(n, device="cuda", dtype=torch.int32)
        words = [q.view(torch.int32) for q in qs]
        kw = row_bytes(k) // 4
        bw = 256
        while kw % bw:  # the widest power-of-two step dividing a row's words
            bw //= 2
        memory = graph_us([(lambda w=w: _stream_kernel[(triton.cdiv(n, 32),)](w, out, kw, BLOCK_N=32, BLOCK_W=bw))
                           for w in words])
        dst = torch.empty_like(qs[0])
        copy = graph_us([(lambda q=q: dst.copy_(q)) for q in qs])
        mb = n * row_bytes(k) / 1e6
        res[name] = dict(n=n, k=k, mb=mb, shipped_us=shipped, compute_us=compute, memory_us=memory, copy_us=copy)
        print(f"{name:8} {mb:6.1f} {shipped:8.1f} {compute:8.1f} {memory:8.1f} {compute + memory:6.1f} "
              f"{max(compute, memory):6.1f} {copy:6.1f}", flush=True)
        del qs, ws, words
    json.dump(res, open(os.path.join(OUT, f"gemv_bounds{'_int8' if int8 else ''}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
