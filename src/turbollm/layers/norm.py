"""RMSNorm with an optional fused residual add (numerics follow HF's LlamaRMSNorm).

On CUDA the add and the norm run as one Triton kernel (kernels/rmsnorm.py, same roundings
up to the fp32 reduction order); elsewhere the torch code below, which is the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from turbollm.layers.linear import default_weight_loader

try:  # the Triton kernels need triton, which CPU-only torch builds lack
    from turbollm.kernels import rmsnorm as rmsnorm_kernels
except ImportError:  # pragma: no cover
    rmsnorm_kernels = None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back like transformers does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)  # [hidden]
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual); residual None means x itself."""
        if x.is_cuda and rmsnorm_kernels is not None and rmsnorm_kernels.HAS_TRITON:
            return self._forward_triton(x, residual)
        if residual is not None:
            x = x + residual  # [num_tokens, hidden]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x

    def _forward_triton(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert rmsnorm_kernels is not None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [num_tokens, hidden]
        r2 = None if residual is None else residual.reshape(-1, shape[-1])  # [num_tokens, hidden]
        out, new_residual = rmsnorm_kernels.fused_add_rmsnorm(x2, r2, self.weight, self.eps)
        if residual is None:
            return out.view(shape), x  # like the torch code: x itself, not a view
        return out.view(shape), new_residual.view(shape)
