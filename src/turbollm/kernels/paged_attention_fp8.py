"""Experimental decode attention over an FP8 KV cache: QK^T on Hopper's fp8 tensor cores.

Opt-in through `paged_attention._DecodeConfig(fp8_qk=True)` (the launcher, checks, references
and the other variant live in kernels/paged_attention.py, whose docstring gives the SASS
comparison); the engine does not use it until an H100 A/B (bench/scripts/
gpu_decode_fp8_variants.py) says so. bf16 q only: q is split into two e4m3 terms with one
power-of-two scale per head (`_e4m3_terms`: exact for a bf16 q but for elements under 1/512 of
their row's max), scores are [keys, heads] = k q^T on fp8 wgmma with k straight from shared
memory, and p v runs as fp16 wgmma on v^T read as words (`paged_attention._fp8_rows_f16`).

`_key_range` and `_tile_rows` repeat lines of `paged_attention._decode_split_kernel`, which keeps
them inline: as calls they reorder its sm_90 SASS (same math), and its default build stays
bit-identical to the measured one until an A/B promotes or deletes this variant.

Per-page TMA loads (tensor descriptors) were tried and not kept (cpu_decode_fp8_sass.py --tma):
with 16-token blocks a 128-key tile is 8 descriptor loads, which Triton 3.6 cannot land in one
operand buffer; joined in registers they cost 2,275 instructions a step (268 STS, 355 PRMT),
and one page a step (16 keys) 25 instructions a key against the shipped 10.5. Per-page TMA
needs Gluon (explicit shared-memory buffers and barriers).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turbollm.kernels._interpreter import round_e4m3
from turbollm.kernels.paged_attention import _fp8_rows_f16, _write_split


@triton.jit(do_not_specialize=["window", "max_blocks", "num_splits"])
def _decode_split_kernel_fp8qk(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, window, max_blocks, num_splits,
    stride_qb, stride_qh, stride_kv, stride_blk, stride_slot, stride_head, stride_btb,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,  # as _decode_split_kernel
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
):
    """Experimental (_DecodeConfig.fp8_qk): `_decode_split_kernel` turned around so QK^T runs
    on Hopper's fp8 tensor cores. Scores are [keys, heads] = k q^T: keys are wgmma's M (64
    a warpgroup instruction; M = 16 heads would fall back to fp16 mma.sync), k is its A
    operand straight from shared memory (never in registers), and q its B operand as two
    e4m3 terms (_e4m3_terms). The output accumulates transposed, [D, heads] = v^T p, in fp16."""
    if PDL:
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # [G_PAD]
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    q_hi, q_lo, q_scale = _e4m3_terms(q.to(tl.float32), PTX)  # [G_PAD, D_PAD] e4m3 x2, [G_PAD]
    q_hi = tl.trans(q_hi)  # [D_PAD, G_PAD]: K-major, as fp8 wgmma wants its B operand
    q_lo = tl.trans(q_lo)
    qk = qk_scale * q_scale  # [G_PAD] log2 units per e4m3 product
    start, end = _key_range(seq_len, window, num_splits, split, BLOCK_N, HAS_WINDOW)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD, GROUP_PAD], tl.float32)  # transposed output
    bt_row = bt_ptr + b * stride_btb
    for t0 in range(start, end, BLOCK_N):
        valid, base = _tile_rows(bt_row, t0 + tl.arange(0, BLOCK_N), end, max_blocks, kvh, stride_blk,
                                 stride_slot, stride_head, BLOCK_SIZE)  # [BLOCK_N] each
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                    other=0.0)  # [N, D_PAD] e4m3
        v = _fp8_rows_f16(kv_ptr + stride_kv + base, valid, HEAD_DIM, HEAD_DIM_PAD, PTX)  # [N, D_PAD]
        # Two accumulators: Hopper's fp8 wgmma adds into its accumulator at ~14 bits, so lo's
        # products, ~2^-4 of hi's, would be truncated if lo accumulated onto hi's sums.
        s = (tl.dot(k, q_hi) + tl.dot(k, q_lo)) * qk[None, :]  # [N, G_PAD] log2 units
        s = tl.where(valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])  # [N, G_PAD]
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(tl.float16))  # [D_PAD, G_PAD]
        m_i = m_new

    if PDL:
        gdc_launch_dependents()
    _write_split(tl.trans(acc), m_i, l_i, v_scale, b, heads, split, g_mask, q_mask, offs_d, out_ptr,
                 part_out_ptr, part_lse_ptr, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                 stride_lb, stride_lh, DIRECT)

@triton.jit
def _key_range(seq_len, window, num_splits, split, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """This split's keys [start, end) (_decode_split_kernel's comment says how they are cut)."""
    first_key = seq_len * 0
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)
    span = seq_len - first_key
    partition = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = first_key + split * partition
    end = tl.minimum(start + partition, seq_len)
    return start, end

@triton.jit
def _tile_rows(bt_row, tok, end, max_blocks, kvh, stride_blk, stride_slot, stride_head,
               BLOCK_SIZE: tl.constexpr):
    """Keys `tok` ([N] positions): which are visible (< end), and each one's k offset in the
    cache (int64: a cache may exceed 2^31 elements)."""
    valid = tok < end
    blk_idx = tok // BLOCK_SIZE
    blk = tl.load(bt_row + blk_idx, mask=valid & (blk_idx < max_blocks), other=0).to(tl.int64)
    base = blk * stride_blk + (tok % BLOCK_SIZE) * stride_slot + kvh * stride_head  # [BLOCK_N]
    return valid, base

@triton.jit
def _e4m3_terms(q, PTX: tl.constexpr):
    """q [G_PAD, D] fp32 -> (hi, lo, scale [G_PAD]) with q ~= scale * (hi + lo), hi and lo e4m3.
    scale = 2^(e - 7) for each row's amax in [2^e, 2^(e+1)), so |q / scale| < 256 <= 448 and
    the division is exact. A bf16 q has 8 significant bits, hi keeps 4 and lo the next 4, so
    the split is exact for every element >= amax / 512 of its row; smaller ones (where lo is
    subnormal) are off by at most amax * 2^-17."""
    amax = tl.max(tl.abs(q), 1)  # [G_PAD]
    expo = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 8)  # biased; >= 8: a zero row
    scale = ((expo - 7) << 23).to(tl.float32, bitcast=True)
    x = q * ((261 - expo) << 23).to(tl.float32, bitcast=True)[:, None]  # q / scale, exact
    if PTX:
        hi = x.to(tl.float8e4nv)  # cvt.rn.satfinite: round to nearest even
    else:  # the interpreter's fp32 -> e4m3 cast loses carries (_interpreter.py): round first
        hi = round_e4m3(x).to(tl.float8e4nv)
    r = x - hi.to(tl.float32)  # exact
    if not PTX:
        r = round_e4m3(r)
    return hi, r.to(tl.float8e4nv), scale
