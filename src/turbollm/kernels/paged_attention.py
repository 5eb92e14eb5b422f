"""Paged attention over turbollm's KV-cache layout: Triton kernels, launchers, torch references.

Cache layout (one tensor per layer, allocated by the worker, on the model's device):
`kv_cache` [2, num_blocks, block_size, KV, D]; k at [0], v at [1]. Token t of request r sits
in block `block_tables[r, t // block_size]`, slot `t % block_size`. `seq_lens[r]` counts the
tokens in the cache after this step, new ones included. GQA: query head h reads kv head
h // (H // KV). With a sliding window W, a query at position p sees keys in (p - W, p].

- `paged_decode_attention`: one query per request (position seq_len - 1). Flash-decoding:
  program (request, kv head, split) scores the whole GQA group [G, D] against one KV
  partition (each K/V tile is loaded once for G heads), keeps an fp32 online softmax and
  writes a partial output + log2-sum-exp; `_combine_kernel` merges the splits. The grid
  depends only on static arguments (B, KV, max_seq_len, num_splits), never on device
  values, so the launch can be captured in a CUDA graph.
- `paged_prefill_attention`: variable-length query chunks, causal over each request's whole
  cache (cached prefix included), flash-attention tiling (query block x KV block). The key
  loop runs in stages: tiles every row sees in full (no masks), and the tiles on the causal
  diagonal or the window edge (masked). Short chunks pack a GQA group into one program.
  `choose_prefill_config` picks the tiling from a table measured on an H100.

Contract not checked (it would need a host sync): every seq_lens[r] <= max_seq_len and
<= block_tables.shape[1] * block_size. Requests with seq_len 0 (CUDA-graph padding) get a
zero output. On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set
before this module is imported); the `_ref` functions run anywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_DECODE_BLOCK_N = 64  # keys per inner iteration of the decode kernel
_MIN_PARTITION = 256  # fewest keys worth a split of their own
_MAX_SPLITS = 64

if triton is not None:

    # Runtime ints that change from step to step are not specialized on (==1, %16), so a new
    # value never triggers a JIT compile in the middle of serving.
    @triton.jit(do_not_specialize=["window", "max_blocks", "num_splits"])
    def _decode_split_kernel(
        q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        qk_scale, window, max_blocks, num_splits,
        stride_qb, stride_qh,  # q [B, H, D] (last stride 1)
        stride_kv, stride_blk, stride_slot, stride_head,  # kv_cache (last stride 1)
        stride_btb,  # block_tables [B, max_blocks] (last stride 1)
        stride_ob, stride_oh,  # out [B, H, D]
        stride_pb, stride_ph, stride_ps,  # part_out [B, H, S, D]
        stride_lb, stride_lh,  # part_lse [B, H, S]
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g  # [G_PAD]
        q_mask = g_mask[:, None] & d_mask[None, :]
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
        )  # [G_PAD, D_PAD]
        if UPCAST:
            q = q.to(tl.float32)

        # The visible keys are [first_key, seq_len); split s takes a partition of them sized
        # from this request's own length (a multiple of BLOCK_N), so a short context under a
        # graph planned for max_seq_len spreads over few splits and the rest exit at once.
        # Every visited tile holds at least one visible key (the running max is finite).
        first_key = seq_len * 0
        if HAS_WINDOW:
            first_key = tl.maximum(seq_len - window, 0)
        span = seq_len - first_key
        partition = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
        start = first_key + split * partition
        end = tl.minimum(start + partition, seq_len)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        bt_row = bt_ptr + b * stride_btb
        for t0 in range(start, end, BLOCK_N):
            tok = t0 + offs_n  # [BLOCK_N] token positions
            valid = tok < end
            blk_idx = tok // BLOCK_SIZE
            blk = tl.load(bt_row + blk_idx, mask=valid & (blk_idx < max_blocks), other=0).to(tl.int64)
            base = blk * stride_blk + (tok % BLOCK_SIZE) * stride_slot + kvh * stride_head  # [BLOCK_N]
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
            v = tl.load(kv_ptr + stride_kv + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(q.dtype)  # an FP8 cache widens to q's dtype (a no-op otherwise)
            v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [G_PAD, N] log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # [G_PAD, N]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]  # [G_PAD, D_PAD]; zero for an empty range
        if DIRECT:
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:
            p_ptrs = part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
            tl.store(p_ptrs + offs_d[None, :], out, mask=q_mask)
            lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))  # [G_PAD]
            tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)

    @triton.jit
    def _combine_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, num_splits,
        stride_pb, stride_ph, stride_ps,  # part_out [B, H, S, D] (last stride 1)
        stride_lb, stride_lh,  # part_lse [B, H, S]
        stride_ob, stride_oh,  # out [B, H, D]
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        s_mask = offs_s < num_splits
        d_mask = offs_d < HEAD_DIM
        lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0
        w = tl.exp2(lse - m)  # [S_PAD]
        denom = tl.sum(w, 0)
        p_ptrs = part_out_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
        parts = tl.load(p_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S_PAD, D_PAD]
        out = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)  # [D_PAD]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _prefill_tiles(
        acc, l_i, m_i, q, kv_ptr, bt_row, head_off, qpos, lo, hi, window, qk_scale,
        stride_kv, stride_blk, stride_slot, offs_n, offs_d,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LOOP_STAGES: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Online-softmax update of (acc, l_i, m_i) over the keys [lo, hi), BLOCK_N at a time.

        CAUSAL: the tiles straddle the diagonal (mask key > query position, and keys >= hi,
        which are not loaded). WINDOW: mask keys at or before qpos - window. Neither: every
        key of every tile is visible to every row (no mask, no bounds checks on the loads).
        A masked score is -1e6, not -inf: a row that sees nothing in a tile gets a finite but
        fake maximum, and its fake terms are scaled by exp2(-1e6 - m) = 0 once it sees a key
        (every row sees its own position, so it always does).
        """
        for t0 in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
            tok = t0 + offs_n  # [BLOCK_N] key positions
            if CAUSAL:
                in_range = tok < hi
                blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=in_range, other=0)
            else:
                blk = tl.load(bt_row + tok // BLOCK_SIZE)
            base = blk.to(tl.int64) * stride_blk + (tok % BLOCK_SIZE) * stride_slot + head_off  # [BLOCK_N]
            ptrs = kv_ptr + base[:, None] + offs_d[None, :]  # [BLOCK_N, D_PAD]
            if CAUSAL:
                ld_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
                k = tl.load(ptrs, mask=ld_mask, other=0.0)
                v = tl.load(ptrs + stride_kv, mask=ld_mask, other=0.0)
            elif EVEN_D:
                k = tl.load(ptrs)
                v = tl.load(ptrs + stride_kv)
            else:
                ld_mask = (offs_d < HEAD_DIM)[None, :]
                k = tl.load(ptrs, mask=ld_mask, other=0.0)
                v = tl.load(ptrs + stride_kv, mask=ld_mask, other=0.0)
            k = k.to(q.dtype)  # an FP8 cache widens to q's dtype; fp32 with UPCAST; else a no-op
            v = v.to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [M, N]
            if CAUSAL or WINDOW:
                visible = tok[None, :] <= qpos[:, None]
                if WINDOW:
                    visible &= tok[None, :] > qpos[:, None] - window
                s = tl.where(visible, qk * qk_scale, -1.0e6)  # log2 units
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])  # [M, N]
            else:  # qk_scale >= 0: scale the row max, then one fused multiply-add per score
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])  # [M, N]
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["window", "group"])
    def _prefill_kernel(
        q_ptr, kv_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
        qk_scale, window, group,
        stride_qt, stride_qh,  # q [T, H, D] (last stride 1)
        stride_kv, stride_blk, stride_slot, stride_head,  # kv_cache (last stride 1)
        stride_btr,  # block_tables [R, max_blocks]
        stride_ot, stride_oh,  # out [T, H, D]
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr, M_FASTEST: tl.constexpr,
        HAS_WINDOW: tl.constexpr, LOOP_STAGES: tl.constexpr, DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Program (query block, request, head pack): BLOCK_M rows = BLOCK_M // PACK query
        # tokens x PACK query heads that share one kv head (row i: token i // PACK, head
        # i % PACK of the pack), so each K/V tile load serves PACK heads. Query blocks are
        # numbered from the end: the longest (latest) blocks are launched first.
        if M_FASTEST:  # grid (query blocks, head packs, requests)
            pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
            hp = tl.program_id(1)
            r = tl.program_id(2)
        else:  # grid (head packs, requests, query blocks)
            hp = tl.program_id(0)
            r = tl.program_id(1)
            pid_m = tl.num_programs(2) - 1 - tl.program_id(2)
        q_start = tl.load(qsl_ptr + r).to(tl.int32)
        qlen = tl.load(qsl_ptr + r + 1).to(tl.int32) - q_start
        m0 = pid_m * (BLOCK_M // PACK)
        if m0 >= qlen:
            return
        seq_len = tl.load(seq_lens_ptr + r).to(tl.int32)
        offs_r = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        row_tok = m0 + offs_r // PACK  # [BLOCK_M] query index in the chunk
        row_head = hp * PACK + offs_r % PACK  # [BLOCK_M] query head
        kvh = (hp * PACK) // group
        first_q = seq_len - qlen + m0  # position of the block's first query
        qpos = first_q + offs_r // PACK  # [BLOCK_M] absolute positions
        q_mask = (row_tok < qlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_rows = (q_start + row_tok).to(tl.int64)
        q_offs = q_rows[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, D_PAD]
        if UPCAST:
            q = q.to(tl.float32)

        # Keys [0, diag) are visible to every row; [diag, hi) straddle the diagonal. With a
        # window, keys [lo, full) are cut by it for some rows and [full, diag) for none.
        hi = tl.minimum(first_q + BLOCK_M // PACK, seq_len)  # one past the last key any row sees
        diag = (first_q + 1) // BLOCK_N * BLOCK_N
        full = first_q * 0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        bt_row = bt_ptr + r * stride_btr
        head_off = kvh * stride_head
        if HAS_WINDOW:
            lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
            full = tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N
            full = tl.minimum(tl.maximum(full, lo), diag)
            acc, l_i, m_i = _prefill_tiles(
                acc, l_i, m_i, q, kv_ptr, bt_row, head_off, qpos, lo, full, window, qk_scale,
                stride_kv, stride_blk, stride_slot, offs_n, offs_d,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, EVEN_D, False, True, LOOP_STAGES, DOT_PREC, UPCAST,
            )
        acc, l_i, m_i = _prefill_tiles(
            acc, l_i, m_i, q, kv_ptr, bt_row, head_off, qpos, full, diag, window, qk_scale,
            stride_kv, stride_blk, stride_slot, offs_n, offs_d,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, EVEN_D, False, False, LOOP_STAGES, DOT_PREC, UPCAST,
        )
        acc, l_i, m_i = _prefill_tiles(
            acc, l_i, m_i, q, kv_ptr, bt_row, head_off, qpos, diag, hi, window, qk_scale,
            stride_kv, stride_blk, stride_slot, offs_n, offs_d,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_WINDOW, LOOP_STAGES, DOT_PREC, UPCAST,
        )

        out = acc / l_i[:, None]  # every valid row saw at least its own key: l_i > 0
        o_offs = q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (the references are exact fp32).
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 dot operands as their raw uint16 bits (Triton 3.6):
    there, and only there, the kernels upcast k, v, q and p to fp32 before tl.dot."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # the interpreter: pretend an H100 so tests exercise the same heuristic


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """Splits of the KV length so batch x kv_heads x splits programs fill ~2 waves of SMs,
    with at least _MIN_PARTITION keys per split (static arguments only: graph-safe)."""
    base = max(1, batch * num_kv_heads)
    want = -(-2 * num_sms // base)
    most = max(1, -(-max_seq_len // _MIN_PARTITION))
    return max(1, min(want, most, _MAX_SPLITS))


def _check_common(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    num_reqs: int, max_len: int, sliding_window: int | None, max_len_name: str,
) -> None:
    if triton is None:
        raise RuntimeError("paged attention kernels need triton; use the *_ref functions instead")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not one of {_DTYPES}")
    if kv_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} is neither q's ({q.dtype}) nor float8_e4m3fn")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} is not [2, blocks, block_size, KV, D]")
    _, _, _, kv_heads, head_dim = kv_cache.shape
    heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} differs from kv_cache head_dim {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"block_tables shape {tuple(block_tables.shape)} is not [{num_reqs}, max_blocks]")
    if seq_lens.shape != (num_reqs,):
        raise ValueError(f"seq_lens shape {tuple(seq_lens.shape)} is not [{num_reqs}]")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not int32 or int64")
    for name, t in (("kv_cache", kv_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"q is on {q.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import"
        )
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, kv_cache and block_tables need a contiguous last dimension")
    if max_len < 1:
        raise ValueError(f"{max_len_name} must be >= 1, got {max_len}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [B] int32/int64, query at position seq_len - 1
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per request over its paged cache -> [B, H, D] in q's dtype."""
    if q.dim() != 3:
        raise ValueError(f"q shape {tuple(q.shape)} is not [B, H, D]")
    batch, heads, head_dim = q.shape
    _check_common(q, kv_cache, block_tables, seq_lens, batch, max_seq_len, sliding_window, "max_seq_len")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)  # [B, H, D]
    if batch == 0:
        return out
    # A query sees at most `span` keys: the window bounds the work per request.
    span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, span, _device_sms(q.device))
    partition = -(-span // num_splits)
    partition = -(-partition // _DECODE_BLOCK_N) * _DECODE_BLOCK_N  # multiple of BLOCK_N
    num_splits = -(-span // partition)  # drop splits that would start past the span
    # The kernel re-derives each request's partition from its own length and num_splits.
    direct = num_splits == 1
    if direct:
        part_out = out  # unused
        part_lse = out
        pstrides, lstrides = (0, 0, 0), (0, 0)
    else:
        part_out = torch.empty(batch, heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
        pstrides, lstrides = part_out.stride()[:3], part_lse.stride()[:2]
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * _LOG2E, sliding_window or 0, block_tables.shape[1], num_splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *pstrides, *lstrides,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, _next_pow2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=_DECODE_BLOCK_N,
        DIRECT=direct, HAS_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=4,
    )
    if not direct:
        _combine_kernel[(batch, heads)](
            part_out, part_lse, out, num_splits,
            *pstrides, *lstrides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=_next_pow2(head_dim), SPLITS_PAD=_next_pow2(num_splits),
            num_warps=4,
        )
    return out


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tiling of `_prefill_kernel`; `choose_prefill_config` picks one per call."""

    block_m: int  # query rows per program: block_m // pack tokens x pack heads
    block_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads
    pack: int = 1  # query heads of one kv head per program (divides the GQA group)
    m_fastest: bool = False  # grid order: all query blocks of a head first (else all heads first)
    loop_stages: bool = False  # pipeline every load of the key loops (block ids too), not only K/V


# Measured on an H100 (bench/scripts/gpu_prefill_attn.py, bench/results/prefill-attn-h100-*.json).
# 2-byte dtypes, by head-dim bucket. Chunks of at least _PREFILL_LONG_QLEN tokens: (block_m,
# block_n, num_warps, num_stages, largest GQA pack), one 128-row tile per SM, compute-bound.
# Shorter chunks: smaller tiles. Query blocks of a head are launched together (m_fastest: the
# blocks of a head, and its GQA siblings, read the same K/V while it is in L2).
_PREFILL_LONG = {64: (64, 64, 4, 3, 1), 128: (128, 128, 8, 3, 2), 256: (64, 64, 4, 2, 1)}
_PREFILL_SHORT = {64: (64, 64, 4, 3), 128: (64, 64, 4, 4), 256: (64, 32, 4, 2)}
_PREFILL_LONG_QLEN = 2048
# Chunks up to this long are decode-like (speculative verification, short appends to a long
# cache) and memory-bound: one program covers the whole chunk for a packed GQA group, so each
# K/V tile is loaded once for all its query heads.
_PREFILL_PACK_MAX_QLEN = 16


def _pow2_factor(n: int) -> int:
    return n & -n


def choose_prefill_config(
    dtype: torch.dtype, head_dim: int, group: int, max_query_len: int, on_gpu: bool = True
) -> PrefillConfig:
    """The tiling for a prefill call (static arguments only: no autotuning, graph-safe)."""
    if not on_gpu:  # the interpreter: small tiles keep the CPU tests fast
        pack = min(_pow2_factor(group), 4)
        block_m = 16 if max_query_len * pack <= 16 else 32
        return PrefillConfig(block_m, 16, 4, 1, pack)
    wide = dtype == torch.float32 or head_dim > 128  # bigger tiles would overflow shared memory
    if max_query_len <= _PREFILL_PACK_MAX_QLEN:
        pack = min(_pow2_factor(group), 8)
        block_m = min(64, max(16, _next_pow2(max_query_len) * pack))
        return PrefillConfig(block_m, 32 if wide else 128, 4, 2, pack)
    if dtype == torch.float32:
        return PrefillConfig(32, 32, 4, 2, m_fastest=True)
    bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    if max_query_len >= _PREFILL_LONG_QLEN:
        block_m, block_n, warps, stages, max_pack = _PREFILL_LONG[bucket]
        pack = min(_pow2_factor(group), max_pack)
        return PrefillConfig(block_m, block_n, warps, stages, pack, m_fastest=True)
    block_m, block_n, warps, stages = _PREFILL_SHORT[bucket]
    return PrefillConfig(block_m, block_n, warps, stages, m_fastest=True)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
    block_tables: torch.Tensor,  # [R, max_blocks] int32/int64
    query_start_loc: torch.Tensor,  # [R + 1] cumulative query counts, starting at 0
    seq_lens: torch.Tensor,  # [R] tokens in cache after this step
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of variable-length query chunks over their paged caches -> [T, H, D].

    Query i of request r sits at position seq_lens[r] - qlen_r + i and sees every cached key
    up to it (inside the window). Contract: every qlen_r <= max_query_len and <= seq_lens[r].
    """
    if q.dim() != 3:
        raise ValueError(f"q shape {tuple(q.shape)} is not [T, H, D]")
    num_reqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_common(q, kv_cache, block_tables, seq_lens, num_reqs, max_query_len, sliding_window,
                  "max_query_len")
    if query_start_loc.shape != (num_reqs + 1,) or query_start_loc.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} {query_start_loc.dtype} is not [{num_reqs + 1}] int"
        )
    if query_start_loc.device != q.device:
        raise ValueError(f"query_start_loc is on {query_start_loc.device}, q is on {q.device}")
    group = q.shape[1] // kv_cache.shape[3]
    config = choose_prefill_config(q.dtype, q.shape[2], group, max_query_len, on_gpu=q.is_cuda)
    return _launch_prefill(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len,
                           sliding_window, config)


def _launch_prefill(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_query_len: int, sliding_window: int | None,
    config: PrefillConfig,
) -> torch.Tensor:
    """`paged_prefill_attention` with an explicit tiling (checked inputs; benchmarks call it)."""
    _, heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    if group % config.pack or config.block_m % config.pack or config.block_m // config.pack < 1:
        raise ValueError(f"{config} does not fit GQA group {group}")
    out = torch.empty_like(q)  # [T, H, D]
    num_reqs = seq_lens.shape[0]
    if q.shape[0] == 0 or num_reqs == 0:
        return out
    if scale < 0:  # the kernel scales row maxima, which needs a non-negative scale
        q, scale = -q, -scale
    m_blocks = triton.cdiv(max_query_len, config.block_m // config.pack)
    packs = heads // config.pack
    grid = (m_blocks, packs, num_reqs) if config.m_fastest else (packs, num_reqs, m_blocks)
    head_dim_pad = max(16, _next_pow2(head_dim))
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out,
        scale * _LOG2E, sliding_window or 0, group,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, EVEN_D=head_dim == head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, PACK=config.pack,
        M_FASTEST=config.m_fastest, HAS_WINDOW=sliding_window is not None,
        LOOP_STAGES=config.num_stages if config.loop_stages else None,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------
# References: plain loops and gathers, fp32 math, the semantics the kernels must match.


def _gather_ref(kv_cache: torch.Tensor, table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [length, KV, D] in fp32 for one request."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(length, device=kv_cache.device)  # [L]
    blocks = table_row.long()[pos // block_size]  # [L]
    slots = pos % block_size  # [L]
    return kv_cache[0, blocks, slots].float(), kv_cache[1, blocks, slots].float()


def _attend_ref(
    q: torch.Tensor,  # [n, H, D] fp32, positions qpos
    k: torch.Tensor,  # [L, KV, D] fp32
    v: torch.Tensor,  # [L, KV, D] fp32
    qpos: torch.Tensor,  # [n]
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.repeat_interleave(group, dim=1)
    kpos = torch.arange(k.shape[0], device=q.device)  # [L]
    visible = kpos[None, :] <= qpos[:, None]  # [n, L]
    if sliding_window is not None:
        visible &= kpos[None, :] > qpos[:, None] - sliding_window
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale  # [H, n, L]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v)  # [n, H, D]


def paged_decode_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, max_seq_len: int | None = None, sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Reference for `paged_decode_attention` (max_seq_len and num_splits are ignored)."""
    out = torch.zeros_like(q)  # [B, H, D]
    for r, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        k, v = _gather_ref(kv_cache, block_tables[r], n)
        qpos = torch.tensor([n - 1], device=q.device)
        out[r] = _attend_ref(q[r : r + 1].float(), k, v, qpos, scale, sliding_window)[0].to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_query_len: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference for `paged_prefill_attention` (max_query_len is ignored)."""
    out = torch.zeros_like(q)  # [T, H, D]
    starts = query_start_loc.tolist()
    for r, n in enumerate(seq_lens.tolist()):
        a, b = starts[r], starts[r + 1]
        if b == a:
            continue
        k, v = _gather_ref(kv_cache, block_tables[r], n)
        qpos = torch.arange(n - (b - a), n, device=q.device)  # [qlen]
        out[a:b] = _attend_ref(q[a:b].float(), k, v, qpos, scale, sliding_window).to(q.dtype)
    return out


__all__ = [
    "choose_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
]
