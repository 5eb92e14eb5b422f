"""The contract's grids: round trips within each scheme's error bound, packing, references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbollm.quant import grids


def _w(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + 0.3 * torch.rand(n, k, generator=g)


@pytest.mark.parametrize("shape", [(7, 64), (33, 96), (128, 256)])
def test_int8_round_trip_within_half_step(shape: tuple[int, int]) -> None:
    w = _w(*shape)
    q, s = grids.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (shape[0],)
    err = (grids.dequantize_int8(q, s) - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)
    assert torch.equal(q.abs().amax(1), torch.full((shape[0],), 127, dtype=torch.int8))  # grid fully used


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", [(5, 128), (48, 256)])
def test_int4_round_trip_within_half_step(shape: tuple[int, int], group: int) -> None:
    w = _w(*shape, seed=group)
    q, s, z = grids.quantize_int4(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.shape == z.shape == (shape[0], shape[1] // group)
    assert torch.all((z >= 0) & (z <= 15)) and torch.equal(z, z.round())
    w_hat = grids.dequantize_int4(q, s, z, group)
    step = s.repeat_interleave(group, dim=1)
    assert torch.all((w_hat - w).abs() <= step / 2 + 1e-6)
    # W_hat lies on the grid: quantizing it again with the same (s, z) is lossless.
    q2, _, _ = grids.quantize_int4(w_hat, group, scales=s, zeros=z)
    assert torch.equal(q2, q)
    # zero is exactly representable (z is an integer), so an all-zero group stays zero
    w0 = w.clone()
    w0[:, :group] = 0
    q0, s0, z0 = grids.quantize_int4(w0, group)
    assert torch.equal(grids.dequantize_int4(q0, s0, z0, group)[:, :group], w0[:, :group])


def test_int4_pack_unpack_inverse_and_nibble_order() -> None:
    q = torch.randint(0, 16, (9, 64), dtype=torch.uint8)
    p = grids.pack_int4(q)
    assert p.shape == (9, 32)
    assert torch.equal(p[:, 0] & 0xF, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])
    assert torch.equal(grids.unpack_int4(p), q)


def test_fp8_round_trip_relative_error() -> None:
    w = _w(16, 64)
    q, s = grids.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    w_hat = q.float() * s[:, None]
    big = w.abs() > s[:, None] * 2.0**-6  # e4m3 normal range: 3 mantissa bits -> rel err <= 2^-4
    assert torch.all(((w_hat - w).abs() <= 2.0**-4 * w.abs() + 1e-7)[big])
    assert torch.allclose(q.float().abs().amax(1), torch.full((16,), grids.FP8_MAX))


@pytest.mark.parametrize("bad", [16, 48, 256])
def test_group_size_checks(bad: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        grids.check_group_size(bad, 512)
    with pytest.raises(ValueError, match="does not divide the input width 96"):
        grids.check_group_size(64, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matmuls_match_dequantized_linear(dtype: torch.dtype) -> None:
    w = _w(40, 128)
    x = torch.randn(6, 128).to(dtype)
    bias = torch.randn(40).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q8, s8 = grids.quantize_int8(w, scale_dtype=dtype)
    ref8 = F.linear(x.float(), grids.dequantize_int8(q8, s8), bias.float())
    got8 = grids.int8_linear_ref(x, q8, s8, bias)
    assert got8.dtype == dtype and torch.allclose(got8.float(), ref8, rtol=tol, atol=tol * 4)
    q4, s4, z4 = grids.quantize_int4(w, 32, scale_dtype=dtype)
    ref4 = F.linear(x.float(), grids.dequantize_int4(q4, s4, z4, 32), bias.float())
    got4 = grids.int4_linear_ref(x, grids.pack_int4(q4), s4, z4, 32, bias)
    assert got4.dtype == dtype and torch.allclose(got4.float(), ref4, rtol=tol, atol=tol * 4)
