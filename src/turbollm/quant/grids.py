"""The quantization grids of QUANT_CONTRACT.md: quantize, dequantize, pack (pure torch).

A weight W is [N, K] (out_features, in_features), as in nn.Linear. Every function computes
in float32 on W's device and returns the runtime tensors of the contract:
- int8: q int8 [N, K], per-row scale s [N]; W_hat = q * s.
- int4: q uint8 [N, K] in 0..15, scales s and zero points z [N, K // G]; W_hat = (q - z) * s;
  packed two per byte along K (even column in the low nibble). RTN here keeps z an integer;
  calibrated grids may carry fractional z (a free offset), which every int4 path accepts.
- fp8 (e4m3): q float8_e4m3fn [N, K], per-row scale s [N] float32; W_hat = q * s.
`scale_dtype` rounds the scales first (to the activation dtype they are stored in), so the
stored (q, s, z) reproduce W_hat exactly.
"""

from __future__ import annotations

import torch

# Packing and the contract's torch reference matmuls live with the kernels they specify.
from turbollm.kernels.quant_matmul import int4_linear_ref, int8_linear_ref, pack_int4, unpack_int4
from turbollm.kernels.fp8_matmul import quantize_fp8_per_token_ref

INT4_GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
_EPS = 1e-8


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], s [N] in scale_dtype)."""
    wf = w.float()
    s = (wf.abs().amax(dim=1) / 127.0).clamp_min(_EPS).to(scale_dtype)  # [N]
    q = torch.clamp(torch.round(wf / s.float()[:, None]), -127, 127).to(torch.int8)  # [N, K]
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat [N, K] = q * s."""
    return (q.float() * s.float()[:, None]).to(dtype)


def int4_params(
    w: torch.Tensor, group_size: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [N, K // G] of the asymmetric int4 grid.

    lo/hi [N, K // G] give a clip range (AWQ/GPTQ shrink it); default RTN: the group's
    min/max with 0 included, so zero is on the grid.
    """
    n, k = w.shape
    check_group_size(group_size, k)
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo = g.amin(dim=-1).clamp_max(0.0) if lo is None else lo.float()
    hi = g.amax(dim=-1).clamp_min(0.0) if hi is None else hi.float()
    s = ((hi - lo) / 15.0).clamp_min(_EPS).to(scale_dtype)  # [N, K/G]
    z = torch.clamp(torch.round(-lo / s.float()), 0, 15).to(scale_dtype)  # [N, K/G]
    return s, z


def quantize_int4(
    w: torch.Tensor, group_size: int, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K] in 0..15, scales, zeros [N, K // G]); RTN unless scales/zeros are given.

    Re-quantizing a W_hat that lies on the grid (s, z) with the same s, z is lossless.
    """
    n, k = w.shape
    if scales is None or zeros is None:
        scales, zeros = int4_params(w, group_size, scale_dtype=scale_dtype)
    s = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    z = zeros.float().repeat_interleave(group_size, dim=1)  # [N, K]
    # The contract's round(W / s) + z for integer zeros (ties included); a fractional zero
    # (free-offset grid, compress/_int4.py "float") rounds with its fraction: round(W / s + z).
    zi = torch.round(z)
    q = torch.clamp(torch.round(w.float() / s + (z - zi)) + zi, 0, 15).to(torch.uint8)  # [N, K]
    return q, scales, zeros


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_hat [N, K] = (q - z) * s from unpacked q [N, K]."""
    s = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    z = zeros.float().repeat_interleave(group_size, dim=1)  # [N, K]
    return ((q.float() - z) * s).to(dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8_e4m3fn: (q [N, K], s [N] float32) with W_hat = q * s."""
    s = (w.float().abs().amax(dim=1) / FP8_MAX).clamp_min(_EPS)  # [N]
    q = (w.float() / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row activation quantization: (xq float8 [M, K], scale [M, 1] float32);
    the numerics of kernels/fp8_matmul.py (whose Triton kernel computes the same bytes)."""
    return quantize_fp8_per_token_ref(x)


def check_group_size(group_size: int, width: int) -> None:
    """ValueError unless group_size is one of INT4_GROUP_SIZES and divides width."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {group_size}")
    if width % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input width {width} of a linear layer")


def group_size_for(in_features: int, group_size: int, name: str = "a linear layer") -> int:
    """The group size a linear with `in_features` columns gets when `group_size` is asked.

    Where G does not divide K (SmolLM2's K = 576 at G = 128) the layer takes the largest
    power of two below G that divides K (576 -> 64), never below 32, so W keeps equal,
    contiguous groups; a layer's group size is K // scales.shape[1]. One policy for RTN,
    AWQ, GPTQ and checkpoint loading. ValueError naming the layer when no such group exists.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {group_size}")
    g = group_size
    while g >= 32:
        if in_features % g == 0:
            return g
        g //= 2
    raise ValueError(f"group_size={group_size}: {name}'s {in_features} input columns have no "
                     f"group size in 32..{group_size} dividing them")


__all__ = [
    "FP8_MAX", "INT4_GROUP_SIZES", "check_group_size", "group_size_for", "dequantize_int4", "dequantize_int8", "int4_linear_ref",
    "int4_params", "int8_linear_ref", "pack_int4", "quantize_fp8", "quantize_fp8_per_token", "quantize_int4",
    "quantize_int8", "unpack_int4",
]
