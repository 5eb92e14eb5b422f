"""One GPU visit: does prefetching the next weights into L2 while batch-1 decode attention runs
(a latency chain that leaves HBM idle) make the following GEMVs faster?

Per layer (Llama-2-7B shapes, distinct weights per layer, 16 layers in one CUDA graph):
[prefetch kernel] -> decode attention (batch 1, ctx 256, 32 heads, its own cache) -> o GEMV ->
gate_up GEMV with the RMSNorm prologue. The prefetch kernel issues `cp.async.bulk.prefetch.L2`
for the o weight and / or the first MB of gate_up's and exits; the prefetches run on while
attention does. Variants per format (bf16, int8, int4): no prefetch, an empty prefetch launch,
and prefetch sizes. Outputs are checked equal to the no-prefetch graph's.

Prints a table and writes $OUT/gpu_l2_prefetch.json.
Usage: python bench/scripts/gpu_l2_prefetch.py [--layers 16] [--formats bf16,int8,int4]
"""
import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from _rounds import save_and_print  # noqa: E402

from turbollm.kernels import gemv as G  # noqa: E402
from turbollm.kernels.paged_attention import paged_decode_attention  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
MB = 1 << 20


@triton.jit
def _prefetch_kernel(a_addr, a_bytes, b_addr, b_bytes, dummy_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # chunk index over a then b
    off = idx.to(tl.int64) * CHUNK
    in_a = off < a_bytes
    boff = off - a_bytes
    addr = tl.where(in_a, a_addr + off, b_addr + boff)
    left = tl.where(in_a, a_bytes - off, b_bytes - boff)
    size = tl.minimum(tl.maximum(left, 0), CHUNK).to(tl.int32)
    r = tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(dummy_ptr + idx, r)


def prefetch(a: torch.Tensor, a_bytes: int, b: torch.Tensor, b_bytes: int, dummy: torch.Tensor, chunk: int) -> None:
    n = -(-(a_bytes + b_bytes) // chunk)
    block = 128
    _prefetch_kernel[(max(1, -(-n // block)),)](a.data_ptr(), a_bytes, b.data_ptr(), b_bytes, dummy,
                                                CHUNK=chunk, BLOCK=block, num_warps=4)


def make_weight(fmt: str, n: int, k: int):
    if fmt == "bf16":
        return torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    if fmt == "int8":
        return G.QuantWeight(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                             torch.rand(n, device="cuda", dtype=torch.bfloat16) * 0.01)
    g = 128
    return G.QuantWeight(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
                         torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16) * 0.01,
                         torch.randint(0, 16, (n, k // g), device="cuda").to(torch.bfloat16), g)


def storage(w) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.qweight


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    H, D, ctx, bs = 32, 128, 256, 16
    record: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "us_per_layer": {}}
    dummy = torch.empty(1 << 16, device="cuda", dtype=torch.int32)
    # variants: name -> (o MB or "all", gate_up MB, chunk bytes, gap) ; None: no prefetch launch
    variants = {
        "none": None,
        "empty launch": (0, 0, 16384, True),
        "o all": ("all", 0, 16384, True),
        "gate_up 8 MB": (0, 8, 16384, True),
        "gate_up 16 MB": (0, 16, 16384, True),
        "gate_up 24 MB": (0, 24, 16384, True),
        "o all + gate_up 8 MB": ("all", 8, 16384, True),
        "o all + gate_up 16 MB": ("all", 16, 16384, True),
        "gate_up 16 MB, 64 KiB chunks": (0, 16, 65536, True),
        "gate_up 16 MB, 4 KiB chunks": (0, 16, 4096, True),
    }
    for fmt in args.formats.split(","):
        layers = []
        for _ in range(args.layers):
            cache = torch.randn(2, ctx // bs, bs, H, D, device="cuda", dtype=torch.bfloat16)
            layers.append((cache, make_weight(fmt, 4096, 4096), make_weight(fmt, 22016, 4096),
                           torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5))
        q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16)
        table = torch.arange(ctx // bs, device="cuda", dtype=torch.int32)[None]
        seq_lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
        res = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

        def step(v):
            outs = []
            for cache, wo, wgu, nw in layers:
                if v is not None:
                    o_mb, gu_mb, chunk, _ = v
                    a = storage(wo)
                    a_bytes = a.numel() * a.element_size() if o_mb == "all" else 0
                    b = storage(wgu)
                    prefetch(a, a_bytes, b, gu_mb * MB, dummy, chunk)
                att = paged_decode_attention(q, cache, table, seq_lens, D**-0.5, max_seq_len=ctx)
                o = G.gemv(att.view(1, -1), wo)
                gu, _ = G.gemv_rmsnorm(o, res, nw, 1e-5, wgu)
                outs.append(gu)
            return outs

        ref = None
        for r in range(args.rounds):
            for name, v in variants.items():
                step(v)  # compile
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    outs = step(v)
                times = []
                for _ in range(5):
                    g.replay()
                for _ in range(30):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) * 1e3 / args.layers)
                us = statistics.median(times)
                got = torch.cat(outs)
                if ref is None:
                    ref = got.clone()
                same = torch.equal(got, ref)
                record["us_per_layer"].setdefault(fmt, {}).setdefault(name, []).append(us)
                print(f"{fmt} round {r} {name:32s} {us:7.2f} us a layer  same={same}", flush=True)
                assert same, f"{fmt} {name}: output differs"
                del g, outs
        del layers
        torch.cuda.empty_cache()
    save_and_print(os.path.join(OUT, "gpu_l2_prefetch.json"), record, record["us_per_layer"],
                   "attention + o + gate_up, us a layer (rounds)", "none", width=32, digits=2)


if __name__ == "__main__":
    main()
