"""Tile helpers of the decode kernel (kernels/paged_attention.py): how a tile of keys is read
from the paged cache and folded into the online softmax.

- `paged_tile`: k, v of BLOCK_N keys starting at a block boundary. Each key's slot, and so its
  row's offset from its block's start, is the same in every tile: a tile costs its table entries
  and one 64-bit multiply-add a key, where the per-key loop of the kernel also splits each
  position into a block and a slot (sm_90, Llama-3-8B over an FP8 cache: 941 -> 863
  instructions a 128-key step with v as words, 1,344 -> 1,089 without; docs/performance.md,
  thirteenth session).
- `fp8_rows_f16`: e4m3 rows read as 32-bit words and widened to fp16 by cvt.rn.f16x2.e4m3x2.
- `online_step`: one tile of the fp32 online softmax.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

if triton is not None:

    @triton.jit
    def online_step(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
        """One tile of the online softmax over keys k, v [N, D] (an FP8 cache widens to q's dtype:
        fp16 with F16_DOT, a no-op otherwise), leaving out the keys whose `valid` is False."""
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [G_PAD, N] log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return m_new, l_i, acc

    @triton.jit
    def paged_tile(kv_ptr, bt_row, t0, end, kvh, max_blocks, stride_kv, stride_blk, stride_slot, stride_head,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, V_WORDS: tl.constexpr, PTX: tl.constexpr):
        """(k, v, valid) of keys [t0, t0 + BLOCK_N), t0 a multiple of BLOCK_SIZE; keys from `end`
        on are masked (valid False, zeros)."""
        offs_n = tl.arange(0, BLOCK_N)
        valid = t0 + offs_n < end  # [N]
        bi = t0 // BLOCK_SIZE + offs_n // BLOCK_SIZE  # [N] table columns
        blk = tl.load(bt_row + bi, mask=valid & (bi < max_blocks), other=0)
        rows = blk.to(tl.int64) * stride_blk + ((offs_n % BLOCK_SIZE) * stride_slot + kvh * stride_head)  # [N]
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(kv_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)  # [N, D]
        if V_WORDS:
            v = fp8_rows_f16(kv_ptr + stride_kv + rows, valid, HEAD_DIM, HEAD_DIM_PAD, PTX)
        else:
            v = tl.load(kv_ptr + stride_kv + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        return k, v, valid

    @triton.jit
    def fp8_rows_f16(rows, valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PTX: tl.constexpr):
        """[N, D_PAD] fp16 (exact) of e4m3 rows (`rows`: [N] pointers to each key's first value),
        read as 32-bit words, one cvt.rn.f16x2.e4m3x2 a pair (a byte tile would be repacked
        byte by byte). Needs HEAD_DIM % 4 == 0 and 4-byte aligned rows (_words_fit)."""
        offs_w = tl.arange(0, HEAD_DIM_PAD // 4)
        words = rows.to(tl.pointer_type(tl.int32))  # [N]
        mask = valid[:, None] & (offs_w < HEAD_DIM // 4)[None, :]
        w = tl.load(words[:, None] + offs_w[None, :], mask=mask, other=0)  # [N, D_PAD / 4], bytes 0..3 little-endian
        if PTX:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; .reg .b32 x, y; mov.b32 {l, h}, $4; cvt.rn.f16x2.e4m3x2 x, l; "
                "cvt.rn.f16x2.e4m3x2 y, h; mov.b32 {$0, $1}, x; mov.b32 {$2, $3}, y; }",
                "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
        else:  # the interpreter: the same values through Triton's (exact) e4m3 -> fp16 cast
            b0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            b1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            b2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            b3 = ((w >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        # [N, D/4, 2, 2] indexed (word, i, j) holds byte 2 i + j: row-major it is [N, D] in order.
        return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [w.shape[0], HEAD_DIM_PAD])
