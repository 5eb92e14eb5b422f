"""gemv vs its fp32 reference (CPU: Triton interpreter, small shapes; GPU: real shapes)."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels.gemv import gemv, gemv_ref

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
