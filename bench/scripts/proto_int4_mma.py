"""Prototype: int4 tensor-core matmul with the packed weights permuted so that each thread's
bytes of the MMA register operand are contiguous (Marlin-style), against the shipped kernel.

Status (H100, 2026-11-27, docs/performance.md "int4 tensor-core path: a Marlin-style layout"):
"kpairs" cuts the M = 64 loop from 400 to 317 SASS instructions but its results are wrong
(max relative error ~0.9): the inline asm assumes that its four packed bytes are four
consecutive memory bytes, which the layout Triton picks does not guarantee. Its timings (same
work, wrong mapping) were within ~5% of the shipped kernel at M = 16 / 64, so the instruction
count is not what bounds that path; not integrated.

CPU:  python bench/scripts/proto_int4_mma.py sass [--m 64]     (SASS of the loop, sm_90)
GPU:  python bench/scripts/proto_int4_mma.py bench              (checks + times, Llama-2-7B shapes)
"""
import argparse
import collections
import os
import re
import subprocess
import sys

import torch
import triton
import triton.language as tl

from turbollm.kernels._quant_matmul_kernels import _tile_ids

PERM_BLOCK = 128  # k per permutation block: 64 bytes, 16 per MMA lane column


def permute_packed(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8, byte j = k pair j -> within each 64-byte block, byte 16 c + i holds pair
    c + 4 i (c = 0..3, i = 0..15): lane column c of the MMA operand reads 16 bytes in a row."""
    n, kh = qweight.shape
    return qweight.view(n, kh // 64, 16, 4).transpose(2, 3).contiguous().view(n, kh)


@triton.jit
def _u4_bf16_pairs(p):
    """uint8 bytes -> (128 + low nibble, 128 + high nibble) in bf16, four bytes a time."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, u0, u1;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        shr.b32 u0, t0, 4;
        shr.b32 u1, t1, 4;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $2, u0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, u1, 0x000F000F, 0x43004300, 0xEA;
        }
        """,
        constraints="=r,=r,=r,=r,r", args=[p], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
    )


@triton.jit
def _u4_bf16_kpairs(p):
    """Four uint8 bytes b0..b3 -> o1 = (128 + lo(b0), 128 + hi(b0), 128 + lo(b1), 128 + hi(b1)),
    o2 = the same of b2, b3, in bf16: each 32-bit register holds one byte's two weights, the
    pair of adjacent k an MMA operand register wants. 9 instructions for 8 weights."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 s, t0, t1, t2, t3;
        shr.b32 s, $4, 4;
        prmt.b32 t0, $4, s, 0x0400;
        prmt.b32 t1, $4, s, 0x0501;
        prmt.b32 t2, $4, s, 0x0602;
        prmt.b32 t3, $4, s, 0x0703;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $2, t2, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, t3, 0x000F000F, 0x43004300, 0xEA;
        }
        """,
        constraints="=r,=r,=r,=r,r", args=[p], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
    )


@triton.jit
def int4_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, part_ptr, M, N, K, stride_xm, k_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PERM: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr,
    ASM: tl.constexpr = False, KPAIRS: tl.constexpr = False,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    Q: tl.constexpr = HALF_K // 4
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    n_groups = K // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, HALF_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + offs_kh[None, :]
    sz_ptrs = offs_n * n_groups
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        p = tl.load(w_ptrs + k0 // 2, mask=n_mask[:, None], other=0)  # [BN, BK/2] memory order
        g = k0 // GROUP
        s = tl.load(s_ptr + sz_ptrs + g, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + sz_ptrs + g, mask=n_mask, other=0.0)
        wdt = xt.dtype
        zb = (z.to(tl.float32) + MAGIC_BASE).to(wdt)
        sb = s.to(wdt)
        if KPAIRS:  # PERM layout; o1 / o2 [BN, BK/2]: see _u4_bf16_kpairs
            o1, o2 = _u4_bf16_kpairs(p)
            # memory byte (c, i = 4 t + 2 w + v') holds logical pair c + 4 i: k = 2 (c + 4 i) + h
            o = tl.join(tl.reshape(o1, [BLOCK_N, 4, Q // 4, 2, 2]), tl.reshape(o2, [BLOCK_N, 4, Q // 4, 2, 2]))
            # [BN, c, t, v', h, w] -> [BN, t, w, v', c, h]
            w = tl.reshape(tl.permute(o, [0, 2, 5, 3, 1, 4]), [BLOCK_N, BLOCK_K])
            w = (w - zb[:, None]) * sb[:, None]
        else:
            if ASM:
                ql, qh = _u4_bf16_pairs(p)  # [BN, BK/2] bf16 each, memory order
            else:
                ql = ((p & 0xF).to(tl.int16) | MAGIC_BITS).to(wdt, bitcast=True)
                qh = ((p >> 4).to(tl.int16) | MAGIC_BITS).to(wdt, bitcast=True)
            if PERM:
                ql = tl.reshape(tl.permute(tl.reshape(ql, [BLOCK_N, 4, Q]), [0, 2, 1]), [BLOCK_N, HALF_K])
                qh = tl.reshape(tl.permute(tl.reshape(qh, [BLOCK_N, 4, Q]), [0, 2, 1]), [BLOCK_N, HALF_K])
            wl = (ql - zb[:, None]) * sb[:, None]
            wh = (qh - zb[:, None]) * sb[:, None]
            w = tl.interleave(wl, wh)  # [BN, BK]
        acc = tl.dot(w, tl.trans(xt), acc)  # [BN, BM]
    acc = tl.trans(acc)
    rows = offs_m.to(tl.int64)[:, None]
    tl.store(part_ptr + (pid_k * M + rows) * N + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def launch(x, qw, s, z, cfg, perm, kpairs=False):  # type: ignore[no-untyped-def]
    bm, bn, bk, split, warps, stages = cfg
    m, k = x.shape
    n = qw.shape[0]
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    per = -(-k // split)
    per = -(-per // bk) * bk
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    int4_mma_kernel[grid](x, qw, s, z, part, m, n, k, x.stride(0), per, GROUP=128, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, GROUP_M=8, PERM=perm, MAGIC_BITS=0x4300, MAGIC_BASE=128.0,
                          KPAIRS=kpairs, num_warps=warps, num_stages=stages)
    return part.sum(0).to(x.dtype) if split > 1 else part[0].to(x.dtype)


def sass(args) -> None:  # type: ignore[no-untyped-def]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "part_ptr", "M", "N", "K", "stride_xm", "k_per_split"]
    sig = {n: t for n, t in zip(names, ["*bf16", "*u8", "*bf16", "*bf16", "*fp32"] + ["i32"] * 5)}
    const = dict(GROUP=128, BLOCK_M=args.m, BLOCK_N=args.bn, BLOCK_K=128, GROUP_M=8, PERM=not args.natural,
                 MAGIC_BITS=0x4300, MAGIC_BASE=128.0, ASM=args.asm, KPAIRS=args.kpairs)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(int4_mma_kernel, sig, const, {(i,): [["tt.divisibility", 16]] for i in range(10)})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps, "num_stages": 3})
    cub = "/tmp/_p.cubin"
    open(cub, "wb").write(kern.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    out = subprocess.run([tool, "-sass", cub], capture_output=True, text=True, check=True).stdout
    if args.dump:
        open(args.dump + ".sass", "w").write(out)
        open(args.dump + ".ttgir", "w").write(kern.asm["ttgir"])
    ops = []
    for l in out.splitlines():
        mm = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
        if mm:
            ops.append((int(mm.group(1), 16), mm.group(3), l))
    best = []
    for a, op, l in ops:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", l.split("BRA", 1)[1])
            if t and int(t.group(1), 16) < a:
                body = [o for aa, o, _ in ops if int(t.group(1), 16) <= aa <= a]
                best = body if len(body) > len(best) else best
    c = collections.Counter(best)
    print(f"loop {len(best)} instr:", ", ".join(f"{k} {v}" for k, v in c.most_common(30)))


def bench(args) -> None:  # type: ignore[no-untyped-def]
    from turbollm.kernels import gemv as gemv_mod
    from turbollm.kernels.quant_matmul import int4_weight_only_linear
    from turbollm.kernels.quant_matmul_config import QuantMatmulConfig
    dev = "cuda"
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    torch.manual_seed(0)

    def t(fn, reps=200):  # type: ignore[no-untyped-def]
        g = torch.cuda.CUDAGraph()
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(10):
                fn()
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        torch.cuda.synchronize()
        st.record()
        for _ in range(reps // 10):
            g.replay()
        en.record()
        torch.cuda.synchronize()
        return st.elapsed_time(en) * 1e3 / reps
    cfgs = {1: [(16, 64, 128, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 128, 4, 4, 3), (16, 128, 128, 8, 8, 3)],
            16: [(16, 64, 128, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 128, 4, 4, 3), (16, 128, 128, 4, 8, 3)],
            64: [(64, 64, 128, 2, 4, 3), (64, 64, 128, 4, 4, 3), (64, 128, 128, 2, 4, 3), (64, 128, 128, 2, 8, 3),
                 (64, 128, 128, 4, 4, 3)]}
    rows = []
    for m in (1, 16, 64):
        tot_ref, tot = 0.0, collections.defaultdict(float)
        worst = collections.defaultdict(float)
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            qw = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
            s = (torch.rand(n, k // 128, device=dev) * 0.02 + 0.001).to(torch.bfloat16)
            z = torch.randint(0, 16, (n, k // 128), device=dev).to(torch.bfloat16)
            ref = int4_weight_only_linear(x, qw, s, z, 128, integer_zeros=True)
            qp = permute_packed(qw)
            if m == 1:  # the shipped batch-1 path: kernels/gemv.py (packed conversions)
                qwt = gemv_mod.QuantWeight(qw, s, z, 128)
                us_ref = t(lambda: gemv_mod.gemv(x, qwt))
            else:
                us_ref = t(lambda: int4_weight_only_linear(x, qw, s, z, 128, integer_zeros=True))
            tot_ref += us_ref
            line = [f"M={m} {name}: shipped {us_ref:6.1f}"]
            for cfg in cfgs[m]:
                for var in ("natural", "kpairs"):
                    kp = var == "kpairs"
                    w = qp if kp else qw
                    out = launch(x, w, s, z, cfg, kp, kp)
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    us = t(lambda: launch(x, w, s, z, cfg, kp, kp))
                    tot[(cfg, var)] += us
                    worst[(cfg, var)] = max(worst[(cfg, var)], err)
                    line.append(f"{var[0]}{cfg}: {us:6.1f}")
            print("  ".join(line), flush=True)
        best = min(tot.items(), key=lambda kv: kv[1])
        rows.append((m, tot_ref, best))
        for key, us in sorted(tot.items(), key=lambda kv: kv[1]):
            print(f"M={m} total {key[1]} {key[0]}: {us:.1f} us (shipped {tot_ref:.1f}), max rel err {worst[key]:.1e}")
    print("\nM | shipped us (4 shapes of a Llama-2-7B layer) | best prototype")
    for m, r, ((cfg, var), us) in rows:
        print(f"{m} | {r:.1f} | {us:.1f} {var} {cfg}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sass", "bench"])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--natural", action="store_true")
    ap.add_argument("--asm", action="store_true")
    ap.add_argument("--kpairs", action="store_true")
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    sys.exit(sass(a) if a.what == "sass" else bench(a))
