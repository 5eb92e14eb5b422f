"""RMSNorm and SwiGLU that write FP8 W8A8 activations directly: Triton kernels, launchers,
torch references.

An FP8 W8A8 linear (kernels/fp8_matmul.py) quantizes its input per token first. Its input is
the output of an RMSNorm (qkv and gate/up projections) or of SwiGLU (down projection), so the
unfused pair writes a bf16 row and reads it back twice (amax pass, quantize pass). In the
Llama-3-8B FP8 profile of a 16k-token mixed step (docs/performance.md, tenth session) the
separate quantization took 16.1 ms, SwiGLU 15.3 and RMSNorm 11.3 of ~246 ms. These kernels
compute the row and quantize it in the same program (vLLM fuses the same pairs):

    add_rmsnorm_quantize_fp8(x, residual, w, eps) -> (xq, scales, x + residual)
    silu_mul_quantize_fp8(gate_up) -> (xq, scales)

Numerics: the same computation as the unfused kernels followed by `quantize_fp8_per_token` —
the row is rounded to the activations' dtype as `fused_add_rmsnorm` / `silu_and_mul` round it
(the same jit helpers compute it), and then quantized with fp8_matmul's per-token scale
(amax * fp32(1 / 448), floored) and saturating e4m3 rounding. xq [T, N] float8_e4m3fn and
scales [T, 1] float32 are the layout torch._scaled_mm and the small-M kernel take. Bit-equal in
the tests (interpreter and H100). On the H100 the norm's sm_90 build rarely differs from
the unfused pair's (they are compiled apart and may contract multiply-adds differently): on
16,384 random rows of 4,096, 139 e4m3 codes of 67M differed by one step and one scale by
one ulp (bench/scripts/gpu_fp8_fused.py, twelfth session); SwiGLU matched on every row.

Program shapes: one row a program. The norm keeps the row in registers (rows up to
rmsnorm._MAX_SINGLE_BLOCK; wider ones are refused, the caller keeps the unfused pair). SwiGLU
rows up to _SINGLE_MAX (16,384: Llama's 11,008 and 14,336) stay in registers, with 32 warps
past 8,192 columns (54 registers a thread, no spills in sm_90 SASS); wider ones take an amax
pass and a quantize pass, recomputing silu(gate) * up from gate_up, which the second pass
reads from L2. H100, 14,336 columns (bench/scripts/gpu_fp8_fused.py, twelfth session), µs at
1 / 512 / 4,096 / 16,384 rows: one pass 4.1 / 11.8 / 98.5 / 379; two passes 6.9 / 16.5 / 178 /
695; SwiGLU then the quantize launch 4.1 / 22.2 / 194 / 777. Grids depend only on T
(CUDA-graph safe). On CPU the kernels run only under Triton's
interpreter (TRITON_INTERPRET=1 set before import); the references run anywhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels import activation, fp8_matmul, rmsnorm
from turbollm.kernels._interpreter import emulate_bf16_rounding, emulate_fp8_rounding

HAS_TRITON = triton is not None
FP8 = torch.float8_e4m3fn
_SINGLE_MAX = 16384  # widest SwiGLU output row kept in registers
_WIDE_WARPS = 32  # a one-pass SwiGLU row wider than 8,192 (16 warps: ~3% slower on the H100)
_BLOCK = 2048  # columns per step of the two-pass SwiGLU loop
MAX_NORM_WIDTH = rmsnorm._MAX_SINGLE_BLOCK
"""Widest row `add_rmsnorm_quantize_fp8` takes (the row stays in registers)."""

if triton is not None:
    from turbollm.kernels._interpreter import round_bf16
    from turbollm.kernels.activation import silu_mul
    from turbollm.kernels.fp8_matmul import _e4m3, _scale_of
    from turbollm.kernels.rmsnorm import add_rmsnorm_row

    @triton.jit
    def _add_rmsnorm_quant_kernel(
        x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, new_res_ptr,
        n_cols, eps, stride_x, stride_res, stride_new,
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
        ROUND: tl.constexpr, ROUND_FP8: tl.constexpr,  # interpreter only: see _interpreter.py
    ):
        row = tl.program_id(0).to(tl.int64)
        in_dtype = x_ptr.dtype.element_ty
        offs = tl.arange(0, BLOCK_N)
        mask = offs < n_cols
        y = add_rmsnorm_row(x_ptr + row * stride_x, res_ptr + row * stride_res, new_res_ptr + row * stride_new,
                            w_ptr, offs, mask, n_cols, eps, in_dtype, HAS_RESIDUAL, ROUND, ROUND)
        y = y.to(in_dtype).to(tl.float32)  # [BLOCK_N] as the unfused norm writes it
        s = _scale_of(tl.max(tl.abs(y), axis=0))
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * n_cols + offs, _e4m3(y * tl.div_rn(1.0, s), ROUND_FP8), mask=mask)

    @triton.jit
    def _silu_row(row_ptr, cols, mask, inter, in_dtype: tl.constexpr, ROUND: tl.constexpr):
        """silu(gate) * up of columns `cols`, rounded to in_dtype as silu_and_mul writes it (fp32)."""
        gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0).to(tl.float32)
        y = silu_mul(gate, up)
        if ROUND:
            y = round_bf16(y)
        return y.to(in_dtype).to(tl.float32)

    @triton.jit
    def _silu_mul_quant_kernel(
        x_ptr, q_ptr, s_ptr, inter, stride_x,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr,
        ROUND: tl.constexpr, ROUND_FP8: tl.constexpr,  # interpreter only: see _interpreter.py
    ):
        row = tl.program_id(0).to(tl.int64)
        in_dtype = x_ptr.dtype.element_ty
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * inter
        offs = tl.arange(0, BLOCK)
        if SINGLE:
            mask = offs < inter
            y = _silu_row(x_row, offs, mask, inter, in_dtype, ROUND)  # [BLOCK]
            s = _scale_of(tl.max(tl.abs(y), axis=0))
            tl.store(q_row + offs, _e4m3(y * tl.div_rn(1.0, s), ROUND_FP8), mask=mask)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, inter, BLOCK):
                cols = c0 + offs
                amax = tl.maximum(amax, tl.abs(_silu_row(x_row, cols, cols < inter, inter, in_dtype, ROUND)))
            s = _scale_of(tl.max(amax, axis=0))
            inv = tl.div_rn(1.0, s)
            for c0 in range(0, inter, BLOCK):  # the same values again: gate_up comes from L2
                cols = c0 + offs
                mask = cols < inter
                y = _silu_row(x_row, cols, mask, inter, in_dtype, ROUND)
                tl.store(q_row + cols, _e4m3(y * inv, ROUND_FP8), mask=mask)
        tl.store(s_ptr + row, s)


def _check_x(name: str, x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the fused FP8 kernels need triton; use the *_ref functions instead")
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be a 2-D fp16 / bf16 / fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {x.stride()}")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"{name} is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")


def _outputs(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xq = torch.empty(rows, cols, dtype=FP8, device=device)  # [T, N]
    scales = torch.empty(rows, 1, dtype=torch.float32, device=device)  # [T, 1]
    return xq, scales


def add_rmsnorm_quantize_fp8(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N] in x's dtype, or None
    weight: torch.Tensor,  # [N] in x's dtype
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xq [T, N] e4m3, scales [T, 1] fp32, x + residual) with xq * scales the per-token FP8
    quantization of `fused_add_rmsnorm(x, residual, weight, eps)[0]`; residual None: the
    third result is x itself. N <= MAX_NORM_WIDTH."""
    _check_x("x", x)
    tokens, n = x.shape
    if not 1 <= n <= MAX_NORM_WIDTH:
        raise ValueError(f"x has {n} columns; the fused norm takes 1..{MAX_NORM_WIDTH}")
    if weight.shape != (n,) or weight.dtype != x.dtype or weight.device != x.device or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{n}] {x.dtype} tensor on {x.device}, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device or (residual.numel() and residual.stride(-1) != 1)):
        raise ValueError(f"residual must be a [{tokens}, {n}] {x.dtype} tensor on {x.device} with a "
                         f"contiguous last dimension, got {residual.dtype} {tuple(residual.shape)}")
    xq, scales = _outputs(tokens, n, x.device)
    new_residual = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, N]
    if tokens:
        res = residual if residual is not None else x  # unused when HAS_RESIDUAL is False
        block = triton.next_power_of_2(n)
        _add_rmsnorm_quant_kernel[(tokens,)](
            x, res, weight, xq, scales, new_residual, n, eps, x.stride(0), res.stride(0), new_residual.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block,
            ROUND=emulate_bf16_rounding(x.dtype), ROUND_FP8=emulate_fp8_rounding(FP8),
            num_warps=rmsnorm._num_warps(block),
        )
    return xq, scales, new_residual


def silu_mul_quantize_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2I] -> (xq [T, I] e4m3, scales [T, 1] fp32): the per-token FP8 quantization
    of `silu_and_mul(gate_up)`."""
    _check_x("gate_up", gate_up)
    tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up last dim {width} is odd; it must hold gate and up halves [T, 2 * I]")
    inter = width // 2
    xq, scales = _outputs(tokens, inter, gate_up.device)
    if tokens and inter:
        single = inter <= _SINGLE_MAX
        block = triton.next_power_of_2(inter) if single else _BLOCK
        _silu_mul_quant_kernel[(tokens,)](
            gate_up, xq, scales, inter, gate_up.stride(0), BLOCK=block, SINGLE=single,
            ROUND=emulate_bf16_rounding(gate_up.dtype), ROUND_FP8=emulate_fp8_rounding(FP8),
            num_warps=_WIDE_WARPS if single and block > 8192 else rmsnorm._num_warps(block),
        )
    return xq, scales


def add_rmsnorm_quantize_fp8_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: the torch RMSNorm, then the per-token quantization reference."""
    h, new_residual = rmsnorm.fused_add_rmsnorm_ref(x, residual, weight, eps)  # [T, N] each
    xq, scales = fp8_matmul.quantize_fp8_per_token_ref(h)
    return xq, scales, new_residual


def silu_mul_quantize_fp8_ref(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: fp32 SwiGLU rounded once to gate_up's dtype, then the quantization reference."""
    return fp8_matmul.quantize_fp8_per_token_ref(activation.silu_and_mul_ref(gate_up))


__all__ = [
    "HAS_TRITON", "MAX_NORM_WIDTH", "add_rmsnorm_quantize_fp8", "add_rmsnorm_quantize_fp8_ref",
    "silu_mul_quantize_fp8", "silu_mul_quantize_fp8_ref",
]
