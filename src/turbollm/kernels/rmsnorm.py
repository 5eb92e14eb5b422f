"""Fused residual add + RMSNorm: Triton kernel, launcher, torch reference.

Semantics are those of `layers/norm.py` RMSNorm.forward (HF's LlamaRMSNorm), step by step:

    s   = x + residual                      # in x's dtype (rounded once), or x when None
    h   = s.float() * rsqrt(mean(s.float()^2) + eps)
    out = weight * h.to(s.dtype)            # torch promotion: dtype = promote(weight, x)

The kernel reproduces each rounding (the sum, `h.to(dtype)`, and the product, which torch's
CUDA elementwise ops compute in fp32 and round once), so outputs differ from torch only by
the order of the fp32 sum of squares and the rsqrt approximation: about 1e-6 relative in
fp32, and now and then one bf16/fp16 ulp where h sits on a rounding boundary.

One program normalizes one row. Rows up to _MAX_SINGLE_BLOCK wide stay in registers
(one read, one or two writes); wider rows take two passes over global memory. The grid
depends only on T, so the launch can be captured in a CUDA graph. On CPU the kernel runs
only under Triton's interpreter (TRITON_INTERPRET=1 set before import); the reference runs
anywhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels._interpreter import emulate_bf16_rounding

if triton is not None:
    from turbollm.kernels._interpreter import round_bf16

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SINGLE_BLOCK = 8192  # widest row kept in registers (fp32: 32 KiB over 16 warps)

if triton is not None:

    @triton.jit
    def add_rmsnorm_row(
        x_row, res_row, new_row, w_ptr, offs, mask, n_cols, eps, in_dtype: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, ROUND_IN: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        """One row held in registers: stores x + residual at new_row (when HAS_RESIDUAL) and
        returns weight * h as fp32 [BLOCK_N] (ROUND_OUT: already on the bf16 grid), the caller
        casting it to the output dtype. Shared with kernels/fp8_fused.py, which quantizes it."""
        s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_RESIDUAL:
            r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
            s = s + r
            if ROUND_IN:
                s = round_bf16(s)
            s = s.to(in_dtype)  # torch adds in the input dtype
            tl.store(new_row + offs, s, mask=mask)
            s = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / n_cols + eps)
        h = s * rstd
        if ROUND_IN:
            h = round_bf16(h)
        h = h.to(in_dtype).to(tl.float32)  # h.to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = w * h
        if ROUND_OUT:
            y = round_bf16(y)
        return y

    @triton.jit
    def _fused_add_rmsnorm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
        n_cols, eps,
        stride_x, stride_res, stride_out, stride_new,  # row strides (last stride 1)
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
        ROUND_IN: tl.constexpr, ROUND_OUT: tl.constexpr,  # interpreter only: see _interpreter.py
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        res_row = res_ptr + row * stride_res
        new_row = new_res_ptr + row * stride_new
        out_row = out_ptr + row * stride_out
        in_dtype = x_ptr.dtype.element_ty
        offs = tl.arange(0, BLOCK_N)
        if SINGLE:
            mask = offs < n_cols
            y = add_rmsnorm_row(x_row, res_row, new_row, w_ptr, offs, mask, n_cols, eps, in_dtype,
                                HAS_RESIDUAL, ROUND_IN, ROUND_OUT)
            tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            # Pass 1: the sum (stored, then re-read from new_res) and the sum of squares.
            acc = tl.zeros([BLOCK_N], tl.float32)
            for c0 in range(0, n_cols, BLOCK_N):
                cols = c0 + offs
                mask = cols < n_cols
                s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
                    s = s + r
                    if ROUND_IN:
                        s = round_bf16(s)
                    s = s.to(in_dtype)
                    tl.store(new_row + cols, s, mask=mask)
                    s = s.to(tl.float32)
                acc += s * s
            rstd = tl.rsqrt(tl.sum(acc, 0) / n_cols + eps)
            # Pass 2: normalize, re-reading the sum written in pass 1. The barrier makes every
            # thread's pass-1 stores visible to the whole program whatever layouts the
            # compiler picks for the store and the load.
            src_row = x_row
            if HAS_RESIDUAL:
                tl.debug_barrier()
                src_row = new_row
            for c0 in range(0, n_cols, BLOCK_N):
                cols = c0 + offs
                mask = cols < n_cols
                s = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
                h = s * rstd
                if ROUND_IN:
                    h = round_bf16(h)
                h = h.to(in_dtype).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                y = w * h
                if ROUND_OUT:
                    y = round_bf16(y)
                tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 1024 else (8 if block_n <= 4096 else 16)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} is not {list(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x is on {device}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")


def fused_add_rmsnorm(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N] in x's dtype, or None
    weight: torch.Tensor,  # [N]
    eps: float,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual) like RMSNorm.forward; residual None: x.

    out has dtype promote(weight, x) (torch's rule for `weight * h`); new_residual has x's
    dtype and is `x` itself (no copy) when residual is None. block_n (a power of two) forces
    the column tile, for tests of the two-pass path; by default the whole row up to
    _MAX_SINGLE_BLOCK.
    """
    if triton is None:
        raise RuntimeError("fused_add_rmsnorm needs triton; use fused_add_rmsnorm_ref instead")
    if x.dim() != 2:
        raise ValueError(f"x shape {tuple(x.shape)} is not [T, N]")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    num_tokens, n_cols = x.shape
    if n_cols < 1:
        raise ValueError(f"x has {n_cols} columns; RMSNorm needs at least 1")
    _check_2d("x", x, (num_tokens, n_cols), x.device)
    if residual is not None:
        _check_2d("residual", residual, (num_tokens, n_cols), x.device)
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} is not [{n_cols}]")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} is not one of {_DTYPES}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x is on {x.device}")
    if weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"x is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two, got {block_n}")

    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)  # [T, N]
    new_residual = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [T, N]
    if num_tokens == 0:
        return out, new_residual
    full = _next_pow2(n_cols)
    block = block_n if block_n is not None else min(full, _MAX_SINGLE_BLOCK)
    single = block >= n_cols
    block = min(block, full)
    res = residual if residual is not None else x  # unused when HAS_RESIDUAL is False
    _fused_add_rmsnorm_kernel[(num_tokens,)](
        x, res, weight, out, new_residual,
        n_cols, eps,
        x.stride(0), res.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, SINGLE=single,
        ROUND_IN=emulate_bf16_rounding(x.dtype), ROUND_OUT=emulate_bf16_rounding(out.dtype),
        num_warps=_num_warps(block),
    )
    return out, new_residual


def fused_add_rmsnorm_ref(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `fused_add_rmsnorm`: RMSNorm.forward's torch code (block_n ignored)."""
    if residual is not None:
        x = x + residual  # [T, N]
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


__all__ = ["HAS_TRITON", "fused_add_rmsnorm", "fused_add_rmsnorm_ref"]
