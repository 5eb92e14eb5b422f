"""Triton kernels behind kernels/quant_matmul.py (launchers, storage layout and the choice of
path are documented there). Imported only when triton is installed.

Dequantization variants (constexpr DEQ, chosen per launch by QuantMatmulConfig.dequant):
- 0 "cvt": integer -> float conversion instructions (I2F). Simple, but Hopper retires 16
  conversions per clock per SM against 128 fp32 operations, so at decode sizes they bound
  the kernel well below memory bandwidth.
- 1 "magic": bit tricks with full-rate integer/fp32 operations. OR-ing an integer v < 2^23
  into the mantissa of 2^23 (bits 0x4B000000) gives the float 2^23 + v exactly; one
  subtraction recovers v. int8 q: bits 0x4B000080 + q is 2^23 + 128 + q.
- 2 "magic_act" (int4, tensor-core path): the same trick in the activation dtype: bf16 bits
  0x4300 | q = 128 + q, fp16 0x6400 | q = 1024 + q; (that - (base + z)) is exact and one
  multiply by s rounds once, exactly like the fp32 route, with no fp32 -> bf16 conversion.
  Zeros may be fractional (a free per-group offset, compress/_int4.py "float"): the tile
  subtracts only zi (z's integer part clamped to 0..15, exact in base + zi), and the rest,
  zf = z - zi, is a rank-1 correction of the tile's product in fp32: - (s zf)[n] sum_k x[m, k]
  (one scalar per row and per row of x, not one more operation per weight; it adds 0 for
  integer zeros).
- 3 "packed" (int4, batch-1 GEMV in kernels/gemv.py; inline PTX, so GPU only): four bytes at
  a time in one 32-bit register R, each nibble shifted into place and masked into the
  mantissa of a float bias with one lop3, giving B + q in fp32 with no subtraction: low
  nibbles (R << s) & 0x000F0000 | 0x43000000 = 128 + q, high nibbles (R << s) & 0x0000F000
  | 0x45000000 = 2048 + q (the two positions share four shifts a register). B + q has at
  most 12 significant bits, so its product with a bf16 / fp16 activation is exact in fp32;
  the caller subtracts each bias times the sum of its activations once per group, after the
  fp32 sums (which then carry B's magnitude: a relative error of ~1e-4 of a group's sum for
  2048, far below a bf16 output's rounding). 1.5 integer operations a weight, against an
  I2F (quarter rate) or three full-rate operations. The int8 analogue (bytes masked at bits
  15-22 under 256.0 with the sign bit flipped: 384 + q) was measured no faster than
  "magic" in the GEMV: int8 is not bound by its conversions there.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turbollm.kernels._interpreter import round_bf16


@triton.jit
def _u4_to_f32(nib, DEQ: tl.constexpr):
    """uint8 values 0..15 -> the same values in fp32 (exact either way)."""
    if DEQ == 0:
        return nib.to(tl.float32)
    else:
        return (nib.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _u4_pairs_packed(p):
    """uint8 bytes of two nibbles -> (128 + low nibble, 2048 + high nibble) in fp32 (inline
    PTX). Low nibbles go to bits 16-19 under 0x43000000 (128.0, ulp 1), high nibbles to bits
    12-15 under 0x45000000 (2048.0, ulp 1), which lets the two share shifts: three shifts
    (one a rotation, which brings byte 0's low and byte 3's high nibble into place at once)
    and eight lop3 for eight weights."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t<3>;
        shf.l.wrap.b32 t0, $8, $8, 16;
        shl.b32 t1, $8, 8;
        shr.b32 t2, $8, 8;
        lop3.b32 $0, t0, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $1, t1, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $2, $8, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $3, t2, 0x000F0000, 0x43000000, 0xEA;
        lop3.b32 $4, t1, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $5, $8, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $6, t2, 0x0000F000, 0x45000000, 0xEA;
        lop3.b32 $7, t0, 0x0000F000, 0x45000000, 0xEA;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[p], dtype=(tl.float32, tl.float32), is_pure=True, pack=4,
    )


@triton.jit
def _i8_to_f32(w, DEQ: tl.constexpr):
    """int8 values -> the same values in fp32 (exact either way)."""
    if DEQ == 0:
        return w.to(tl.float32)
    else:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dequant_int4_tile(nib, z, s, zb, sb, wdt: tl.constexpr, DEQ: tl.constexpr, MAGIC_BITS: tl.constexpr,
                       ROUND_W: tl.constexpr):
    """nib [BN, C] uint8 0..15 -> (q - z) * s in wdt; z, s fp32 [BN]. DEQ 2: zb = base + zi and
    sb = s in wdt, giving (q - zi) * s; the caller corrects for z - zi (module docstring)."""
    if DEQ == 2:
        qa = (nib.to(tl.int16) | MAGIC_BITS).to(wdt, bitcast=True)  # base + q, exact
        return (qa - zb[:, None]) * sb[:, None]  # q - zi exact, one rounding
    else:
        w = (_u4_to_f32(nib, DEQ) - z[:, None]) * s[:, None]
        if ROUND_W:
            w = round_bf16(w)  # interpreter only: see _interpreter.py
        return w.to(wdt)


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr, PDL: tl.constexpr,
):
    """acc [BM, BN] fp32 -> out (+ bias, cast) or, when split, the fp32 partial. PDL: the
    weights are read, the next kernel may launch (kernels/_pdl.py)."""
    if PDL:
        gdc_launch_dependents()
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ROUND_OUT:
            acc = round_bf16(acc)
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + rows) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    part_ptr, b_ptr, out_ptr, M, N, stride_om,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]), summed in split order."""
    if PDL:  # programmatic dependent launch (kernels/_pdl.py)
        gdc_wait()
        gdc_launch_dependents()
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    if ROUND_OUT:
        acc = round_bf16(acc)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemv_step(acc, w, x_ptr, k, k_mask, pid_m, M, stride_xm, row_ids,
                    BLOCK_M: tl.constexpr, DEQ: tl.constexpr):
    """acc [BM, BN] += x[rows, k] . w[:, k] for a [BN, BK] int8 slab (reused by every row)."""
    w = _i8_to_f32(w, DEQ)
    for i in tl.static_range(BLOCK_M):
        m = pid_m * BLOCK_M + i
        xv = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=k_mask & (m < M), other=0.0)  # [BK]
        c = tl.sum(w * xv.to(tl.float32)[None, :], axis=1)  # [BN]
        acc += tl.where(row_ids == i, c[None, :], 0.0)
    return acc


@triton.jit
def int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
    PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr, PDL: tl.constexpr,
):
    """PREFETCH loads the next slab before reducing the current one (two slabs in flight)."""
    if PDL:  # programmatic dependent launch (kernels/_pdl.py)
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BN, 1]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    row_ids = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PREFETCH:
        k = k_lo + offs_k
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < k_hi)[None, :], other=0)  # [BN, BK]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            kn = k + BLOCK_K
            w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < k_hi)[None, :], other=0)
            acc = _int8_gemv_step(acc, w, x_ptr, k, k < k_hi, pid_m, M, stride_xm, row_ids, BLOCK_M, DEQ)
            w = w_next
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < k_hi)[None, :], other=0)  # [BN, BK]
            acc = _int8_gemv_step(acc, w, x_ptr, k, k < k_hi, pid_m, M, stride_xm, row_ids, BLOCK_M, DEQ)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
    acc = acc * scale[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, ROUND_OUT, PDL)


@triton.jit
def _int4_gemv_load(w_rows, s_ptr, z_ptr, sz_rows, g, g_hi, n_mask, offs_j, HALF: tl.constexpr):
    """Packed slab [BN, GT, HALF] uint8 and its scales / zeros [BN, GT] for groups g [GT]."""
    g_mask = g < g_hi
    p = tl.load(w_rows + (g * HALF)[None, :, None] + offs_j[None, None, :],
                mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
    sz_mask = n_mask[:, None] & g_mask[None, :]
    s = tl.load(s_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0)
    z = tl.load(z_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0)
    return p, s, z


@triton.jit
def _int4_gemv_step(acc, p, s, z, x_ptr, g, g_mask, offs_c, pid_m, M, stride_xm, row_ids,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
                    DEQ: tl.constexpr, SPLIT_X: tl.constexpr):
    """acc [BM, BN] += s (sum_k q x - z sum_k x) per group of the slab, for every row of x."""
    HALF: tl.constexpr = GROUP // 2
    lo = _u4_to_f32(p & 0xF, DEQ)  # [BN, GT, HALF]  columns g * G + 2j
    hi = _u4_to_f32(p >> 4, DEQ)  # [BN, GT, HALF]  columns g * G + 2j + 1
    if not SPLIT_X:
        q = tl.interleave(lo, hi)  # [BN, GT, G]  column order
    s = s.to(tl.float32)
    z = z.to(tl.float32)
    for i in tl.static_range(BLOCK_M):
        m = pid_m * BLOCK_M + i
        xv = tl.load(x_ptr + m.to(tl.int64) * stride_xm + (g * GROUP)[:, None] + offs_c[None, :],
                     mask=g_mask[:, None] & (m < M), other=0.0).to(tl.float32)  # [GT, G]
        if SPLIT_X:
            xe, xo = tl.split(tl.reshape(xv, [GROUPS_PER_TILE, HALF, 2]))  # [GT, HALF] each
            d = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, GT]
        else:
            d = tl.sum(q * xv[None, :, :], axis=2)  # [BN, GT]  sum_k q x per group
        xs = tl.sum(xv, axis=1)  # [GT]  sum_k x per group
        c = tl.sum(s * (d - z * xs[None, :]), axis=1)  # [BN]
        acc += tl.where(row_ids == i, c[None, :], 0.0)
    return acc


@triton.jit
def int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_om, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
    DEQ: tl.constexpr, SPLIT_X: tl.constexpr, PREFETCH: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr, PDL: tl.constexpr,
):
    """Per group: sum_k (q - z) s x = s (sum_k q x - z sum_k x): one multiply-add per weight.

    SPLIT_X pairs the low / high nibbles with the even / odd columns of x (split in
    registers); otherwise the nibbles are interleaved back into column order. PREFETCH loads
    the next slab before reducing the current one (two slabs in flight per program).
    """
    if PDL:  # programmatic dependent launch (kernels/_pdl.py)
        gdc_wait()
    HALF: tl.constexpr = GROUP // 2  # packed bytes per group
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_t = tl.arange(0, GROUPS_PER_TILE)  # [GT]
    offs_j = tl.arange(0, HALF)  # [HALF]
    offs_c = tl.arange(0, GROUP)  # [G]
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 2)  # [BN, 1, 1]
    sz_rows = offs_n[:, None] * n_groups  # [BN, 1]
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, n_groups)
    row_ids = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PREFETCH:
        p, s, z = _int4_gemv_load(w_rows, s_ptr, z_ptr, sz_rows, g_lo + offs_t, g_hi, n_mask, offs_j, HALF)
        for g0 in range(g_lo, g_hi, GROUPS_PER_TILE):
            g = g0 + offs_t  # [GT]
            pn, sn, zn = _int4_gemv_load(w_rows, s_ptr, z_ptr, sz_rows, g + GROUPS_PER_TILE, g_hi, n_mask,
                                         offs_j, HALF)
            acc = _int4_gemv_step(acc, p, s, z, x_ptr, g, g < g_hi, offs_c, pid_m, M, stride_xm, row_ids,
                                  GROUP, BLOCK_M, GROUPS_PER_TILE, DEQ, SPLIT_X)
            p, s, z = pn, sn, zn
    else:
        for g0 in range(g_lo, g_hi, GROUPS_PER_TILE):
            g = g0 + offs_t  # [GT]
            p, s, z = _int4_gemv_load(w_rows, s_ptr, z_ptr, sz_rows, g, g_hi, n_mask, offs_j, HALF)
            acc = _int4_gemv_step(acc, p, s, z, x_ptr, g, g < g_hi, offs_c, pid_m, M, stride_xm, row_ids,
                                  GROUP, BLOCK_M, GROUPS_PER_TILE, DEQ, SPLIT_X)
    _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, ROUND_OUT, PDL)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row blocks share each weight column block in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def int8_dot_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DEQ: tl.constexpr, SWAP: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_OUT: tl.constexpr, PDL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """SWAP computes the transposed tile W x^T: the dequantized weights are the register
    operand A of the tensor-core instruction and x^T the shared-memory operand B."""
    if PDL:  # programmatic dependent launch (kernels/_pdl.py)
        gdc_wait()
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BN, BK]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K % BLOCK_K == 0 (checked by the launcher)
        xt = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0)  # [BN, BK] int8
        if UPCAST:  # interpreter, bf16: see quant_matmul._upcast
            xt = xt.to(tl.float32)
        # |q| <= 127 is exact in every activation dtype: the scale is applied after the dot.
        if DEQ == 0:
            wt = w.to(xt.dtype)
        else:
            wt = _i8_to_f32(w, DEQ).to(xt.dtype)
        if SWAP:
            acc = tl.dot(wt, tl.trans(xt), acc, input_precision=DOT_PREC)  # [BN, BM]
        else:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PREC)  # [BM, BN]
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN]
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
    acc = acc * scale[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, ROUND_OUT, PDL)


@triton.jit
def int4_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_om, k_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DEQ: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr,
    SPLIT_X: tl.constexpr, SWAP: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_W: tl.constexpr, ROUND_OUT: tl.constexpr, PDL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    FRAC_Z: tl.constexpr,
):
    """BLOCK_K divides GROUP, so each weight tile has one scale / zero per row. SWAP: as in
    int8_dot_kernel (the weights become the register operand, the tile is W x^T). DEQ 2 with
    FRAC_Z applies the zeros' fractional parts as a rank-1 correction; without FRAC_Z the
    caller promises integer zeros in 0..15, which needs neither the correction nor the row
    sums of x it takes (a third of the loop's instructions at M = 64)."""
    if PDL:  # programmatic dependent launch (kernels/_pdl.py)
        gdc_wait()
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    n_groups = K // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    offs_kh = tl.arange(0, HALF_K)  # [BK / 2]
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + offs_kh[None, :]  # [BN, BK / 2]
    sz_ptrs = offs_n * n_groups  # [BN]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)  # [BM, BK]
        p = tl.load(w_ptrs + k0 // 2, mask=n_mask[:, None], other=0)  # [BN, BK / 2] uint8
        g = k0 // GROUP
        s = tl.load(s_ptr + sz_ptrs + g, mask=n_mask, other=0.0)  # [BN]
        z = tl.load(z_ptr + sz_ptrs + g, mask=n_mask, other=0.0)  # [BN]
        if UPCAST:  # interpreter, bf16: see quant_matmul._upcast
            xt = xt.to(tl.float32)
        wdt = xt.dtype
        z = z.to(tl.float32)
        zi = tl.minimum(tl.maximum(tl.floor(z), 0.0), 15.0)  # zeros may be fractional (free offset)
        zb = (zi + MAGIC_BASE).to(wdt)  # exact: base + zi <= 1039
        sb = s.to(wdt)
        s = s.to(tl.float32)
        if DEQ == 2 and FRAC_Z:  # the fractional part of z as a rank-1 correction, fp32
            xsum = tl.sum(xt.to(tl.float32), axis=1)  # [BM]
            c = s * (z - zi)  # [BN]
            if SWAP:
                acc -= c[:, None] * xsum[None, :]
            else:
                acc -= xsum[:, None] * c[None, :]
        wl = _dequant_int4_tile(p & 0xF, z, s, zb, sb, wdt, DEQ, MAGIC_BITS, ROUND_W)  # [BN, BK/2] even k
        wh = _dequant_int4_tile(p >> 4, z, s, zb, sb, wdt, DEQ, MAGIC_BITS, ROUND_W)  # [BN, BK/2] odd k
        if SPLIT_X:
            xe, xo = tl.split(tl.reshape(xt, [BLOCK_M, HALF_K, 2]))  # [BM, BK / 2] each
            if SWAP:
                acc = tl.dot(wl, tl.trans(xe), acc, input_precision=DOT_PREC)  # [BN, BM]
                acc = tl.dot(wh, tl.trans(xo), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(xe, tl.trans(wl), acc, input_precision=DOT_PREC)  # [BM, BN]
                acc = tl.dot(xo, tl.trans(wh), acc, input_precision=DOT_PREC)
        else:
            w = tl.interleave(wl, wh)  # [BN, BK] column order
            if SWAP:
                acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PREC)  # [BN, BM]
            else:
                acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PREC)  # [BM, BN]
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN]
    _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, ROUND_OUT, PDL)


@triton.jit
def int8_dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr, ROUND_W: tl.constexpr,
):
    """out[n, k] = q[n, k] * s[n] in out's dtype (the "dequant" path's first pass)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BN, BK]
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)  # [BN]
    w = _i8_to_f32(tl.load(w_ptr + idx, mask=mask, other=0), DEQ) * s[:, None]
    if ROUND_W:
        w = round_bf16(w)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int4_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
    ROUND_W: tl.constexpr,
):
    """out[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G] in out's dtype."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_kh = tl.program_id(1) * HALF_K + tl.arange(0, HALF_K)  # [BK / 2] packed columns
    mask = (offs_n[:, None] < N) & (offs_kh[None, :] < K // 2)
    rows = offs_n.to(tl.int64)[:, None]
    p = tl.load(w_ptr + rows * (K // 2) + offs_kh[None, :], mask=mask, other=0)  # [BN, BK / 2]
    sz = offs_n[:, None] * (K // GROUP) + (2 * offs_kh // GROUP)[None, :]  # both nibbles share a group
    s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    wl = (_u4_to_f32(p & 0xF, DEQ) - z) * s
    wh = (_u4_to_f32(p >> 4, DEQ) - z) * s
    w = tl.interleave(wl, wh)  # [BN, BK] column order
    if ROUND_W:
        w = round_bf16(w)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    out_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + rows * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=out_mask)
