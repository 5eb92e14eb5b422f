"""SwiGLU activation on a merged gate/up projection.

On CUDA a Triton kernel (kernels/activation.py: fp32 math, one rounding); elsewhere the
torch code below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # the Triton kernels need triton, which CPU-only torch builds lack
    from turbollm.kernels import activation as activation_kernels
except ImportError:  # pragma: no cover
    activation_kernels = None


class SiluAndMul(nn.Module):
    """silu(gate) * up, where x = cat(gate, up) along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and activation_kernels is not None and activation_kernels.HAS_TRITON:
            x2 = x.reshape(-1, x.shape[-1])  # [num_tokens, 2 * intermediate / tp]
            return activation_kernels.silu_and_mul(x2).view(*x.shape[:-1], x.shape[-1] // 2)
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]) * x[..., half:]  # [num_tokens, intermediate / tp]
