"""Rotary position embedding (rotate-half layout, as HF stores Llama weights).

One module per model: the cos/sin table is built once at construction on the model's
device ([max_pos, dim/2], float32); each forward looks up the step's rows once
(`cos_sin`) and every layer reuses them, cast to the activations' dtype as transformers does.
Supported scalings: none, 'linear', 'llama3' (Llama 3.1+).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, after any scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend between.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened q and k given each token's position."""

    def __init__(
        self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [head_dim / 2]
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_pos, head_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, head_dim / 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)  # [max_pos, head_dim / 2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rotation factors, looked up once and shared by every layer.

        positions [T] -> (cos, sin), each [T, 1, D / 2] in the activations' dtype.
        """
        cos = self.cos[positions].to(dtype).unsqueeze(1)
        sin = self.sin[positions].to(dtype).unsqueeze(1)
        return cos, sin

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H * D], k [T, KV * D] -> rotated (q, k), same shapes."""
        cos, sin = cos_sin
        return apply_rope(q, cos, sin, self.head_dim), apply_rope(k, cos, sin, self.head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate-half RoPE in x's dtype, as transformers computes it: x [T, heads * D] with
    (cos, sin) [T, 1, D / 2] from `RotaryEmbedding.cos_sin` -> [T, heads * D]."""
    shape = x.shape
    x = x.reshape(shape[0], -1, head_dim)  # [T, heads, D]
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, D / 2] each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, heads, D]
    return out.view(shape)
