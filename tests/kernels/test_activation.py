"""silu_and_mul vs its torch reference (CPU: Triton interpreter, small shapes; GPU-marked
tests: real shapes) and the SiluAndMul layer's dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbollm.kernels import activation as activation_kernels
from turbollm.kernels.activation import silu_and_mul, silu_and_mul_ref
from turbollm.layers.activation import SiluAndMul

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel and reference both compute in fp32 and round once; only exp's approximation on the
# GPU differs (fp32 ~1e-6; half precision: now and then one ulp).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Against the layer's torch code, which rounds silu(gate) before the product: two roundings.
TORCH_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make(tokens: int, inter: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random x [T, 2I] spread over silu's curved range (never zero)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, 2 * inter, generator=g) * 3).to(dtype).to(DEVICE)


def check(tokens: int, inter: int, dtype: torch.dtype) -> None:
    x = make(tokens, inter, dtype)
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.dtype == dtype and out.shape == (tokens, inter)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    layer_torch = F.silu(x[:, :inter]) * x[:, inter:]  # the layer's CPU code
    tol = TORCH_TOL[dtype]
    torch.testing.assert_close(out.float(), layer_torch.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (7, 576), (33, 1000), (1, 4096)])
def test_matches_reference(tokens: int, inter: int, dtype: torch.dtype) -> None:
    check(tokens, inter, dtype)


def test_many_rows() -> None:
    """One program per row and column block; fp32 only on CPU (the GPU tests cover all)."""
    check(256, 64, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_extreme_gates() -> None:
    """Large |gate| must not overflow into NaN (exp(-gate) = inf for very negative gates)."""
    gate = torch.tensor([[-1000.0, -100.0, -20.0, 0.5, 20.0, 100.0, 1000.0, -0.25]])
    up = torch.full_like(gate, 2.0)
    x = torch.cat([gate, up], dim=1).to(DEVICE)  # [1, 16]
    out = silu_and_mul(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_row_strided_input() -> None:
    big = make(5, 150, torch.float32)  # [5, 300]
    x = big[:, 10:210]  # [5, 200], row stride 300
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_empty_batch() -> None:
    assert silu_and_mul(make(0, 64, torch.float32)).shape == (0, 64)


def test_rejects_bad_arguments() -> None:
    x = make(4, 32, torch.float32)  # [4, 64]
    for bad in (x[0], x[:, :63], x.int(), x.t(), x.double()):
        with pytest.raises(ValueError):
            silu_and_mul(bad)


def test_cpu_layer_keeps_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("kernel called on CPU")

    monkeypatch.setattr(activation_kernels, "silu_and_mul", boom)
    x = make(3, 64, torch.float32).cpu()
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :64]) * x[:, 64:], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, and the layer's kernel path.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 33, 256, 4096])
@pytest.mark.parametrize("inter", [64, 576, 1000, 4096, 14336])
def test_gpu_matches_reference(tokens: int, inter: int, dtype: torch.dtype) -> None:
    check(tokens, inter, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_layer_uses_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = activation_kernels.silu_and_mul

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(activation_kernels, "silu_and_mul", spy)
    x = make(33, 1000, dtype).view(3, 11, 2000)
    out = SiluAndMul()(x)
    assert calls == [(33, 2000)] and out.shape == (3, 11, 1000)
    torch.testing.assert_close(out.view(33, 1000), silu_and_mul_ref(x.view(33, 2000)), atol=TOL[dtype],
                               rtol=TOL[dtype])
