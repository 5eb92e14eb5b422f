"""Work-arounds for Triton-interpreter bugs shared by the kernel files (Triton 3.6).

The interpreter casts fp32 -> bf16 by truncation (its `cast_impl` passes no rounding mode),
while the GPU and torch round to nearest even. Kernels that promise torch's bf16 rounding
call `round_bf16` before each such cast when `emulate_bf16_rounding(dtype)` is true: the
result is an fp32 value already representable in bf16, so the truncating cast is exact.
On the GPU the flag is false and the code is not compiled in.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]


def emulate_fp8_rounding(dtype: torch.dtype) -> bool:
    """True under the interpreter for float8_e4m3fn targets, whose casts lose the carry when a
    value rounds up into the next power of two (1.95 -> 1.0 instead of 2.0)."""
    return triton is not None and dtype == torch.float8_e4m3fn and bool(triton.knobs.runtime.interpret)


def emulate_bf16_rounding(dtype: torch.dtype) -> bool:
    """True under the interpreter for bf16 tensors, where casts would truncate."""
    return triton is not None and dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


if triton is not None:

    @triton.jit
    def round_bf16(x):
        """fp32 -> fp32 holding x rounded to the nearest-even bf16 (finite x)."""
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        u = (u >> 16) << 16
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def round_e4m3(x):
        """fp32 -> fp32 holding x (|x| <= 448) rounded to the nearest-even float8_e4m3fn value."""
        u = x.to(tl.uint32, bitcast=True)
        normal = (u & 0x7F800000) >= (121 << 23)  # |x| >= 2^-6: 3 mantissa bits
        r = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
        sub = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # subnormals: multiples of 2^-9
        return tl.where(normal, r.to(tl.float32, bitcast=True), sub)
