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
- FP8 cache (float8_e4m3fn): it holds k / k_scale and v / v_scale (per-layer scales, see
  kernels/rope_cache.check_kv_scales). The kernels never dequantize it: k_scale is folded
  into the softmax scale and v_scale multiplies the normalized output; the references
  dequantize (cache * scale) and attend, which is the semantics.
- The prefill kernel (variable-length chunks over a cached prefix) lives in
  kernels/prefill_attention.py and shares this module's checks and references (which keep
  this file ~20 lines over the house's ~500).

- Decode over an FP8 cache: below _WORDS_MIN_PROGRAMS programs (request x kv head x split) v
  reaches its mma.sync operand byte by byte (sm_90: 1,344 instructions a 128-key step, 2
  programs an SM); from there on (V_WORDS) it is read as 32-bit words and widened by
  cvt.rn.f16x2.e4m3x2 (941 instructions, 3 programs an SM, bit-equal): on an H100 76-91% of
  the copy bandwidth against 73-81%, but slower at 512 programs (wave quantization).
  docs/performance.md (twelfth session) has the A/B and the deleted fp8-wgmma QK^T loop.
- Over an FP8 cache with GQA (_paged) and no window, tiles start at block boundaries and are
  addressed a block at a time (PAGED, kernels/_decode_tiles.paged_tile): 8-19% fewer
  instructions a step, the same output bit for bit. Elsewhere every key finds its own block.

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

from turbollm.kernels._pdl import pdl_kwargs
from turbollm.kernels.rope_cache import check_kv_scales

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_DECODE_BLOCK_N = 64  # keys per inner iteration of the decode kernel
_DECODE_BLOCK_N_FP8 = 128  # the same over an FP8 cache (the same bytes a tile; H100 sweep, docs/performance.md)
_MIN_PARTITION = 256  # fewest keys worth a split of their own
_WORDS_MIN_PROGRAMS = 1024  # an FP8 cache's decode reads v as words from this many programs on
_MAX_SPLITS = 64
_DECODE_WARPS = 4
_DECODE_STAGES: int | None = None  # None: Triton's default

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from turbollm.kernels._decode_tiles import fp8_rows_f16, online_step, paged_tile


    # Runtime ints that change from step to step are not specialized on (==1, %16), so a new
    # value never triggers a JIT compile in the middle of serving.
    @triton.jit(do_not_specialize=["window", "max_blocks", "num_splits"])
    def _decode_split_kernel(
        q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        qk_scale, v_scale, window, max_blocks, num_splits,
        stride_qb, stride_qh,  # q [B, H, D] (last stride 1)
        stride_kv, stride_blk, stride_slot, stride_head,  # kv_cache (last stride 1)
        stride_btb,  # block_tables [B, max_blocks] (last stride 1)
        stride_ob, stride_oh,  # out [B, H, D]
        stride_pb, stride_ph, stride_ps,  # part_out [B, H, S, D]
        stride_lb, stride_lh,  # part_lse [B, H, S]
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, F16_DOT: tl.constexpr,
        V_WORDS: tl.constexpr,  # an FP8 v read as 32-bit words (_use_words)
        PAGED: tl.constexpr,  # tiles addressed a block at a time (_DecodeConfig.paged)
        PTX: tl.constexpr,  # inline PTX allowed (False under the interpreter)
        PDL: tl.constexpr,
    ):
        if PDL:  # programmatic dependent launch (kernels/_pdl.py)
            gdc_wait()
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
        if F16_DOT:  # _f16_dot: fp16 operands, q clamped to fp16's range (exact inside it)
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

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
        if PAGED and not HAS_WINDOW and BLOCK_N % BLOCK_SIZE == 0:
            # Without a window start is a multiple of BLOCK_N, so every tile starts a block: its
            # keys' slots are the same in every tile and only the table entries change.
            for t0 in range(start, end, BLOCK_N):
                k, v, valid = paged_tile(kv_ptr, bt_row, t0, end, kvh, max_blocks, stride_kv, stride_blk,
                                         stride_slot, stride_head, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N,
                                         V_WORDS, PTX)
                m_i, l_i, acc = online_step(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PREC)
        else:
            for t0 in range(start, end, BLOCK_N):
                tok = t0 + offs_n  # [BLOCK_N] token positions
                valid = tok < end
                blk_idx = tok // BLOCK_SIZE
                blk = tl.load(bt_row + blk_idx, mask=valid & (blk_idx < max_blocks), other=0).to(tl.int64)
                base = blk * stride_blk + (tok % BLOCK_SIZE) * stride_slot + kvh * stride_head  # [BLOCK_N]
                kv_mask = valid[:, None] & d_mask[None, :]
                k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
                if V_WORDS:
                    v = fp8_rows_f16(kv_ptr + stride_kv + base, valid, HEAD_DIM, HEAD_DIM_PAD, PTX)
                else:
                    v = tl.load(kv_ptr + stride_kv + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                m_i, l_i, acc = online_step(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PREC)

        if PDL:
            gdc_launch_dependents()
        _write_split(acc, m_i, l_i, v_scale, b, heads, split, g_mask, q_mask, offs_d, out_ptr, part_out_ptr,
                     part_lse_ptr, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                     DIRECT)

    @triton.jit
    def _write_split(acc, m_i, l_i, v_scale, b, heads, split, g_mask, q_mask, offs_d, out_ptr, part_out_ptr,
                     part_lse_ptr, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                     DIRECT: tl.constexpr):
        """A split's normalized output [G_PAD, D_PAD] (straight into out with a single split) and
        its log2-sum-exp for _combine_kernel; zero output and -inf for an empty key range."""
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc * (v_scale / l_safe)[:, None]  # [G_PAD, D_PAD]; zero for an empty range
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
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
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

# ---------------------------------------------------------------------------------------------
# Launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (the references are exact fp32).
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 dot operands as their raw uint16 bits (Triton 3.6):
    there, and only there, the kernels upcast k, v, q and p to fp32 before tl.dot."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def _f16_dot(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """An FP8 cache read by a bf16 q: the decode kernel multiplies in fp16 instead. e4m3 -> fp16
    is exact and one instruction a pair, where e4m3 -> bf16 goes through fp32 (twice the loop's
    instructions: 46-68% of the copy bandwidth against ~100% for a bf16 cache on an H100,
    docs/performance.md). q keeps every bf16 value in fp16's normal range exactly (fp16 has
    more mantissa) and is clamped to +-65504; p in [0, 1] is rounded more finely than in bf16.
    The interpreter runs it too (its fp16 dot multiplies in fp32). The prefill kernel keeps bf16:
    compute-bound, it was 5-8% slower with fp16 dots (512-token prompts, H100)."""
    return kv_dtype == torch.float8_e4m3fn and q_dtype == torch.bfloat16


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


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """`out` if it can take the attention of q (q's shape, dtype and device, a contiguous last
    dimension), or a new tensor like q when it is None; ValueError naming the problem."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} is not like q {tuple(q.shape)} "
                         f"{q.dtype} on {q.device} with a contiguous last dimension")
    return out


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    """Private launch options of `paged_decode_attention` for tests and A/B benchmarks; None
    fields take the shipped choice."""

    fp8_words: bool | None = None  # FP8 cache: v as 32-bit words (V_WORDS); None: _use_words by the grid
    paged: bool | None = None  # tiles addressed a block at a time (PAGED); None: _paged
    block_n: int | None = None  # keys a step (a power of two >= 16); None: _DECODE_BLOCK_N(_FP8)
    num_warps: int | None = None  # None: _DECODE_WARPS
    num_stages: int | None = None  # None: _DECODE_STAGES


_SHIPPED = _DecodeConfig()


def _words_fit(kv_cache: torch.Tensor) -> bool:
    """An FP8 cache whose rows can be read as 4-byte words."""
    return (kv_cache.dtype == torch.float8_e4m3fn and kv_cache.data_ptr() % 4 == 0
            and not any(s % 4 for s in kv_cache.stride()[:-1]) and kv_cache.shape[-1] % 4 == 0)


def _use_words(config: _DecodeConfig, kv_cache: torch.Tensor, programs: int) -> bool:
    """Whether the decode loop reads v as words (module docstring): an FP8 cache that fits, from
    _WORDS_MIN_PROGRAMS programs on, unless the config forces it either way."""
    if config.fp8_words is not None:
        return config.fp8_words
    return programs >= _WORDS_MIN_PROGRAMS and _words_fit(kv_cache)


def _check_config(config: _DecodeConfig, kv_cache: torch.Tensor) -> None:
    """ValueError naming what `config` cannot run on."""
    if config.fp8_words:
        if kv_cache.dtype != torch.float8_e4m3fn:
            raise ValueError(f"_DecodeConfig.fp8_words reads a float8_e4m3fn cache, got {kv_cache.dtype}")
        if not _words_fit(kv_cache):
            raise ValueError("_DecodeConfig.fp8_words reads the cache as 32-bit words: it needs 4-byte "
                             f"aligned rows and head_dim % 4 == 0 (strides {kv_cache.stride()})")
    bn = config.block_n
    if bn is not None and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"_DecodeConfig.block_n must be a power of two >= 16, got {bn}")


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [B] int32/int64, query at position seq_len - 1
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    *,
    _config: _DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one new token per request over its paged cache -> [B, H, D] in q's dtype
    (an FP8 cache holds k / k_scale and v / v_scale). `out`: write into this [B, H, D] tensor
    (e.g. rows of a larger one) instead of a new one; it is returned. `_config`: private launch
    options (tests, benchmarks)."""
    if q.dim() != 3:
        raise ValueError(f"q shape {tuple(q.shape)} is not [B, H, D]")
    batch, heads, head_dim = q.shape
    _check_common(q, kv_cache, block_tables, seq_lens, batch, max_seq_len, sliding_window, "max_seq_len")
    check_kv_scales(kv_cache, k_scale, v_scale)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    config = _config or _SHIPPED
    _check_config(config, kv_cache)
    kv_heads = kv_cache.shape[3]
    out = check_out(out, q)  # [B, H, D]
    if batch == 0:
        return out
    # A query sees at most `span` keys: the window bounds the work per request.
    span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, span, _device_sms(q.device))
    partition = -(-span // num_splits)
    block_n = config.block_n or (_DECODE_BLOCK_N_FP8 if kv_cache.dtype == torch.float8_e4m3fn else _DECODE_BLOCK_N)
    partition = -(-partition // block_n) * block_n  # multiple of BLOCK_N
    num_splits = -(-span // partition)  # drop splits that would start past the span
    # The kernel re-derives each request's partition from its own length and num_splits.
    if num_splits == 1:
        part_out = part_lse = out  # unused
        pstrides, lstrides = (0, 0, 0), (0, 0)
    else:
        part_out = torch.empty(batch, heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
        pstrides, lstrides = part_out.stride()[:3], part_lse.stride()[:2]
    words = _use_words(config, kv_cache, batch * kv_heads * num_splits)
    _launch_split(q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * k_scale * _LOG2E,
                  v_scale, sliding_window, num_splits, pstrides, lstrides, block_n, config, words)
    if num_splits > 1:
        _combine_kernel[(batch, heads)](
            part_out, part_lse, out, num_splits,
            *pstrides, *lstrides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=_next_pow2(head_dim), SPLITS_PAD=_next_pow2(num_splits),
            num_warps=4, **pdl_kwargs(q.device),
        )
    return out


def _launch_split(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    out: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, qk_scale: float, v_scale: float,
    sliding_window: int | None, num_splits: int, pstrides: tuple[int, ...], lstrides: tuple[int, ...],
    block_n: int, config: _DecodeConfig, words: bool,
) -> None:
    """One launch of the split kernel over (request, kv head, split)."""
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    pdl = pdl_kwargs(q.device)
    kernel, const, options = _split_kernel(
        q.dtype, kv_cache.dtype, q.shape[1] // kv_heads, q.shape[2], block_size, block_n, num_splits == 1,
        sliding_window is not None, config, words, pdl["PDL"],
    )
    kernel[(q.shape[0], kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse,
        qk_scale, v_scale, sliding_window or 0, block_tables.shape[1], num_splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *pstrides, *lstrides,
        **const, **options, **{k: v for k, v in pdl.items() if k != "PDL"},
    )


def _paged(kv_dtype: torch.dtype, group: int) -> bool:
    """Whether the decode loop addresses its tiles a block at a time (PAGED) by default: over an
    FP8 cache with GQA. In offline runs on an H200 that made Llama-3-8B's decode attention 14%
    faster but Llama-2-7B's (MHA) 2% slower; over a bf16 cache it was 3-30% slower in the
    kernel table (docs/performance.md, thirteenth session)."""
    return kv_dtype == torch.float8_e4m3fn and group > 1


def _split_kernel(
    q_dtype: torch.dtype, kv_dtype: torch.dtype, group: int, head_dim: int, block_size: int, block_n: int,
    direct: bool, has_window: bool, config: _DecodeConfig, words: bool, pdl: bool,
) -> tuple[object, dict[str, object], dict[str, int]]:
    """(kernel, constexprs, num_warps / num_stages) of the split launch; `words`: V_WORDS
    (_use_words). bench/scripts/cpu_decode_fp8_sass.py compiles from these."""
    const: dict[str, object] = dict(
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, _next_pow2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        DIRECT=direct, HAS_WINDOW=has_window, PTX=not triton.knobs.runtime.interpret, PDL=pdl,
    )
    const.update(DOT_PREC=_dot_precision(q_dtype), UPCAST=_upcast(q_dtype),
                 F16_DOT=_f16_dot(q_dtype, kv_dtype), V_WORDS=words,
                 PAGED=_paged(kv_dtype, group) if config.paged is None else config.paged)
    options = {"num_warps": config.num_warps or _DECODE_WARPS}
    stages = _DECODE_STAGES if config.num_stages is None else config.num_stages
    if stages is not None:
        options["num_stages"] = stages
    return _decode_split_kernel, const, options


# ---------------------------------------------------------------------------------------------
# References: plain loops and gathers, fp32 math, the semantics the kernels must match.


def _gather_ref(
    kv_cache: torch.Tensor, table_row: torch.Tensor, length: int, k_scale: float = 1.0, v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [length, KV, D] in fp32 for one request, dequantized (cache * scale)."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(length, device=kv_cache.device)  # [L]
    blocks = table_row.long()[pos // block_size]  # [L]
    slots = pos % block_size  # [L]
    return kv_cache[0, blocks, slots].float() * k_scale, kv_cache[1, blocks, slots].float() * v_scale


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
    num_splits: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Reference for `paged_decode_attention` (max_seq_len and num_splits are ignored)."""
    out = torch.zeros_like(q)  # [B, H, D]
    for r, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        k, v = _gather_ref(kv_cache, block_tables[r], n, k_scale, v_scale)
        qpos = torch.tensor([n - 1], device=q.device)
        out[r] = _attend_ref(q[r : r + 1].float(), k, v, qpos, scale, sliding_window)[0].to(q.dtype)
    return out


__all__ = [
    "choose_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]
