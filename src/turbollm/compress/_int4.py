"""The int-b group grid of AWQ and GPTQ (docs: QUANT_CONTRACT, "int4"), and its range search.

Private helper of compress/awq.py and compress/gptq.py (CPU or any device, float32 math).
Weight W is [N, K]; groups are G consecutive input columns; maxq = 2**bits - 1. For a group
with range [lo, hi]: s = (hi - lo) / maxq, q = clamp(round(W / s + z), 0, maxq),
W_hat = (q - z) * s, where the zero point z is
- "integer" (the contract as first written, and what AutoAWQ / GPTQ checkpoints store):
  lo <= 0 <= hi and z = clamp(round(-lo / s), 0, maxq), so 0 is on the grid;
- "float" (the runtime's zeros are floats in the activation dtype, so any z works):
  z = -lo / s exactly, the grid spans [lo, hi] with no shift and lo, hi need not straddle 0,
  i.e. GGUF Q4_1's (d, m) affine grid with m = -z * d.
`search_range` picks each group's range by minimizing that group's (activation-weighted)
reconstruction error over shrunk ranges, then refits (s, z) to the chosen codes by
weighted least squares (llama.cpp's make_qkx refinement); it never does worse, on its
objective, than the min/max range it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turbollm.quant.grids import dequantize_int4, group_size_for  # group_size_for: the one policy

SCALE_EPS = 1e-8
"""Guard for an all-zero group (hi == lo == 0): its scale becomes this instead of 0."""
ZERO_POINTS = ("float", "integer")
"""Zero-point kinds of the grid (see the module docstring)."""
_DEGENERATE = 2.0**-7
"""float zeros: a group whose range is below this fraction of its magnitude takes 0 into
its range, so z stays small (z is stored in the activation dtype)."""


@dataclass
class Int4Weight:
    """One quantized linear weight on the grid (CPU tensors).

    q holds the integer codes unpacked (pack two per byte with kernels' pack_int4 for
    storage). With `perm` (GPTQ act-order) q's columns are in permuted order, groups are
    contiguous in that order, and the layer computes x[:, perm] @ W_hat^T.
    """

    q: torch.Tensor  # [N, K] uint8 values 0..maxq
    scales: torch.Tensor  # [N, K // G] float32
    zeros: torch.Tensor  # [N, K // G] float32 (integers under zero_point "integer")
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

    def add_codes(self, prefix: str, codes: dict[str, Int4Weight]) -> None:
        """Record a layer's grids {relative module name: Int4Weight} under `prefix`, on the CPU."""
        self.update({prefix + n: {k: t.cpu() for k, t in q.as_dict().items()} for n, q in codes.items()})

    def add_float_params(self, layer: nn.Module, prefix: str, changed: set[str]) -> None:
        """Record copies of the layer's float parameters named in `changed` under `prefix`."""
        params = dict(layer.named_parameters())
        self.float_params.update({prefix + n: params[n].detach().float().cpu().clone() for n in sorted(changed)})


def check_bits(bits: int, group_size: int, zero_point: str = "integer") -> None:
    """ValueError naming the bad value when bits, the group size or the zero point cannot be used."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2..8 (int4: 4)")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size={group_size} is not one of 32, 64, 128")
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point={zero_point!r} is not one of {', '.join(ZERO_POINTS)}")


def minmax_range(w: torch.Tensor, group_size: int, zero_point: str = "integer") -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's range per group, each [N, K // G]: min / max W, widened to take in 0 under
    integer zeros (and under float zeros for a degenerate, near-constant group)."""
    g = w.reshape(w.shape[0], -1, group_size)  # [N, K // G, G]
    lo, hi = g.amin(-1), g.amax(-1)
    if zero_point == "integer":
        return lo.clamp(max=0), hi.clamp(min=0)
    tiny = (hi - lo) <= _DEGENERATE * torch.maximum(lo.abs(), hi.abs())
    return torch.where(tiny, lo.clamp(max=0), lo), torch.where(tiny, hi.clamp(min=0), hi)


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int,
               zero_point: str = "integer") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (as float) of ranges [lo, hi] (any equal shapes)."""
    maxq = 2**bits - 1
    s = ((hi - lo) / maxq).clamp(min=SCALE_EPS)
    z = -lo / s
    return s, (torch.round(z).clamp(0, maxq) if zero_point == "integer" else z)


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """Codes q [N, K] uint8 of W [N, K] with per-group scales / zeros [N, K // G]."""
    n, k = w.shape
    g = w.reshape(n, -1, group_size)  # [N, K // G, G]
    zi = torch.round(zeros)  # integer zeros: round(W / s) + z exactly (ties too), as the contract
    q = torch.round(g / scales[..., None] + (zeros - zi)[..., None]) + zi[..., None]
    return q.clamp(0, 2**bits - 1).reshape(n, k).to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat [N, K] float32 = (q - z) * s."""
    return dequantize_int4(q, scales, zeros, group_size)


def fake_quantize(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int,
    zero_point: str = "integer",
) -> torch.Tensor:
    """W_hat [N, K] of W on the grid given by the per-group ranges [lo, hi] [N, K // G]."""
    s, z = scale_zero(lo, hi, bits, zero_point)
    return dequantize(quantize(w, s, z, group_size, bits), s, z, group_size)


def quantize_range(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int,
    zero_point: str = "integer",
) -> Int4Weight:
    """Int4Weight of W [N, K] for given per-group ranges (RTN when they are min/max)."""
    s, z = scale_zero(lo, hi, bits, zero_point)
    return Int4Weight(quantize(w, s, z, group_size, bits), s, z, group_size)


def rtn(w: torch.Tensor, group_size: int, bits: int = 4, zero_point: str = "integer") -> Int4Weight:
    """Round-to-nearest on the min/max grid: the baseline both methods must beat."""
    w = w.float()
    lo, hi = minmax_range(w, group_size, zero_point)
    return quantize_range(w, lo, hi, group_size, bits, zero_point)


# ---- range search ----------------------------------------------------------------------------
# `importance` weighs a group's weight error d [G] (per row) as d^T B d: either diagonal
# weights [K] (B = diag of that group's entries; e.g. diag H) or the diagonal blocks of the
# Hessian [K // G, G, G] (group_blocks: the exact output error of that group's columns
# when every other column is left exact).
def group_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal G x G blocks of H [K, K]: [K // G, G, G]."""
    k = hessian.shape[0]
    ng = k // group_size
    idx = torch.arange(k, device=hessian.device).reshape(ng, group_size)  # [ng, G]
    return hessian[idx[:, :, None], idx[:, None, :]]  # [ng, G, G]


def _weigh(v: torch.Tensor, importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """B v per group: [N, K] -> [N, K // G, G]."""
    n, k = v.shape
    if importance.dim() == 1:
        return (v * importance).reshape(n, -1, group_size)
    vg = v.reshape(n, -1, group_size).transpose(0, 1)  # [ng, N, G]
    return torch.bmm(vg, importance).transpose(0, 1)  # [N, ng, G]


def group_error(d: torch.Tensor, importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """d^T B d per (row, group) of a weight error d [N, K]: [N, K // G]."""
    return (d.reshape(d.shape[0], -1, group_size) * _weigh(d, importance, group_size)).sum(-1)


def _grid_error(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, importance: torch.Tensor,
                group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K], error [N, K // G]) of W on the grid (s, z)."""
    q = quantize(w, s, z, group_size, bits)
    return q, group_error(dequantize(q, s, z, group_size) - w, importance, group_size)


@dataclass(frozen=True)
class RangeSearch:
    """How search_range explores each group's range (shrinks toward 0 of the min/max range)."""

    grid: int = 20
    """Shrink steps: the range ends move by 1/grid of themselves per step."""
    max_shrink: float = 0.5
    """Largest fraction of an end's distance to 0 the search may cut away."""
    asymmetric: bool = True
    """Shrink lo and hi independently (grid^2 candidates) instead of by one common ratio."""
    refine: int = 2
    """Rounds of weighted least-squares refit of (s, z) to the chosen codes (0: none)."""

    def check(self) -> None:
        """ValueError naming the bad value."""
        if self.grid < 1:
            raise ValueError(f"range search grid={self.grid} must be >= 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"range search max_shrink={self.max_shrink} must lie in [0, 1)")
        if self.refine < 0:
            raise ValueError(f"range search refine={self.refine} must be >= 0")


def _least_squares(w: torch.Tensor, q: torch.Tensor, z: torch.Tensor, importance: torch.Tensor,
                   group_size: int, zero_point: str, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) [N, K // G] minimizing the weighted error of (q - z) * s against W for fixed
    codes q: s and m = -z * s free (float zeros), or s alone with z kept (integer zeros)."""
    n, k = w.shape
    qf = q.float()
    if zero_point == "integer":
        c = qf - z.repeat_interleave(group_size, 1)  # [N, K] q - z
        bc = _weigh(c, importance, group_size)  # [N, ng, G]
        num = (bc * w.reshape(n, -1, group_size)).sum(-1)
        den = (bc * c.reshape(n, -1, group_size)).sum(-1)
        return (num / den.clamp(min=1e-30)).clamp(min=SCALE_EPS), z
    bq = _weigh(qf, importance, group_size)  # [N, ng, G] B q
    b1 = _weigh(torch.ones_like(w), importance, group_size)  # [N, ng, G] B 1
    wg, qg = w.reshape(n, -1, group_size), qf.reshape(n, -1, group_size)
    a11, a12, a22 = (bq * qg).sum(-1), bq.sum(-1), b1.sum(-1)  # normal equations [[a11, a12], [a12, a22]]
    r1, r2 = (bq * wg).sum(-1), (b1 * wg).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-12 * (a11 * a22).clamp(min=1e-30)
    det = torch.where(ok, det, torch.ones_like(det))
    s = (a22 * r1 - a12 * r2) / det
    m = (a11 * r2 - a12 * r1) / det
    bad = ~ok | (s <= SCALE_EPS) | ~torch.isfinite(s) | ~torch.isfinite(m)
    s = torch.where(bad, torch.full_like(s, float("nan")), s)  # rejected by the caller
    return s, -m / s.clamp(min=SCALE_EPS)


@torch.no_grad()
def search_range(
    w: torch.Tensor, importance: torch.Tensor, group_size: int, bits: int, zero_point: str,
    search: RangeSearch, frozen_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scales, zeros) [N, K // G] of W [N, K] minimizing group_error.

    Candidates: the min/max range (kept unless beaten), its ends shrunk toward 0, then
    `search.refine` least-squares refits to the best codes, each kept only where it lowers
    the error. Rows below `frozen_rows` keep the min/max grid.
    """
    maxq = 2**bits - 1
    w = w.float()
    lo0, hi0 = minmax_range(w, group_size, zero_point)  # [N, ng]
    best_s, best_z = scale_zero(lo0, hi0, bits, zero_point)
    _, best_err = _grid_error(w, best_s, best_z, importance, group_size, bits)
    keep_s, keep_z = best_s.clone(), best_z.clone()
    steps = [i / search.grid for i in range(search.grid) if i / search.grid <= search.max_shrink]
    pairs = [(a, b) for a in steps for b in steps] if search.asymmetric else [(a, a) for a in steps]
    for a, b in pairs:
        if a == b == 0.0:
            continue
        s, z = scale_zero(lo0 * (1 - a), hi0 * (1 - b), bits, zero_point)
        _, err = _grid_error(w, s, z, importance, group_size, bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    for _ in range(search.refine):
        q = quantize(w, best_s, best_z, group_size, bits)
        s, z = _least_squares(w, q, best_z, importance, group_size, zero_point, maxq)
        valid = torch.isfinite(s) & torch.isfinite(z)
        s, z = torch.where(valid, s, best_s), torch.where(valid, z, best_z)
        _, err = _grid_error(w, s, z, importance, group_size, bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    best_s[:frozen_rows], best_z[:frozen_rows] = keep_s[:frozen_rows], keep_z[:frozen_rows]
    return best_s, best_z
