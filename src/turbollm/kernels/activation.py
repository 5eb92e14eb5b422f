"""SwiGLU on a merged gate/up projection: Triton kernel, launcher, torch reference.

`silu_and_mul(x)` with x = cat(gate, up) along the last dim returns silu(gate) * up, the
semantics of `layers/activation.py` SiluAndMul. The kernel does the math in fp32 and rounds
once to x's dtype; torch's bf16/fp16 path rounds silu(gate) before the product, so the two
differ by at most about one ulp of the output dtype (fp32: ~1e-6 relative).

Program (row, column block) reads BLOCK gate and BLOCK up values of one row and writes BLOCK
outputs; the grid depends only on the shape (CUDA-graph safe). On CPU the kernel runs only
under Triton's interpreter (TRITON_INTERPRET=1 set before import); the reference runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
_BLOCK = 1024  # output columns per program

if triton is not None:

    @triton.jit
    def silu_mul(gate, up):
        """silu(gate) * up in fp32 (gate, up: fp32 blocks); shared with kernels/fp8_fused.py.
        silu(g) = g * sigmoid(g); for g -> -inf exp(-g) = inf and the quotient is -0."""
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, out_ptr, inter,
        stride_x, stride_out,  # row strides (last stride 1)
        BLOCK: tl.constexpr, ROUND_OUT: tl.constexpr,  # interpreter only: see _interpreter.py
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        mask = cols < inter
        x_row = x_ptr + row * stride_x
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        y = silu_mul(gate, up)  # [BLOCK]
        if ROUND_OUT:
            y = round_bf16(y)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x [T, 2I] -> [T, I]
    """silu(x[:, :I]) * x[:, I:] in fp32, rounded once to x's dtype."""
    if triton is None:
        raise RuntimeError("silu_and_mul needs triton; use silu_and_mul_ref instead")
    if x.dim() != 2:
        raise ValueError(f"x shape {tuple(x.shape)} is not [T, 2 * I]")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x last dim {width} is odd; it must hold gate and up halves [T, 2 * I]")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"x is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")
    inter = width // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)  # [T, I]
    if out.numel() == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block,
        ROUND_OUT=emulate_bf16_rounding(x.dtype), num_warps=4,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # x [T, 2I] -> [T, I]
    """Reference for `silu_and_mul`: fp32 math, one rounding."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :half]) * xf[..., half:]).to(x.dtype)


__all__ = ["HAS_TRITON", "silu_and_mul", "silu_and_mul_ref"]
