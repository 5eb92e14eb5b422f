"""Prototype: the batch-1 int4 GEMV on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 out).

The shipped GEMV (kernels/gemv.py) spends ~3.9 instructions a weight on CUDA cores and is
bound by them (docs/performance.md, seventh session). Here the weights are operand A of
`mma.sync.m16n8k16` and x fills all 8 columns of B, so one instruction a warp multiplies 256
weights.

Repacked layout (`repack`, done once at load): int32 words [N / 16, K / 128, 32 lanes, 8],
one word a lane and k16 step of a group. A word holds exactly the lane's A fragment, eight
nibbles at bits 4 (h + 2 half) + 16 e:
- h: row g or g + 8, with g = lane / 4;
- half: columns 0-7 or 8-15 of the step;
- e: column 2t or 2t + 1, with t = lane % 4.
So `lop3(w >> 4i, 0x000F000F, 0x43004300)` is fragment register a_i as the bf16 pair
(128 + q, 128 + q'). The asm chains a group's 8 MMAs from zero. The affine is then applied
once a group, in fp32: out += s (C - (128 + z) sum_g x), where sum_g x (per group) is
computed by the caller (here torch; a fused prologue would write it).

Status (H100, 2026-11-27, docs/performance.md seventh session): correct on the first try
(relative error against the fp32 reference at the bf16 output's rounding), 1.7-2.3 SASS
instructions a weight (cpu: `sass`), but no faster than the shipped GEMV: best qkv 14.9,
o 8.7, gate_up 24.0, down 14.5 µs against 13.2 / 5.6 / 22.5 / 13.4, each mma time
including the ~2 µs memset of its fp32 output (raw bench/results/proto-int4-mma-gemv-h100-2026-11-27.json).
Split-K over programs was needed (one program a row block over all of K: 29-88 µs); the
prefetch of the next group's words did not help. A second visit (raw
proto-int4-mma-gemv-v2-h100-2026-11-27.json) timed the kernel without the memset:
- G2 groups a loop step with every load issued first: no better;
- x permuted by the caller for 16-byte loads (XP): no better;
- best of nine variants: qkv 16.8 µs, against 13.1 shipped.
The memset alone is 2.7-3.9 µs in a graph. The likely limit is bytes in flight: a lane holds
32 B of weights a step, against the shipped tile's 128 B. Raising R (row blocks a warp) to
carry more costs registers and duplicated x loads as written. Next: x loaded once per warp
and broadcast over R, a deterministic split reduce instead of the atomics and the memset,
and R = 4 with the row blocks' MMAs interleaved in one asm block. Not wired into the model.
Third visit (raw proto-int4-mma-gemv-v3-h100-2026-11-27.json): masks had split the word loads
into 32-bit ones. With whole steps a program (EVEN, 16-byte loads again), 11 variants took
qkv 14.9-23.7 µs, o 7.8-14.9, gate_up 24.7-38.8 and down 16.5-25.1, against 13.4 / 5.7 / 22.5 / 13.5
shipped. So the instruction count was not what held it back. Known bug of the masked
(not EVEN) path: x and its group sums are read unmasked past K, and 0 * NaN poisons the sum
(the 64 x 256, S = 3, G2 = 4 check printed nan).

CPU:  python bench/scripts/proto_int4_mma_gemv.py sass [--r 2 --nw 4]
GPU:  python bench/scripts/proto_int4_mma_gemv.py bench   -> checks against kernels/gemv.gemv_ref, times
      against kernels/gemv.gemv (shipped), table + $OUT/proto_int4_mma_gemv.json
"""
import argparse
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

GROUP = 128


def repack(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] (byte j: column 2j low nibble, 2j + 1 high) -> int32 [N / 16, K / 128, 32, 8]."""
    n, kb2 = qweight.shape
    k = kb2 * 2
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(n, k).to(torch.int64)  # [N, K] codes
    # row = 16 rb + 8 h + g, column = 16 kb + 8 half + 2 t + e
    q = q.view(n // 16, 2, 8, k // 16, 2, 4, 2)  # [rb, h, g, kb, half, t, e]
    shift = (4 * (torch.arange(2).view(2, 1, 1) + 2 * torch.arange(2).view(1, 2, 1))
             + 16 * torch.arange(2).view(1, 1, 2)).to(q.device)  # [h, half, e]
    words = (q << shift.view(1, 2, 1, 1, 2, 1, 2)).sum(dim=(1, 4, 6))  # [rb, g, kb, t]
    words = words.view(n // 16, 8, k // GROUP, 8, 4)  # [rb, g, group, j, t]
    words = words.permute(0, 2, 1, 4, 3).reshape(n // 16, k // GROUP, 32, 8)  # [rb, group, lane = 4 g + t, j]
    return (words & 0xFFFFFFFF).to(torch.int64).to(torch.int32).contiguous()


_MMA_ASM = gl.constexpr("""
        {
        .reg .b32 a<4>, t<3>;
        .reg .f32 c<4>, d<4>;
        mov.f32 c0, 0f00000000;
        mov.f32 c1, 0f00000000;
        mov.f32 c2, 0f00000000;
        mov.f32 c3, 0f00000000;
        mov.f32 d0, 0f00000000;
        mov.f32 d1, 0f00000000;
        mov.f32 d2, 0f00000000;
        mov.f32 d3, 0f00000000;
        """ + "".join(f"""
        shr.b32 t0, ${8 + j}, 4;
        shr.b32 t1, ${8 + j}, 8;
        shr.b32 t2, ${8 + j}, 12;
        lop3.b32 a0, ${8 + j}, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 a1, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 a2, t1, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 a3, t2, 0x000F000F, 0x43004300, 0xEA;
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{"c" if j % 2 == 0 else "d"}0, {"c" if j % 2 == 0 else "d"}1, {"c" if j % 2 == 0 else "d"}2, {"c" if j % 2 == 0 else "d"}3}}, {{a0, a1, a2, a3}}, {{${16 + j}, ${24 + j}}}, {{{"c" if j % 2 == 0 else "d"}0, {"c" if j % 2 == 0 else "d"}1, {"c" if j % 2 == 0 else "d"}2, {"c" if j % 2 == 0 else "d"}3}};
        """ for j in range(8)) + """
        add.f32 $0, c0, d0;
        add.f32 $1, c2, d2;
        mov.b32 $2, 0;
        mov.b32 $3, 0;
        mov.b32 $4, 0;
        mov.b32 $5, 0;
        mov.b32 $6, 0;
        mov.b32 $7, 0;
        }
        """)
_MMA_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 24))


@gluon.jit
def _group_mma(w, b0, b1):
    """8 words (a lane's A fragments of one group's 8 k16 steps) and 8 + 8 B registers ->
    (C[g], C[g + 8], 0, ...) of the chained MMAs, fp32."""
    return gl.inline_asm_elementwise(asm=_MMA_ASM, constraints=_MMA_CONSTRAINTS, args=[w, b0, b1],
                                     dtype=gl.float32, is_pure=True, pack=8)


@gluon.jit
def _elem(v, ODD: gl.constexpr):
    """[A, B, C, 8] -> element 0 (ODD False) or 1 of the last dimension, [A, B, C]: three
    splits of in-thread dimensions, register renaming only."""
    e, o = gl.split(gl.reshape(v, [v.shape[0], v.shape[1], v.shape[2], 4, 2]))
    pick = o if ODD else e
    f0, f1 = gl.split(gl.reshape(pick, [v.shape[0], v.shape[1], v.shape[2], 2, 2]))
    g0, g1 = gl.split(f0)
    return g0


@gluon.jit
def _loads(w_ptrs, x32_ptr, x_off, x_off16, xs_ptr, s_ptr, z_ptr, sz0, sz8, rows, grp, g_hi,
           XP: gl.constexpr, L: gl.constexpr, EVEN: gl.constexpr):
    """Everything group `grp` reads; past g_hi the scales load as 0, so it adds nothing.
    EVEN: the caller's split puts a whole number of steps in every program (no masks, which
    also keeps the word loads 16 bytes wide)."""
    if EVEN:
        w = gl.load(w_ptrs + grp * 256)  # [R, NW, 32, 8] int32
    else:
        w = gl.load(w_ptrs + grp * 256, mask=(x_off >= 0) & (grp < g_hi), other=0)
    if XP:  # x permuted by the caller: a lane's 16 B registers of the group are 64 contiguous bytes
        xp = gl.load(x32_ptr + grp * 64 + x_off16)  # [R, NW, 32, 16] (in bounds: grp < K / 128)
        b0, b1 = gl.split(gl.reshape(xp, [xp.shape[0], xp.shape[1], xp.shape[2], 8, 2]))
        b0 = gl.convert_layout(b0, L)
        b1 = gl.convert_layout(b1, L)
    else:
        b0 = gl.load(x32_ptr + grp * 64 + x_off)
        b1 = gl.load(x32_ptr + grp * 64 + x_off + 4)
    xs = gl.load(xs_ptr + grp + rows * 0)  # [R, NW, 32] sum of x over the group
    if EVEN:
        s0 = gl.load(s_ptr + sz0 + grp).to(gl.float32)
        s8 = gl.load(s_ptr + sz8 + grp).to(gl.float32)
    else:
        m3 = (rows >= 0) & (grp < g_hi)
        s0 = gl.load(s_ptr + sz0 + grp, mask=m3, other=0.0).to(gl.float32)
        s8 = gl.load(s_ptr + sz8 + grp, mask=m3, other=0.0).to(gl.float32)
    z0 = gl.load(z_ptr + sz0 + grp).to(gl.float32)
    z8 = gl.load(z_ptr + sz8 + grp).to(gl.float32)
    return w, b0, b1, xs, s0, s8, z0, z8


@gluon.jit
def _step(acc0, acc8, w, b0, b1, xs, s0, s8, z0, z8, L3: gl.constexpr):
    c = _group_mma(w, b0, b1)  # [R, NW, 32, 8]: (C[g], C[g + 8], 0 ...)
    c0 = gl.convert_layout(_elem(c, False), L3)
    c8 = gl.convert_layout(_elem(c, True), L3)
    acc0 += s0 * (c0 - (128.0 + z0) * xs)
    acc8 += s8 * (c8 - (128.0 + z8) * xs)
    return acc0, acc8


@gluon.jit
def int4_mma_gemv(
    x32_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, groups_per_split,
    R: gl.constexpr, NW: gl.constexpr, G2: gl.constexpr, XP: gl.constexpr, EVEN: gl.constexpr,
):
    """out[n] = sum_g s[n, g] (sum_{k in g} q[n, k] x[k] - z[n, g] sum_{k in g} x[k]).
    Program: 16 R NW rows (warp w: row blocks w R .. w R + R - 1), all of K, one group a step."""
    L: gl.constexpr = gl.BlockedLayout(size_per_thread=[R, 1, 1, 8], threads_per_warp=[1, 1, 32, 1],
                                       warps_per_cta=[1, NW, 1, 1], order=[3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L)
    pid = gl.program_id(0)
    KG = K // 128
    i_r = gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))[:, None, None, None]
    i_w = gl.arange(0, NW, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))[None, :, None, None]
    i_l = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))[None, None, :, None]
    i_j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))[None, None, None, :]
    rb = pid * (R * NW) + i_w * R + i_r  # [R, NW, 1, 1] row block
    w_ptrs = w_ptr + ((rb.to(gl.int64) * KG) * 32 + i_l) * 8 + i_j  # [R, NW, 32, 8] group 0
    x_off = i_j * 8 + (i_l % 4) + i_r * 0 + i_w * 0  # [R, NW, 32, 8] int32 pair of x, group 0
    L16: gl.constexpr = gl.BlockedLayout(size_per_thread=[R, 1, 1, 16], threads_per_warp=[1, 1, 32, 1],
                                         warps_per_cta=[1, NW, 1, 1], order=[3, 2, 1, 0])
    u_r = gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L16))))[:, None, None, None]
    u_w = gl.arange(0, NW, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L16))))[None, :, None, None]
    u_l = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L16))))[None, None, :, None]
    u_j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L16))))[None, None, None, :]
    x_off16 = (u_l % 4) * 16 + u_j + u_r * 0 + u_w * 0  # [R, NW, 32, 16]: permuted x (XP)
    j_r = gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None]
    j_w = gl.arange(0, NW, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None]
    j_l = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    rows = (pid * (R * NW) + j_w * R + j_r) * 16 + j_l // 4  # [R, NW, 32] row g of each lane
    sz0 = rows.to(gl.int64) * KG  # [R, NW, 32]
    sz8 = (rows + 8).to(gl.int64) * KG
    acc0 = gl.zeros([R, NW, 32], gl.float32, L3)
    acc8 = gl.zeros([R, NW, 32], gl.float32, L3)
    g_lo = gl.program_id(1) * groups_per_split
    g_hi = gl.minimum(g_lo + groups_per_split, KG)
    for grp in range(g_lo, g_hi, G2):  # G2 groups a step, every load issued before any math
        wa, b0a, b1a, xsa, s0a, s8a, z0a, z8a = _loads(w_ptrs, x32_ptr, x_off, x_off16, xs_ptr, s_ptr, z_ptr, sz0, sz8,
                                                        rows, grp, g_hi, XP, L, EVEN)
        if G2 >= 2:
            wb, b0b, b1b, xsb, s0b, s8b, z0b, z8b = _loads(w_ptrs, x32_ptr, x_off, x_off16, xs_ptr, s_ptr, z_ptr, sz0, sz8,
                                                            rows, grp + 1, g_hi, XP, L, EVEN)
        if G2 >= 4:
            wc, b0c, b1c, xsc, s0c, s8c, z0c, z8c = _loads(w_ptrs, x32_ptr, x_off, x_off16, xs_ptr, s_ptr, z_ptr, sz0, sz8,
                                                            rows, grp + 2, g_hi, XP, L, EVEN)
            wd, b0d, b1d, xsd, s0d, s8d, z0d, z8d = _loads(w_ptrs, x32_ptr, x_off, x_off16, xs_ptr, s_ptr, z_ptr, sz0, sz8,
                                                            rows, grp + 3, g_hi, XP, L, EVEN)
        acc0, acc8 = _step(acc0, acc8, wa, b0a, b1a, xsa, s0a, s8a, z0a, z8a, L3)
        if G2 >= 2:
            acc0, acc8 = _step(acc0, acc8, wb, b0b, b1b, xsb, s0b, s8b, z0b, z8b, L3)
        if G2 >= 4:
            acc0, acc8 = _step(acc0, acc8, wc, b0c, b1c, xsc, s0c, s8c, z0c, z8c, L3)
            acc0, acc8 = _step(acc0, acc8, wd, b0d, b1d, xsd, s0d, s8d, z0d, z8d, L3)
    first = (j_l % 4) == 0  # lanes t = 0 store (all four hold the same sums)
    gl.atomic_add(out_ptr + rows, acc0, mask=first)  # fp32 out (prototype: order of splits not fixed)
    gl.atomic_add(out_ptr + rows + 8, acc8, mask=first)


def launch(x: torch.Tensor, words: torch.Tensor, s: torch.Tensor, z: torch.Tensor, r: int, nw: int,
           xs: torch.Tensor | None = None, split: int = 1, g2: int = 1,
           out: torch.Tensor | None = None, xp: bool = False) -> torch.Tensor:
    """fp32 [1, N] (zeroed here unless `out` is given already zeroed)."""
    n = words.shape[0] * 16
    k = words.shape[1] * GROUP
    kg = k // GROUP
    if xs is None:
        xs = x.float().view(kg, GROUP).sum(1)
    if out is None:
        out = torch.zeros(1, n, device=x.device, dtype=torch.float32)
    x32 = x.view(torch.int32)
    if xp:  # [group, t, 16]: (pair t + 8 j, pair t + 4 + 8 j) for j = 0..7
        x32 = x32.view(kg, 8, 2, 4).permute(0, 3, 1, 2).contiguous()
    per = -(-kg // split)
    per = -(-per // g2) * g2  # whole steps a program
    even = kg % per == 0
    int4_mma_gemv[(n // (16 * r * nw), -(-kg // per))](x32, xs, words, s, z, out, n, k, per,
                                                      R=r, NW=nw, G2=g2, XP=xp, EVEN=even, num_warps=nw)
    return out


def sass(a) -> None:  # type: ignore[no-untyped-def]
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, os.path.dirname(__file__))
    from cpu_sass import report
    names = ["x32_ptr", "xs_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K"]
    names.append("groups_per_split")
    sig = dict(zip(names, ["*i32", "*fp32", "*i32", "*bf16", "*bf16", "*fp32", "i32", "i32", "i32"]))
    const = dict(R=a.r, NW=a.nw, G2=a.g2, XP=a.xp, EVEN=not a.masked)
    sig.update({k: "constexpr" for k in const})
    src = GluonASTSource(int4_mma_gemv, sig, const, {(i,): [["tt.divisibility", 16]] for i in range(8)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": a.nw})
    report(k, a.dump)


def bench(a) -> None:  # type: ignore[no-untyped-def]
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_gemv_tune import graph_us
    from turbollm.kernels import gemv
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    res = {}
    # correctness: small and real shapes against the fp32 reference
    for n, k in ((64, 256), (128, 1024), (4096, 4096), (12288, 4096)):
        q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
        s = (torch.rand(n, k // GROUP, generator=g) / 100).cuda().bfloat16()
        z = torch.randint(0, 16, (n, k // GROUP), generator=g).cuda().bfloat16()
        x = torch.randn(1, k, generator=g).cuda().bfloat16()
        ref = gemv.gemv_ref(x, gemv.QuantWeight(q, s, z, GROUP)).float()
        for r, nw, split, g2, xp in ((1, 4, 1, 1, False), (2, 4, 4, 2, True), (1, 4, 3, 4, True)):
            if n % (16 * r * nw):
                continue
            got = launch(x, repack(q), s, z, r, nw, split=split, g2=g2, xp=xp).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            print(f"check {n}x{k} R={r} NW={nw} S={split} G={g2} xp={xp}: max rel err {err:.2e}", flush=True)
            res[f"check {n}x{k} R{r} NW{nw} S{split} G{g2} xp{xp}"] = err
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    for name, (n, k) in shapes.items():
        if k % GROUP:
            continue
        copies = max(1, -(-160_000_000 // (n * k // 2)))
        qs = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8) for _ in range(copies)]
        s = torch.rand(n, k // GROUP, device="cuda", dtype=torch.bfloat16) / 100
        z = torch.randint(0, 16, (n, k // GROUP), device="cuda").bfloat16()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        xs = x.float().view(-1, GROUP).sum(1)
        ws = [gemv.QuantWeight(qq, s, z, GROUP) for qq in qs]
        shipped = graph_us([(lambda w=w: gemv.gemv(x, w)) for w in ws])
        words = [repack(qq) for qq in qs]
        row = {"shipped_us": shipped}
        outs = torch.zeros(1, n, device="cuda", dtype=torch.float32)
        for r, nw, split, g2, xp in ((1, 4, 8, 1, False), (1, 4, 8, 1, True), (1, 4, 4, 2, True), (1, 4, 8, 2, True),
                                     (1, 4, 4, 4, True), (1, 4, 8, 4, True), (1, 8, 8, 2, True), (1, 4, 2, 4, True),
                                     (1, 4, 16, 1, True), (1, 4, 43, 1, True), (1, 4, 43, 2, True)):
            if n % (16 * r * nw):
                continue
            key = f"mma R{r} NW{nw} S{split} G{g2}{' xp' if xp else ''}"
            try:  # kernel only (the output is not zeroed between calls: times, not values)
                row[key] = graph_us([(lambda w=w: launch(x, w, s, z, r, nw, xs, split, g2, outs, xp)) for w in words])
            except Exception as e:  # noqa: BLE001
                row[key] = str(e)[:80]
        row["memset_us"] = graph_us([lambda: outs.zero_()])
        res[name] = row
        mb = n * k / 2e6
        print(f"{name} {n}x{k} ({mb:.1f} MB): " + "; ".join(
            f"{key} {v:.1f} us ({mb / v * 1e3:.0f} GB/s)" if isinstance(v, float) else f"{key} {v}"
            for key, v in row.items()), flush=True)
        del qs, words, ws
    json.dump(res, open(os.path.join(out_dir, "proto_int4_mma_gemv.json"), "w"), indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sass", "bench", "repack-check"])
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--nw", type=int, default=4)
    ap.add_argument("--g2", type=int, default=2, help="groups a loop step")
    ap.add_argument("--xp", action="store_true", help="x permuted by the caller (vector loads)")
    ap.add_argument("--masked", action="store_true", help="sass: the masked (not EVEN) variant")
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    if a.mode == "sass":
        sass(a)
    elif a.mode == "bench":
        bench(a)
    else:  # CPU: the repacked word of (row block 0, group 0, lane, j) decoded back to the codes
        n, k = 32, 256
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        q = torch.stack((qw & 0xF, qw >> 4), dim=-1).reshape(n, k)
        words = repack(qw)
        bad = 0
        for rb in range(n // 16):
            for grp in range(k // GROUP):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for j in range(8):
                        wd = int(words[rb, grp, lane, j]) & 0xFFFFFFFF
                        col0 = grp * GROUP + 16 * j
                        for h in range(2):
                            for half in range(2):
                                for e in range(2):
                                    nib = (wd >> (4 * (h + 2 * half) + 16 * e)) & 0xF
                                    want = int(q[16 * rb + 8 * h + g, col0 + 8 * half + 2 * t + e])
                                    bad += nib != want
        print("repack mismatches:", bad)


if __name__ == "__main__":
    main()
