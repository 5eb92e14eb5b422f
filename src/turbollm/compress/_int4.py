"""The contract's asymmetric int-b group grid (docs: QUANT_CONTRACT, "int4"), for AWQ and GPTQ.

Private helper of compress/awq.py and compress/gptq.py (CPU or any device, float32 math).
Weight W is [N, K]; groups are G consecutive input columns. For a group with clip range
[lo, hi] (lo <= 0 <= hi): s = (hi - lo) / maxq, z = clamp(round(-lo / s), 0, maxq),
q = clamp(round(W / s) + z, 0, maxq), W_hat = (q - z) * s, with maxq = 2**bits - 1.
The quant helper's RTN implements the same grid; the lead may dedupe when merging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.quant.grids import dequantize_int4, group_size_for  # group_size_for: the one policy

SCALE_EPS = 1e-8
"""Guard for an all-zero group (hi == lo == 0): its scale becomes this instead of 0."""


@dataclass
class Int4Weight:
    """One quantized linear weight on the contract's grid (CPU tensors).

    q holds the integer codes unpacked (pack two per byte with kernels' pack_int4 for
    storage). With `perm` (GPTQ act-order) q's columns are in permuted order, groups are
    contiguous in that order, and the layer computes x[:, perm] @ W_hat^T.
    """

    q: torch.Tensor  # [N, K] uint8 values 0..maxq
    scales: torch.Tensor  # [N, K // G] float32
    zeros: torch.Tensor  # [N, K // G] float32 integer zero points
    group_size: int
    perm: torch.Tensor | None = None  # [K] int64 or None

    def dequantize(self) -> torch.Tensor:
        """W_hat [N, K] in the model's (unpermuted) column order, float32."""
        w = dequantize(self.q, self.scales, self.zeros, self.group_size)  # [N, K]
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


    def as_dict(self) -> dict[str, torch.Tensor]:
        """The grid as quant/linear.py's install_int4 takes it: q, scales, zeros (+ perm)."""
        d = {"q": self.q, "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            d["perm"] = self.perm
        return d


class QuantizedModel(dict[str, dict[str, torch.Tensor]]):
    """What awq_quantize_model / gptq_quantize_model return (all CPU tensors).

    A dict: module name of each quantized linear (turbollm's merged names, e.g.
    "model.layers.0.self_attn.qkv_proj") -> {"q": uint8 [N, K] codes, "scales" and "zeros"
    float32 [N, K // G], and "perm" int64 [K] under GPTQ act-order (q's columns are then in
    that order)}. The group size of a layer is K // scales.shape[1].
    `float_params`: parameters that stay in float but that the method changed (AWQ folds
    1/s into RMSNorm weights and into v / up rows' biases), full parameter name -> new value;
    the model given to the method already holds them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.float_params: dict[str, torch.Tensor] = {}


def check_bits(bits: int, group_size: int) -> None:
    """ValueError naming the bad value when bits or the group size cannot be used."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2..8 (int4: 4)")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size={group_size} is not one of 32, 64, 128")



def minmax_range(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's clip range per group: lo = min(0, min W), hi = max(0, max W); each [N, K // G]."""
    g = w.reshape(w.shape[0], -1, group_size)  # [N, K // G, G]
    return g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (as float) of clip ranges [lo, hi] (any equal shapes)."""
    maxq = 2**bits - 1
    s = ((hi - lo) / maxq).clamp(min=SCALE_EPS)
    z = torch.round(-lo / s).clamp(0, maxq)
    return s, z


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """Codes q [N, K] uint8 of W [N, K] with per-group scales / zeros [N, K // G]."""
    n, k = w.shape
    g = w.reshape(n, -1, group_size)  # [N, K // G, G]
    q = torch.round(g / scales[..., None]) + zeros[..., None]
    return q.clamp(0, 2**bits - 1).reshape(n, k).to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat [N, K] float32 = (q - z) * s."""
    return dequantize_int4(q, scales, zeros, group_size)


def fake_quantize(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """W_hat [N, K] of W on the grid given by the per-group clip ranges [lo, hi] [N, K // G]."""
    s, z = scale_zero(lo, hi, bits)
    return dequantize(quantize(w, s, z, group_size, bits), s, z, group_size)


def quantize_range(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int
) -> Int4Weight:
    """Int4Weight of W [N, K] for given per-group clip ranges (RTN when they are min/max)."""
    s, z = scale_zero(lo, hi, bits)
    return Int4Weight(quantize(w, s, z, group_size, bits), s, z, group_size)


def rtn(w: torch.Tensor, group_size: int, bits: int = 4) -> Int4Weight:
    """Round-to-nearest on the min/max grid: the baseline both methods must beat."""
    w = w.float()
    lo, hi = minmax_range(w, group_size)
    return quantize_range(w, lo, hi, group_size, bits)
