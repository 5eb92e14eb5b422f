"""Paged prefill attention: variable-length query chunks, causal over each request's whole
paged cache (cached prefix included), with flash-attention tiling (query block x KV block).

The cache layout, the contract and the torch references are those of
kernels/paged_attention.py (see its docstring), whose checks this module reuses. The key
loop runs in stages: tiles every row sees in full (no masks), and the tiles on the causal
diagonal or the window edge (masked). Short chunks pack a GQA group into one program.
`choose_prefill_config` picks the tiling from a table measured on an H100
(bench/scripts/gpu_prefill_attn.py). The grid depends only on static arguments, so a launch
can be captured in a CUDA graph; on CPU the kernel runs only under Triton's interpreter.
"""

from __future__ import annotations

import dataclasses

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels.paged_attention import (
    _INDEX_DTYPES,
    _LOG2E,
    _attend_ref,
    _check_common,
    _dot_precision,
    _gather_ref,
    _next_pow2,
    _upcast,
    check_out,
)
from turbollm.kernels.rope_cache import check_kv_scales

if triton is not None:

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

    # A mixed step passes the rows after its decodes (block_tables[nd:], seq_lens[nd:]), so these
    # pointers' 16-byte alignment and the table's width follow the step's decode count: not
    # specialized on, or a new combination would compile a variant in the middle of serving
    # (warm-up covers the rest; bench/scripts/gpu_offline_profile.py --log-jit lists misses).
    @triton.jit(do_not_specialize=["window", "group", "stride_btr"],
                do_not_specialize_on_alignment=["bt_ptr", "seq_lens_ptr", "qsl_ptr"])
    def _prefill_kernel(
        q_ptr, kv_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
        qk_scale, v_scale, window, group,
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

        out = acc * (v_scale / l_i)[:, None]  # every valid row saw at least its own key: l_i > 0
        o_offs = q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of variable-length query chunks over their paged caches -> [T, H, D].

    Query i of request r sits at position seq_lens[r] - qlen_r + i and sees every cached key
    up to it (inside the window). Contract: every qlen_r <= max_query_len and <= seq_lens[r].
    An FP8 cache holds k / k_scale and v / v_scale (kernels/paged_attention.py). `out`: write
    into this [T, H, D] tensor instead of a new one (paged_attention.check_out); it is returned.
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
                           sliding_window, config, k_scale=k_scale, v_scale=v_scale, out=out)


def _launch_prefill(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_query_len: int, sliding_window: int | None,
    config: PrefillConfig, *, k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_prefill_attention` with an explicit tiling (checked inputs; benchmarks call it)."""
    check_kv_scales(kv_cache, k_scale, v_scale)
    scale = scale * k_scale  # k = cache * k_scale, folded into the softmax scale
    _, heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    if group % config.pack or config.block_m % config.pack or config.block_m // config.pack < 1:
        raise ValueError(f"{config} does not fit GQA group {group}")
    out = check_out(out, q)  # [T, H, D]
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
        scale * _LOG2E, v_scale, sliding_window or 0, group,
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


def paged_prefill_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_query_len: int | None = None,
    sliding_window: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Reference for `paged_prefill_attention` (max_query_len is ignored)."""
    out = torch.zeros_like(q)  # [T, H, D]
    starts = query_start_loc.tolist()
    for r, n in enumerate(seq_lens.tolist()):
        a, b = starts[r], starts[r + 1]
        if b == a:
            continue
        k, v = _gather_ref(kv_cache, block_tables[r], n, k_scale, v_scale)
        qpos = torch.arange(n - (b - a), n, device=q.device)  # [qlen]
        out[a:b] = _attend_ref(q[a:b].float(), k, v, qpos, scale, sliding_window).to(q.dtype)
    return out


__all__ = ["PrefillConfig", "choose_prefill_config", "paged_prefill_attention", "paged_prefill_attention_ref"]
