"""Prototype: a batch-1 int4 GEMV in Gluon (explicit layouts), against the shipped Triton GEMV.

Each thread owns R rows x WPT int32 words (8 weights a word, 16 bytes a row), 32 threads
along K, warps along rows. A word becomes eight fp32 "bias + q" values with the packed
lop3 asm of kernels/_quant_matmul_kernels (one asm per word, no per-byte registers), each
multiplied by its x column; the WPT words of a thread (32 columns, inside one group) are
summed and scaled in the thread, and rows are summed across threads once after the loop.
PREFETCH carries the next tile's words (int32) across the loop.

Status (H100, 2026-11-27, docs/performance.md): 3.65 SASS instructions a weight against the
shipped Triton GEMV's 3.83, and slower: best 66.3 µs for a Llama-2-7B layer's four shapes
against 56.3 (log bench/results/proto-gluon-gemv-h100-2026-11-27.log). Not kept; the "down"
shape (K = 11008) gave NaN because x is read unmasked past K.

CPU:  python bench/scripts/proto_gluon_gemv.py sass [--r 8 --wpt 4 --warps 4 --prefetch]
GPU:  python bench/scripts/proto_gluon_gemv.py bench
"""
import argparse
import collections
import os
import re
import subprocess
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _u4_word(w):
    """int32 word of 8 nibbles -> (128 + lo(b), b = 0..3), (2048 + hi(b), b = 0..3) in fp32."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t<4>;
        shl.b32 t0, $8, 16;
        shl.b32 t1, $8, 8;
        shr.b32 t2, $8, 8;
        shr.b32 t3, $8, 16;
        lop3.b32 $0, t0, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $1, t1, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $2, $8, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $3, t2, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $4, t1, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $5, $8, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $6, t2, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $7, t3, 0x0000F000, 0x45000000, 0xEA;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[w], dtype=(gl.float32,) * 8, is_pure=True, pack=1,
    )


@gluon.jit
def _x_at(x_ptr, xk, j: gl.constexpr):
    return gl.load(x_ptr + xk + j).to(gl.float32)


@gluon.jit
def gemv_int4_gluon(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, k_per_split, stride_os,
    GROUP: gl.constexpr, R: gl.constexpr, WPT: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr,
):
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[R, 1, WPT], threads_per_warp=[1, 32, 1],
                                        warps_per_cta=[NW, 1, 1], order=[2, 1, 0])
    LC: gl.constexpr = gl.SliceLayout(2, L3)  # [BN, NCH]
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # [NCH, WPT]
    BN: gl.constexpr = R * NW
    NCH: gl.constexpr = 32
    BK: gl.constexpr = NCH * WPT * 8  # columns a loop step
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LC))  # [BN]
    rmask = rows < N
    ch = gl.arange(0, NCH, layout=gl.SliceLayout(0, LC))  # [NCH]
    wx = gl.arange(0, NCH, layout=gl.SliceLayout(1, LX))[:, None] * WPT + \
        gl.arange(0, WPT, layout=gl.SliceLayout(0, LX))[None, :]  # [NCH, WPT] word of the step
    KW = K // 8
    k_lo = split * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + rows.to(gl.int64)[:, None, None] * KW + wx[None, :, :]  # [BN, NCH, WPT]
    m3 = rmask[:, None, None]
    sz_rows = rows[:, None] * (K // GROUP)  # [BN, 1]
    acc2 = gl.zeros([BN, NCH], gl.float32, LC)
    if PREFETCH:
        wv = gl.load(w_rows + k_lo // 8, mask=m3 & (k_lo // 8 + wx < k_hi // 8)[None, :, :], other=0)
    for k0 in range(k_lo, k_hi, BK):
        if PREFETCH:
            kn = k0 + BK
            wn = gl.load(w_rows + kn // 8, mask=m3 & (kn // 8 + wx < k_hi // 8)[None, :, :], other=0)
        else:
            wv = gl.load(w_rows + k0 // 8, mask=m3 & (k0 // 8 + wx < k_hi // 8)[None, :, :], other=0)
        l0, l1, l2, l3, h0, h1, h2, h3 = _u4_word(wv)  # [BN, NCH, WPT] each
        xk = k0 + wx * 8  # [NCH, WPT] first column of each word
        x0 = _x_at(x_ptr, xk, 0)
        x1 = _x_at(x_ptr, xk, 1)
        x2 = _x_at(x_ptr, xk, 2)
        x3 = _x_at(x_ptr, xk, 3)
        x4 = _x_at(x_ptr, xk, 4)
        x5 = _x_at(x_ptr, xk, 5)
        x6 = _x_at(x_ptr, xk, 6)
        x7 = _x_at(x_ptr, xk, 7)
        d = l0 * x0[None]  # one chain of FMAs
        d = d + h0 * x1[None]
        d = d + l1 * x2[None]
        d = d + h1 * x3[None]
        d = d + l2 * x4[None]
        d = d + h2 * x5[None]
        d = d + l3 * x6[None]
        d = d + h3 * x7[None]
        dsum = gl.sum(d, axis=2)  # [BN, NCH] sum_k (bias + q) x over the thread's 32 columns
        xe = x0 + x2 + x4 + x6
        xo = x1 + x3 + x5 + x7
        xb = gl.sum((128.0 * xe + 2048.0 * xo)[None], axis=2)  # [1, NCH]
        xs = gl.sum((xe + xo)[None], axis=2)  # [1, NCH]
        g = (k0 + ch * (WPT * 8)) // GROUP  # [NCH]
        smask = rmask[:, None] & (g < k_hi // GROUP)[None, :]
        sc = gl.load(s_ptr + sz_rows + g[None, :], mask=smask, other=0.0).to(gl.float32)  # [BN, NCH]
        zp = gl.load(z_ptr + sz_rows + g[None, :], mask=smask, other=0.0).to(gl.float32)
        acc2 += sc * (dsum - xb - zp * xs)
        if PREFETCH:
            wv = wn
    acc = gl.sum(acc2, axis=1)  # [BN]
    gl.store(out_ptr + split * stride_os + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)


def launch(x, qw32, s, z, group, r, wpt, nw, split, prefetch):  # type: ignore[no-untyped-def]
    n = qw32.shape[0]
    k = qw32.shape[1] * 8
    bn = r * nw
    bk = 32 * wpt * 8
    per = -(-k // split)
    per = -(-per // bk) * bk
    split = -(-k // per)
    out = torch.empty(split, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    gemv_int4_gluon[(triton.cdiv(n, bn), split)](x, qw32, s, z, out, n, k, per, out.stride(0), GROUP=group, R=r,
                                                 WPT=wpt, NW=nw, PREFETCH=prefetch, num_warps=nw)
    return out.sum(0, keepdim=True).to(x.dtype) if split > 1 else out


def sass(a) -> None:  # type: ignore[no-untyped-def]
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    names = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K", "k_per_split", "stride_os"]
    sig = dict(zip(names, ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "i32", "i32", "i32", "i32"]))
    const = dict(GROUP=128, R=a.r, WPT=a.wpt, NW=a.warps, PREFETCH=a.prefetch)
    sig.update({k: "constexpr" for k in const})
    src = GluonASTSource(gemv_int4_gluon, sig, const, {(i,): [["tt.divisibility", 16]] for i in range(9)})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": a.warps})
    cub = "/tmp/_g.cubin"
    open(cub, "wb").write(kern.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    out = subprocess.run([tool, "-sass", cub], capture_output=True, text=True, check=True).stdout
    if a.dump:
        open(a.dump + ".sass", "w").write(out)
        open(a.dump + ".ttgir", "w").write(kern.asm["ttgir"])
    ops = []
    for line in out.splitlines():
        mm = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if mm:
            ops.append((int(mm.group(1), 16), mm.group(3), line))
    best = []
    for adr, op, line in ops:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])
            if t and int(t.group(1), 16) < adr:
                body = [o for aa, o, _ in ops if int(t.group(1), 16) <= aa <= adr]
                best = body if len(body) > len(best) else best
    c = collections.Counter(o.split(".")[0] for o in best)
    w = a.r * a.wpt * 8
    print(f"loop {len(best)} instr for {w} weights a thread ({len(best) / max(1, w):.2f} a weight), "
          f"registers {getattr(kern, 'n_regs', '?')}, spills {getattr(kern, 'n_spills', '?')}:",
          ", ".join(f"{k} {v}" for k, v in c.most_common(20)))


def bench(a) -> None:  # type: ignore[no-untyped-def]
    from turbollm.kernels import gemv as G
    from turbollm.kernels.quant_matmul import int4_linear_ref
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    torch.manual_seed(0)
    dev = "cuda"
    big = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # flush L2 between calls? timing uses graphs

    def t(fn, reps=200):  # type: ignore[no-untyped-def]
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                fn()
        g.replay()
        torch.cuda.synchronize()
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(reps // 10):
            g.replay()
        en.record()
        torch.cuda.synchronize()
        return st.elapsed_time(en) * 1e3 / reps
    cfgs = [(r, wpt, nw, sp, pf) for r, wpt, nw in ((8, 4, 4), (4, 4, 4), (8, 4, 8), (16, 4, 4), (8, 2, 4), (4, 4, 8))
            for sp in (1, 2) for pf in (False, True)]
    tot = collections.defaultdict(float)
    tot_ref = 0.0
    for name, (n, k) in shapes.items():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        qw = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        s = (torch.rand(n, k // 128, device=dev) * 0.02 + 0.001).to(torch.bfloat16)
        z = torch.randint(0, 16, (n, k // 128), device=dev).to(torch.bfloat16)
        ref = int4_linear_ref(x.float(), qw, s.float(), z.float(), 128)
        qwt = G.QuantWeight(qw, s, z, 128)
        shipped = G.gemv(x, qwt)
        e0 = ((shipped.float() - ref).abs().max() / ref.abs().max()).item()
        us_ref = t(lambda: G.gemv(x, qwt))
        tot_ref += us_ref
        qw32 = qw.view(torch.int32)
        line = [f"{name}: shipped {us_ref:6.1f} (err {e0:.1e})"]
        for cfg in cfgs:
            out = launch(x, qw32, s, z, 128, *cfg)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            us = t(lambda: launch(x, qw32, s, z, 128, *cfg))
            tot[cfg] += us
            line.append(f"{cfg}: {us:6.1f} (err {err:.1e})")
        print("\n  ".join(line), flush=True)
    print(f"\nfour shapes of a Llama-2-7B layer: shipped GEMV {tot_ref:.1f} us")
    for cfg, us in sorted(tot.items(), key=lambda kv: kv[1])[:12]:
        print(f"  gluon R, WPT, warps, split, prefetch = {cfg}: {us:.1f} us")
    del big


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sass", "bench"])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--wpt", type=int, default=4)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    sys.exit(sass(a) if a.what == "sass" else bench(a))
