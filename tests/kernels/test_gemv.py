"""gemv vs its fp32 reference (CPU: Triton interpreter, small shapes; GPU: real shapes)."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels.gemv import (
    gemv,
    gemv_ref,
    gemv_rmsnorm,
    gemv_rmsnorm_ref,
    gemv_silu_mul,
    gemv_silu_mul_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("n,k", [(40, 64), (33, 1000), (17, 8200), (64, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    torch.testing.assert_close(gemv(x, w, b), gemv_ref(x, w, b), atol=1e-3, rtol=1e-4)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-3, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}


@pytest.mark.parametrize("n,k", [(40, 64), (33, 1000), (17, 8200), (64, 24)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_prologue_matches_reference(n: int, k: int, residual: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3 * n + k)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    r = torch.randn(1, k, generator=g).to(DEVICE, dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    out, new_r = gemv_rmsnorm(x, r, nw, 1e-5, w, b)
    ref, ref_r = gemv_rmsnorm_ref(x, r, nw, 1e-5, w, b)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))
    torch.testing.assert_close(new_r, ref_r, atol=0, rtol=0)  # the sum is rounded like torch's
    if r is None:
        assert new_r is x


@pytest.mark.parametrize("n,k", [(40, 64), (33, 1000), (17, 8200), (64, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_prologue_matches_reference(n: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5 * n + k)
    gu = (3 * torch.randn(1, 2 * k, generator=g)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    torch.testing.assert_close(gemv_silu_mul(gu, w).float(), gemv_silu_mul_ref(gu, w).float(), **_tol(dtype))


@pytest.mark.parametrize("config", [(8, 32, 3, 4, 2), (32, 64, 2, 8, 3), (16, 16, 1, 4, 1)])
def test_forced_tilings_match_reference(config: tuple[int, int, int, int, int]) -> None:
    """Every tiling the tuning sweep may pick, splits of K included, for each prologue."""
    g = torch.Generator().manual_seed(sum(config))
    n, k = 37, 200
    x, r = (torch.randn(1, k, generator=g).to(DEVICE) for _ in range(2))
    nw = torch.rand(k, generator=g).to(DEVICE) + 0.5
    w = torch.randn(n, k, generator=g).to(DEVICE) / k**0.5
    b = torch.randn(n, generator=g).to(DEVICE)
    tol = _tol(torch.float32)
    torch.testing.assert_close(gemv(x, w, b, config=config), gemv_ref(x, w, b), **tol)
    out, new_r = gemv_rmsnorm(x, r, nw, 1e-6, w, b, config=config)
    ref, ref_r = gemv_rmsnorm_ref(x, r, nw, 1e-6, w, b)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(new_r, ref_r)
    gu = torch.randn(1, 2 * k, generator=g).to(DEVICE)
    torch.testing.assert_close(gemv_silu_mul(gu, w, b, config=config), gemv_silu_mul_ref(gu, w, b), **tol)


def test_bad_prologue_inputs() -> None:
    x, w = torch.randn(1, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="norm weight"):
        gemv_rmsnorm(x, None, torch.ones(16, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gemv_rmsnorm(x, torch.randn(1, 32, device=DEVICE).half(), torch.ones(32, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="gate_up"):
        gemv_silu_mul(torch.randn(1, 63, device=DEVICE), w)
    with pytest.raises(ValueError, match="not"):
        gemv_silu_mul(torch.randn(1, 32, device=DEVICE), w)


def test_bad_inputs() -> None:
    x, w = torch.randn(2, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="not"):
        gemv(x, w)
    with pytest.raises(ValueError, match="not"):
        gemv(x[:1, :16], w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(x[:1].half(), w)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008), (22016, 4096), (32000, 4096)])
def test_gpu_real_shapes(n: int, k: int) -> None:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gemv(x, w, b).float(), gemv_ref(x, w, b).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(12288, 4096), (22016, 4096)])
def test_gpu_rmsnorm_prologue_real_shapes(n: int, k: int) -> None:
    x, r = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nw = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    out, new_r = gemv_rmsnorm(x, r, nw, 1e-5, w)
    ref, ref_r = gemv_rmsnorm_ref(x, r, nw, 1e-5, w)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(new_r, ref_r, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_silu_mul_prologue_real_shapes() -> None:
    gu = torch.randn(1, 2 * 11008, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    torch.testing.assert_close(gemv_silu_mul(gu, w).float(), gemv_silu_mul_ref(gu, w).float(), atol=2e-2, rtol=2e-2)
