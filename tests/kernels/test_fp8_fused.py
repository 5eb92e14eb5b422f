"""RMSNorm / SwiGLU kernels that write FP8 activations: the same e4m3 bytes, scales and
residual as the unfused kernels followed by the per-token quantization (and as the torch
references), over a grid of shapes and dtypes (CPU: Triton interpreter; GPU-marked: Llama
widths); `fp8_linear_quantized` against `fp8_linear`; argument errors."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels import activation, fp8_fused, fp8_matmul, rmsnorm
from turbollm.quant import grids

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal e4m3 values (+0 and -0 equal: the interpreter's emulation gives +0 for tiny negatives)."""
    return a.dtype == b.dtype == FP8 and torch.equal(a.float(), b.float())


def rows(t: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of different magnitudes with an outlier channel (per-token scales must differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g) * torch.logspace(-2, 1, t)[:, None]  # [T, N]
    x[:, n // 3] *= 20.0
    return x.to(dtype).to(DEVICE)


def check_norm(t: int, n: int, dtype: torch.dtype, with_residual: bool) -> None:
    x = rows(t, n, dtype, seed=t * 31 + n)
    res = rows(t, n, dtype, seed=t + n + 5) if with_residual else None
    w = (1.0 + 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(9))).to(dtype).to(DEVICE)
    xq, s, new_res = fp8_fused.add_rmsnorm_quantize_fp8(x, res, w, 1e-5)
    h, new_res_unfused = rmsnorm.fused_add_rmsnorm(x, res, w, 1e-5)  # [T, N], [T, N]
    xq_unfused, s_unfused = fp8_matmul.quantize_fp8_per_token(h)
    assert xq.shape == (t, n) and s.shape == (t, 1) and s.dtype == torch.float32
    assert torch.equal(s, s_unfused) and same_fp8(xq, xq_unfused)
    assert torch.equal(new_res, new_res_unfused)
    if res is None:
        assert new_res is x
    xq_ref, s_ref, res_ref = fp8_fused.add_rmsnorm_quantize_fp8_ref(x, res, w, 1e-5)
    assert torch.equal(new_res, res_ref)
    # The reference norm sums squares in another order: scales agree to ~1e-6, codes may differ by one step.
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=0)
    assert (xq.float() * s - xq_ref.float() * s_ref).abs().max() <= 0.07 * (xq_ref.float() * s_ref).abs().max()
    assert (xq.float() == xq_ref.float()).float().mean() > 0.95


@pytest.mark.parametrize("t,n", [(1, 16), (3, 200), (5, 576), (2, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_matches_unfused(t: int, n: int, dtype: torch.dtype, with_residual: bool) -> None:
    check_norm(t, n, dtype, with_residual)


def check_silu(t: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = rows(t, 2 * inter, dtype, seed=t * 7 + inter)
    xq, s = fp8_fused.silu_mul_quantize_fp8(gate_up)
    xq_unfused, s_unfused = fp8_matmul.quantize_fp8_per_token(activation.silu_and_mul(gate_up))
    assert xq.shape == (t, inter) and s.shape == (t, 1)
    assert torch.equal(s, s_unfused) and same_fp8(xq, xq_unfused)
    xq_ref, s_ref = fp8_fused.silu_mul_quantize_fp8_ref(gate_up)
    assert torch.equal(s, s_ref) and same_fp8(xq, xq_ref)


@pytest.mark.parametrize("t,inter", [(1, 16), (4, 100), (3, 1536)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_matches_unfused(t: int, inter: int, dtype: torch.dtype) -> None:
    check_silu(t, inter, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_two_pass_matches_unfused(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Rows wider than _SINGLE_MAX take the amax pass and the quantize pass (here forced at a
    small width, with a last block that is partly masked)."""
    monkeypatch.setattr(fp8_fused, "_SINGLE_MAX", 64)
    monkeypatch.setattr(fp8_fused, "_BLOCK", 64)
    check_silu(3, 200, dtype)


def test_strided_inputs_and_zero_rows() -> None:
    """Row strides wider than the row (views into a bigger buffer) and an all-zero row."""
    big = rows(4, 320, torch.bfloat16, seed=2)
    x = big[:, :256]  # [4, 256], row stride 320
    x[1].zero_()
    w = torch.ones(256, dtype=torch.bfloat16, device=DEVICE)
    xq, s, _ = fp8_fused.add_rmsnorm_quantize_fp8(x, None, w, 1e-5)
    xq_u, s_u = fp8_matmul.quantize_fp8_per_token(rmsnorm.fused_add_rmsnorm(x, None, w, 1e-5)[0])
    assert torch.equal(s, s_u) and same_fp8(xq, xq_u)
    assert float(s[1]) == torch.tensor(fp8_matmul.FP8_SCALE_MIN).item() and (xq[1].float() == 0).all()
    gu = big[:, :300]  # [4, 300], row stride 320
    xq, s = fp8_fused.silu_mul_quantize_fp8(gu)
    xq_u, s_u = fp8_matmul.quantize_fp8_per_token(activation.silu_and_mul(gu))
    assert torch.equal(s, s_u) and same_fp8(xq, xq_u)


def test_empty_and_bad_arguments() -> None:
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    xq, s, r = fp8_fused.add_rmsnorm_quantize_fp8(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), None, w, 1e-5)
    assert xq.shape == (0, 64) and s.shape == (0, 1) and r.shape == (0, 64)
    assert fp8_fused.silu_mul_quantize_fp8(torch.empty(0, 64, device=DEVICE))[0].shape == (0, 32)
    x = rows(2, 64, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="weight must be"):
        fp8_fused.add_rmsnorm_quantize_fp8(x, None, w.float(), 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        fp8_fused.add_rmsnorm_quantize_fp8(x, x.float(), w, 1e-5)
    with pytest.raises(ValueError, match="columns"):
        wide = torch.ones(1, fp8_fused.MAX_NORM_WIDTH + 1, dtype=torch.bfloat16, device=DEVICE)
        fp8_fused.add_rmsnorm_quantize_fp8(wide, None, wide[0], 1e-5)
    with pytest.raises(ValueError, match="odd"):
        fp8_fused.silu_mul_quantize_fp8(torch.ones(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        fp8_fused.silu_mul_quantize_fp8(torch.ones(2, 2, 8, device=DEVICE))


def make_w(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    wq, ws = grids.quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.02)
    return wq.to(DEVICE), ws.to(DEVICE)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_quantized_equals_fp8_linear(m: int, dtype: torch.dtype) -> None:
    """Pre-quantized activations give exactly what fp8_linear computes from x (small-M route)."""
    x = rows(m, 96, dtype, seed=m)
    wq, ws = make_w(40, 96)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    xq, xs = fp8_matmul.quantize_fp8_per_token(x)
    y = fp8_matmul.fp8_linear_quantized(xq, xs, wq, ws, bias, dtype)
    assert y.dtype == dtype and torch.equal(y, fp8_matmul.fp8_linear_small_m(x, wq, ws, bias))
    with pytest.raises(ValueError, match="xs must be"):
        fp8_matmul.fp8_linear_quantized(xq, xs[:0], wq, ws, bias, dtype)
    with pytest.raises(ValueError, match="xq must be"):
        fp8_matmul.fp8_linear_quantized(x, xs, wq, ws, bias, dtype)
    with pytest.raises(ValueError, match="wq must be"):
        fp8_matmul.fp8_linear_quantized(xq, xs, wq[:, :64].contiguous(), ws, bias, dtype)


_LLAMA = [(4096, 14336), (4096, 11008), (2048, 8192), (576, 1536)]  # hidden, intermediate


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden,inter", _LLAMA)
@pytest.mark.parametrize("t", [1, 64, 1000])
def test_gpu_real_widths(hidden: int, inter: int, t: int) -> None:
    check_norm(t, hidden, torch.bfloat16, True)
    check_silu(t, inter, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 64, 65, 4096])
def test_gpu_linear_quantized_both_routes(m: int) -> None:
    x = rows(m, 4096, torch.bfloat16, seed=m)
    wq, ws = make_w(1024, 4096)
    xq, xs = fp8_matmul.quantize_fp8_per_token(x)
    y = fp8_matmul.fp8_linear_quantized(xq, xs, wq, ws, None, torch.bfloat16)
    assert torch.equal(y, fp8_matmul.fp8_linear(x, wq, ws))
