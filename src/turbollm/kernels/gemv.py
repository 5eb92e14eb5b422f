"""Matrix-vector product for batch-1 decode (y = x W^T, one row of x): Triton kernel, launchers,
torch references.

At batch 1 a decode step is a stream of weight reads. On an H100, cuBLAS's M = 1 kernels for
the MLP and LM-head shapes of a 7B model stream ~2.5-2.7 TB/s; this kernel reaches ~2.9-3.0
TB/s on them and ~4 TB/s-equivalent on 4096 x 4096 (L2-resident between replays) — about
0.35 ms of a 5.5 ms Llama-2-7B step (bench/scripts/gpu_gemv.py, results in
docs/performance.md). For two or more rows cuBLAS is faster; callers use it there.

    program (n, s): rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W, split s of K in BLOCK_K tiles,
    fp32 accumulator

With more than one split of K (`gemv_config`), a second tiny kernel adds the fp32 partial
sums and rounds once. The grid depends only on shapes, so launches can be
captured in CUDA graphs. Runs on CPU only under the interpreter.

The input row can be produced by a fused prologue instead of a separate kernel (at batch 1
each of those is a launch and a round trip through memory for a few KiB):

- `gemv_rmsnorm`: the residual add + RMSNorm of kernels/rmsnorm.py. Every program first sums
  the squares of the whole row (it sits in L2), then normalizes each K tile as it goes, with
  the same roundings as `fused_add_rmsnorm`; the programs of row tile 0 write the new
  residual.
- `gemv_silu_mul`: SwiGLU of kernels/activation.py (fp32 math, one rounding) on each K tile
  of the merged gate/up row.

The weight may also be weight-only quantized (`QuantWeight`, the storage of
kernels/quant_matmul.py), dequantized in registers: int8 rows are scaled once at the end;
int4 tiles hold whole groups, and each group folds its affine into the reduction,
s (sum_k q x - z sum_k x), with the low / high nibbles of a byte against the even / odd
columns of x. So batch-1 decode of a quantized model gets the same fused prologues. An int4
tile is loaded as [BLOCK_N, BLOCK_K / 2] bytes, which puts a warp's threads along K and
repeats rows within a thread (each x value serves several rows), and on GPUs converted by the
"packed" inline-PTX path of kernels/_quant_matmul_kernels.py (~1.5 integer operations a
weight instead of an I2F).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels import quant_matmul
from turbollm.kernels._interpreter import emulate_bf16_rounding
from turbollm.kernels._pdl import pdl_kwargs
from turbollm.kernels.activation import silu_and_mul_ref
from turbollm.kernels.rmsnorm import fused_add_rmsnorm_ref

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from turbollm.kernels._interpreter import round_bf16
    from turbollm.kernels._quant_matmul_kernels import _i8_to_f32, _u4_pairs_packed, _u4_to_f32

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPLIT_K_FROM = 8192  # K from which a ragged one may be split over two programs (gemv_config)
_INT8_WIDE_N = 16384  # int8: wider weights (Llama-2-7B gate_up 22016) take 8 x 1024 tiles (_quant_config)
_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2  # input prologues
_DENSE, _INT8, _INT4 = 0, 1, 2  # weight formats (QuantWeight)
_PACKED = 3  # the "packed" dequantization (inline PTX, GPU only): kernels/_quant_matmul_kernels.py

if triton is not None:

    @triton.jit
    def _x_cols(
        x_ptr, res_ptr, nw_ptr, new_res_ptr, ks, kmask, K, rstd, write_res,
        PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND: tl.constexpr,
    ):
        """The input row at columns ks (any shape) in fp32, computed by the prologue."""
        in_dtype = x_ptr.dtype.element_ty
        if PROLOGUE == 0:
            x = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        elif PROLOGUE == 1:
            s = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s = s + tl.load(res_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                if ROUND:
                    s = round_bf16(s)
                s = s.to(in_dtype)
                tl.store(new_res_ptr + ks, s, mask=kmask & write_res)
                s = s.to(tl.float32)
            h = s * rstd
            if ROUND:
                h = round_bf16(h)
            h = h.to(in_dtype).to(tl.float32)  # h.to(x.dtype)
            x = tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32) * h
            if ROUND:
                x = round_bf16(x)
            x = x.to(in_dtype).to(tl.float32)  # weight * h, rounded like torch
        else:  # SwiGLU on the merged [gate | up] row of width 2K
            gate = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + ks, mask=kmask, other=0.0).to(tl.float32)
            x = gate / (1.0 + tl.exp(-gate)) * up
            if ROUND:
                x = round_bf16(x)
            x = x.to(in_dtype).to(tl.float32)
        return x

    @triton.jit
    def _w_tile(w_rows, k0, k_hi, rmask, offs_w, WFMT: tl.constexpr):
        """The weight tile at columns [k0, k0 + BLOCK_K): [BN, BLOCK_K] (int4: [BN, BLOCK_K // 2]
        bytes), 0 outside the rows and the split."""
        if WFMT == 2:
            cols = k0 // 2 + offs_w
            return tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols < k_hi // 2)[None, :], other=0)
        else:
            cols = k0 + offs_w
            return tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols < k_hi)[None, :], other=0)

    @triton.jit
    def _tile_step(
        acc, w, k0, k_hi, rows, rmask, offs_k, x_ptr, res_ptr, nw_ptr, new_res_ptr, s_ptr, z_ptr, K, rstd,
        write_res, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND: tl.constexpr, WFMT: tl.constexpr,
        GROUP: tl.constexpr, DEQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """acc [BN] plus the weight tile w (from _w_tile) at columns [k0, k0 + BLOCK_K) times the
        input row there."""
        ks = k0 + offs_k  # [BLOCK_K]
        x = _x_cols(x_ptr, res_ptr, nw_ptr, new_res_ptr, ks, ks < k_hi, K, rstd, write_res,
                    PROLOGUE, HAS_RESIDUAL, ROUND)  # [BLOCK_K]
        if WFMT == 2:  # int4: [BN, BLOCK_K // 2] bytes, then [BN, groups of the tile, bytes of a group]
            HALF: tl.constexpr = GROUP // 2
            GT: tl.constexpr = BLOCK_K // GROUP
            HB: tl.constexpr = BLOCK_K // 2
            g = k0 // GROUP + tl.arange(0, GT)  # [GT] groups of this tile
            sz_rows = rows[:, None] * (K // GROUP)  # [BN, 1]
            sz_mask = rmask[:, None] & (g < k_hi // GROUP)[None, :]
            sc = tl.load(s_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)  # [BN, GT]
            zp = tl.load(z_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x, [HB, 2]))  # [HB] even / odd columns
            if DEQ == 3:  # "packed": 128 + q, 2048 + q (kernels/_quant_matmul_kernels.py)
                lo, hi = _u4_pairs_packed(w)  # [BN, HB] low / high nibbles
                xb = tl.sum(tl.reshape(128.0 * xe + 2048.0 * xo, [GT, HALF]), axis=1)  # [GT] the biases' share
            else:
                lo = _u4_to_f32(w & 0xF, DEQ)
                hi = _u4_to_f32(w >> 4, DEQ)
                xb = tl.zeros([GT], tl.float32)
            # one reduction over both nibbles' products, so they chain into FMAs
            prod = tl.join(lo * xe[None, :], hi * xo[None, :])  # [BN, HB, 2]
            d = tl.sum(tl.reshape(prod, [BLOCK_N, GT, GROUP]), axis=2)  # [BN, GT] sum_k q x
            xs = tl.sum(tl.reshape(xe + xo, [GT, HALF]), axis=1)  # [GT] sum x of each group
            acc += tl.sum(sc * (d - xb[None, :] - zp * xs[None, :]), axis=1)  # s (sum q x - z sum x)
        else:
            if WFMT == 1:
                w = _i8_to_f32(w, DEQ)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, res_ptr, nw_ptr, new_res_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        N, K, k_per_split, stride_wn, stride_os, eps,
        PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        WFMT: tl.constexpr, GROUP: tl.constexpr, DEQ: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ROUND: tl.constexpr, ROUND_OUT: tl.constexpr,  # interpreter only: see _interpreter.py
        PDL: tl.constexpr,  # programmatic dependent launch (kernels/_pdl.py)
        EARLY: tl.constexpr,  # where the first weight tile is loaded: _EARLY_TILE
        TRIGGER_FIRST: tl.constexpr,  # PDL: let the next kernel launch at the start (_TRIGGER_FIRST)
    ):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
        rmask = rows < N
        offs_k = tl.arange(0, BLOCK_K)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        in_dtype = x_ptr.dtype.element_ty
        write_res = pid_n == 0  # the programs of row tile 0 write the new residual
        rstd = 0.0
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
        HB: tl.constexpr = BLOCK_K // 2 if WFMT == 2 else BLOCK_K  # weight columns a tile loads (int4: bytes)
        offs_w = tl.arange(0, HB)
        if EARLY == 2:  # weights are never written by a kernel: they may be read before the wait
            w_first = _w_tile(w_rows, k_lo, k_hi, rmask, offs_w, WFMT)
        if PDL:  # nothing else is read or written before the previous kernel has finished
            gdc_wait()
            if TRIGGER_FIRST:
                gdc_launch_dependents()
        if EARLY == 1:
            w_first = _w_tile(w_rows, k_lo, k_hi, rmask, offs_w, WFMT)
        if PROLOGUE == 1:  # RMSNorm: the whole row's sum of squares first
            sq = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                kmask = ks < K
                s = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    s = s + tl.load(res_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                    if ROUND:
                        s = round_bf16(s)
                    s = s.to(in_dtype).to(tl.float32)  # torch adds in the input dtype
                sq += s * s
            rstd = tl.rsqrt(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N], tl.float32)
        k_start = k_lo
        if EARLY > 0:  # the first tile, loaded ahead
            acc = _tile_step(acc, w_first, k_lo, k_hi, rows, rmask, offs_k, x_ptr, res_ptr, nw_ptr, new_res_ptr,
                             s_ptr, z_ptr, K, rstd, write_res, PROLOGUE, HAS_RESIDUAL, ROUND, WFMT, GROUP, DEQ,
                             BLOCK_N, BLOCK_K)
            k_start = k_lo + BLOCK_K
        for k0 in range(k_start, k_hi, BLOCK_K):
            w = _w_tile(w_rows, k0, k_hi, rmask, offs_w, WFMT)  # [BN, BK] (int4: [BN, BK // 2] bytes)
            acc = _tile_step(acc, w, k0, k_hi, rows, rmask, offs_k, x_ptr, res_ptr, nw_ptr, new_res_ptr,
                             s_ptr, z_ptr, K, rstd, write_res, PROLOGUE, HAS_RESIDUAL, ROUND, WFMT, GROUP, DEQ,
                             BLOCK_N, BLOCK_K)
        if WFMT == 1:  # int8: per-row scale
            acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rmask & (split == 0), other=0.0).to(tl.float32)
        if ROUND_OUT:
            acc = round_bf16(acc)
        if PDL and not TRIGGER_FIRST:  # every weight is read: the next kernel may launch and wait
            gdc_launch_dependents()
        tl.store(out_ptr + split * stride_os + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _sum_kernel(part_ptr, out_ptr, N, SPLITS: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr,
                    PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        s = tl.load(part_ptr + offs, mask=mask, other=0.0)
        for i in tl.static_range(1, SPLITS):
            s += tl.load(part_ptr + i * N + offs, mask=mask, other=0.0)
        if ROUND:
            s = round_bf16(s)
        tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class QuantWeight:
    """A weight-only quantized [N, K] matrix in the storage of kernels/quant_matmul.py:
    int8 (qweight int8 [N, K], scales [N]) or int4 (qweight uint8 [N, K // 2], scales and
    zeros [N, K // G], group_size G). The GEMV dequantizes it in registers."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = 0

    @property
    def fmt(self) -> int:
        return _INT4 if self.zeros is not None else _INT8

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.zeros is not None else 1)


Weight = torch.Tensor | QuantWeight
"""A dense [N, K] weight in x's dtype, or a QuantWeight."""


def _check(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, k: int) -> None:
    """x [1, width] with width k (or 2k for SwiGLU) against a weight of K = k columns."""
    if triton is None:
        raise RuntimeError("gemv needs triton; use the *_ref functions instead")
    if x.dim() != 2 or x.shape[0] != 1 or x.dtype not in _DTYPES or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} is not one contiguous row [1, K] of a float dtype")
    if isinstance(weight, QuantWeight):
        if weight.zeros is None:
            n = quant_matmul.check_int8_weight(weight.qweight, weight.scales, k, x.device)
        else:
            n = quant_matmul.check_int4_weight(weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                               k, x.device)
    else:
        if weight.dim() != 2 or weight.shape[1] != k:
            raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [1, K] and [N, K]")
        if weight.dtype != x.dtype or weight.stride(1) != 1:
            raise ValueError(f"weight {weight.dtype} must share x's dtype {x.dtype} and have a contiguous last dimension")
        n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1 or bias.dtype != x.dtype):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} is not a contiguous [{n}] in {x.dtype}")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"x is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")


Config = tuple[int, ...]
"""(BLOCK_N, BLOCK_K, K splits, warps, stages[, dequant]): `config` arguments force it
(tuning, tests). For quantized weights only: dequant picks how integers become floats (0
conversion instructions, 1 fp32 bit tricks, 3 "packed" with inline PTX, which the
interpreter runs as 1: kernels/_quant_matmul_kernels.py)."""


_EARLY_TILE = {_DENSE: (0, 0, 0), _INT8: (0, 0, 0), _INT4: (2, 2, 2)}
"""Where the first weight tile is loaded, by format and prologue (_PLAIN, _RMSNORM, _SILU_MUL):
0 in the loop; 1 after the PDL wait, before the RMSNorm pre-pass, which then runs while it is
on its way; 2 before the PDL wait (weights are never written by a kernel), so with
_TRIGGER_FIRST the load overlaps the previous kernel's tail. H100, Llama-2-7B batch-1
decode-graph replay (bench/scripts/gpu_pdl_early.py, docs/performance.md): int4 from 1 (the
earlier default) to 2 with trigger first 2,306 -> 2,241 us (-2.8%), to 2 without it +0.7%;
int8 2: +8% (and 1 on the RMSNorm prologue: +4%): the held tile costs occupancy; bf16: no gain
from 1 or 2. Prefetching the first one to four tiles into L2 instead (prefetch.global.L2, no
registers) was slower in every format."""
_TRIGGER_FIRST = {_DENSE: False, _INT8: True, _INT4: True}
"""PDL, by format: let the next kernel launch right after the wait instead of after the last
tile (same measurements: int4 -1.0% alone, int8 -0.6%, bf16 +0.2%)."""


def _quant_config(n: int, k: int, fmt: int) -> Config:
    """Tiling of a quantized weight (BLOCK_K counts weight columns, int4: two a byte), from
    bench/scripts/gpu_gemv_tune.py --fmt int4 / int8 on Llama-2-7B shapes (H100 sweeps).
    int4 takes the "packed" conversions (two H100 sweeps agreed): o-sized (N <= 4096) wide
    tiles of few rows, long K two splits, the rest 32 x 1024 on 4 warps. int8 keeps the fp32
    bit trick (earlier H100 and H200 sweeps); its widest shapes (gate_up) take 8 x 1024: in the
    batch-1 decode-graph replay 3,021 us against 3,126-3,151 with 16 x 512 (-3.4%,
    gpu_pdl_early.py --tiles, ninth session), while qkv kept 16 x 512 (8 x 512 and 16 x 512 on 8
    warps: +0.4% to +0.9%)."""
    if fmt == _INT4:
        if k >= _SPLIT_K_FROM:
            return 32, 2048, 2, 8, 3, _PACKED
        return (16, 2048, 1, 8, 3, _PACKED) if n <= 4096 else (32, 1024, 1, 4, 3, _PACKED)
    if k >= _SPLIT_K_FROM:
        return 8, 1024, 2, 4, 3, 1
    if n <= 4096:
        return 8, 2048, 1, 8, 3, 1
    return (16, 512, 1, 4, 3, 1) if n <= _INT8_WIDE_N else (8, 1024, 1, 4, 3, 1)


def gemv_config(n: int, k: int, fmt: int = _DENSE) -> Config:
    """The tiling for an [N, K] weight of format `fmt`: (BLOCK_N, BLOCK_K, K splits, warps,
    stages[, dequant]).

    Dense weights, from bench/scripts/gpu_gemv_tune.py on an H100 (Llama-2-7B and Llama-3-8B
    shapes, each through the launcher its projection uses, weights out of L2): 8 rows x 1024
    columns a program, one pass over K, wins on every shape (2.5-3.0 TB/s) except a long K
    that 1024 does not divide (Llama-2's 11008), where two K halves of 512-column tiles win.
    """
    if fmt != _DENSE:
        return _quant_config(n, k, fmt)
    if k >= _SPLIT_K_FROM and k % 1024:
        return 8, 512, 2, 4, 3
    return 8, 1024, 1, 8, 3


def _launch(
    prologue: int, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
    residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None, eps: float = 0.0,
    config: Config | None = None,
) -> torch.Tensor:
    quant = weight if isinstance(weight, QuantWeight) else None
    fmt = _DENSE if quant is None else quant.fmt
    w = weight if quant is None else quant.qweight
    n = w.shape[0]
    k = w.shape[1] if quant is None else quant.in_features
    block_n, block_k, split, warps, stages, *rest = config or gemv_config(n, k, fmt)
    dequant = rest[0] if rest else 1  # quantized weights only (Config)
    if dequant == _PACKED and triton.knobs.runtime.interpret:
        dequant = 1  # inline PTX needs a GPU; the interpreter runs "magic" instead
    group = quant.group_size if quant is not None and fmt == _INT4 else 1
    block_k = max(block_k, group)  # int4: whole groups a tile
    per_split = -(-k // split)  # columns, rounded up to whole tiles below
    k_per_split = -(-per_split // block_k) * block_k
    split = -(-k // k_per_split)  # no split left without columns
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)  # [1, N]
    part = out if split == 1 else torch.empty(split, n, device=x.device, dtype=torch.float32)  # [S, N]
    round_ = emulate_bf16_rounding(x.dtype)
    scales = quant.scales if quant is not None else x
    zeros = quant.zeros if quant is not None and quant.zeros is not None else x
    _gemv_kernel[(triton.cdiv(n, block_n), split)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        new_residual if new_residual is not None else x, w, scales, zeros, bias if bias is not None else x, part,
        n, k, k_per_split, w.stride(0), part.stride(0) if split > 1 else 0, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        WFMT=fmt, GROUP=group, DEQ=dequant,
        BLOCK_N=block_n, BLOCK_K=block_k, ROUND=round_, ROUND_OUT=round_ and split == 1, **pdl_kwargs(x.device),
        EARLY=_EARLY_TILE[fmt][prologue], TRIGGER_FIRST=_TRIGGER_FIRST[fmt], num_warps=warps, num_stages=stages,
    )
    if split > 1:
        _sum_kernel[(triton.cdiv(n, 1024),)](part, out, n, SPLITS=split, BLOCK=1024, ROUND=round_, num_warps=4,
                                             **pdl_kwargs(x.device))
    return out


def gemv(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype, fp32 accumulation."""
    _check(x, weight, bias, x.shape[-1])
    return _launch(_PLAIN, x, weight, bias, config=config)


def gemv_rmsnorm(
    x: torch.Tensor,  # [1, K]
    residual: torch.Tensor | None,  # [1, K] in x's dtype, or None
    norm_weight: torch.Tensor,  # [K] in x's dtype
    eps: float,
    weight: Weight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) @ weight^T (+ bias), x + residual): the pair that
    `fused_add_rmsnorm` followed by `gemv` gives; residual None means x itself (returned as is)."""
    k = x.shape[-1]
    _check(x, weight, bias, k)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1 or residual.device != x.device):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}")
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype or norm_weight.stride(0) != 1:
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} is not a contiguous [{k}] in {x.dtype}")
    new_residual = x if residual is None else torch.empty_like(x)  # [1, K]
    out = _launch(_RMSNORM, x, weight, bias, residual, norm_weight, new_residual, eps, config)
    return out, new_residual


def gemv_silu_mul(
    gate_up: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T (+ bias) for gate_up = [gate | up] of shape [1, 2K]: the
    product `silu_and_mul` followed by `gemv` gives."""
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} is not [1, 2 * K]")
    _check(gate_up, weight, bias, gate_up.shape[-1] // 2)
    return _launch(_SILU_MUL, gate_up, weight, bias, config=config)


def gemv_ref(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in fp32, rounded once to x's dtype (a quantized weight: the
    references of kernels/quant_matmul.py, which dequantize in fp32)."""
    if isinstance(weight, QuantWeight):
        if weight.zeros is None:
            return quant_matmul.int8_linear_ref(x, weight.qweight, weight.scales, bias)
        return quant_matmul.int4_linear_ref(x, weight.qweight, weight.scales, weight.zeros, weight.group_size, bias)
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gemv_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: Weight, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `gemv_rmsnorm`: the torch RMSNorm, then `gemv_ref`."""
    h, new_residual = fused_add_rmsnorm_ref(x, residual, norm_weight, eps)
    return gemv_ref(h, weight, bias), new_residual


def gemv_silu_mul_ref(gate_up: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `gemv_silu_mul`: `silu_and_mul_ref`, then `gemv_ref`."""
    return gemv_ref(silu_and_mul_ref(gate_up), weight, bias)
