"""The calibrators' int4 grid (compress/_int4.py): integer vs float (free-offset) zero
points, the per-group range search and its least-squares refit, and float zeros through the
runtime's quantize / pack / torch linear path."""

from __future__ import annotations

import pytest
import torch
from compressutil import correlated_inputs

from turbollm.compress import _int4
from turbollm.compress._int4 import RangeSearch
from turbollm.quant import grids


def _w(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + 0.02 * torch.rand(n, 1, generator=g)


def _hessian(k: int, seed: int) -> torch.Tensor:
    x = correlated_inputs(k, 4 * k, seed)
    return 2 * x.T @ x / x.shape[0]


def _q41_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights on a GGUF Q4_1-style g32 grid: d * q + m with a free offset m per group."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every group uses both ends of its grid
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 0.002).repeat_interleave(32, 1)
    m = (-0.08 * torch.rand(n, k // 32, generator=g) + 0.01).repeat_interleave(32, 1)
    return d * q + m


def test_float_zeros_reproduce_a_free_offset_grid_that_integer_zeros_cannot() -> None:
    w = _q41_weights(24, 128, seed=0)
    flt = _int4.rtn(w, 32, zero_point="float")
    torch.testing.assert_close(flt.dequantize(), w, rtol=0, atol=1e-6)
    assert not torch.equal(flt.zeros, flt.zeros.round())
    integer = _int4.rtn(w, 32, zero_point="integer")
    assert torch.equal(integer.zeros, integer.zeros.round())
    assert (integer.dequantize() - w).abs().max() > 1e-3


@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_rtn_error_within_half_step_and_degenerate_groups(zero_point: str) -> None:
    w = _w(16, 256, seed=1)
    w[0, :64] = 0.0  # all-zero group: exact
    w[1, :64] = 0.3  # constant group: exact (0 joins its range, so z stays in 0..15)
    qw = _int4.rtn(w, 64, zero_point=zero_point)
    w_hat = qw.dequantize()
    step = qw.scales.repeat_interleave(64, 1)
    assert torch.isfinite(w_hat).all() and ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(w_hat[0, :64], w[0, :64])
    torch.testing.assert_close(w_hat[1, :64], w[1, :64])
    assert 0 <= qw.zeros[1, 0] <= 15


@pytest.mark.parametrize("zero_point", ["integer", "float"])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("search", [
    RangeSearch(), RangeSearch(asymmetric=False, refine=0), RangeSearch(grid=4, max_shrink=0.3, refine=3)])
def test_range_search_never_worse_than_minmax_on_its_objective(
        zero_point: str, blocks: bool, search: RangeSearch) -> None:
    n, k, g = 32, 256, 64
    w = _w(n, k, seed=2)
    h = _hessian(k, seed=3)
    imp = _int4.group_blocks(h, g) if blocks else h.diagonal()
    base = _int4.rtn(w, g, zero_point=zero_point)
    err0 = _int4.group_error(base.dequantize() - w, imp, g)  # [N, K / G]
    s, z = _int4.search_range(w, imp, g, 4, zero_point, search)
    w_hat = _int4.dequantize(_int4.quantize(w, s, z, g, 4), s, z, g)
    err = _int4.group_error(w_hat - w, imp, g)
    assert (err <= err0 * (1 + 1e-5)).all()
    assert err.sum() < 0.97 * err0.sum(), "the search found nothing better than min/max"
    if zero_point == "integer":
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15


def test_group_error_with_blocks_is_the_output_error() -> None:
    """With the diagonal blocks of H, summed group errors are tr(D H D^T) when D touches one group per row."""
    k, g = 128, 32
    h = _hessian(k, seed=4)
    d = torch.zeros(6, k)
    for r in range(6):
        j = r % (k // g)
        d[r, j * g:(j + 1) * g] = torch.randn(g, generator=torch.Generator().manual_seed(r))
    total = _int4.group_error(d, _int4.group_blocks(h, g), g).sum()
    torch.testing.assert_close(total, (d @ h * d).sum(), rtol=1e-5, atol=1e-6)


def test_least_squares_refit_helps_and_frozen_rows_keep_minmax() -> None:
    w = _w(32, 128, seed=5)
    imp = _hessian(128, seed=6).diagonal()
    no_refine = RangeSearch(grid=1, refine=0)  # min/max only
    s0, z0 = _int4.search_range(w, imp, 64, 4, "float", no_refine)
    base = _int4.rtn(w, 64, zero_point="float")
    assert torch.equal(s0, base.scales) and torch.equal(z0, base.zeros)
    s1, z1 = _int4.search_range(w, imp, 64, 4, "float", RangeSearch(grid=1, refine=2), frozen_rows=3)
    assert torch.equal(s1[:3], s0[:3]) and torch.equal(z1[:3], z0[:3])
    err = [_int4.group_error(_int4.dequantize(_int4.quantize(w, s, z, 64, 4), s, z, 64) - w, imp, 64)[3:].sum()
           for s, z in ((s0, z0), (s1, z1))]
    assert err[1] < 0.99 * err[0]


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="zero_point='half'"):
        _int4.check_bits(4, 64, "half")
    with pytest.raises(ValueError, match="max_shrink=1.0"):
        RangeSearch(max_shrink=1.0).check()
    with pytest.raises(ValueError, match="grid=0"):
        RangeSearch(grid=0).check()
    with pytest.raises(ValueError, match="refine=-1"):
        RangeSearch(refine=-1).check()


def test_float_zeros_through_pack_and_the_runtime_linear() -> None:
    """A free-offset grid re-quantizes losslessly with the runtime's quantize_int4, packs,
    and the int4 layer's torch path computes x @ W_hat^T with it."""
    from turbollm.distributed.parallel import SINGLE
    from turbollm.layers.linear import RowParallelLinear
    from turbollm.quant.linear import Int4LinearMethod, install_int4

    n, k, g = 48, 128, 32
    w = _q41_weights(n, k, seed=7) + 0.001 * torch.randn(n, k, generator=torch.Generator().manual_seed(8))
    qw = _int4.rtn(w, g, zero_point="float")
    assert not torch.equal(qw.zeros, qw.zeros.round())
    w_hat = qw.dequantize()
    q2, _, _ = grids.quantize_int4(w_hat, g, scales=qw.scales, zeros=qw.zeros)
    assert torch.equal(q2, qw.q)
    assert torch.equal(grids.unpack_int4(grids.pack_int4(qw.q)), qw.q)
    layer = RowParallelLinear(k, n, False, SINGLE)
    layer.weight.data.copy_(w_hat)
    install_int4(layer, Int4LinearMethod(g, prequantized=True), qw.as_dict())
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(layer.quant_method.dense_weight(layer), w_hat, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), x @ w_hat.T, rtol=1e-5, atol=1e-5)
