"""RMSNorm with an optional fused residual add (numerics follow HF's LlamaRMSNorm)."""

from __future__ import annotations

import torch
from torch import nn

from turbollm.layers.linear import default_weight_loader


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
        if residual is not None:
            x = x + residual  # [num_tokens, hidden]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x
