"""fused_add_rmsnorm vs its torch reference (CPU: Triton interpreter, small shapes; GPU-marked
tests: real shapes) and the RMSNorm layer's dispatch."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels import rmsnorm as rmsnorm_kernels
from turbollm.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref
from turbollm.layers.norm import RMSNorm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernel repeats every rounding of the torch code; only the fp32 sum of squares (order)
# and rsqrt differ, so fp32 agrees to ~1e-6 and a half-precision element is off by at most
# one ulp of h (then times the weight): rtol one bf16 / two fp16 ulps.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-6


def make(
    tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool, weight_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random x [T, N], residual [T, N] and weight [N] (around 1, never zero)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype).to(DEVICE)
    res = (torch.randn(tokens, hidden, generator=g) * 3).to(dtype).to(DEVICE) if with_residual else None
    w = (1 + 0.5 * torch.randn(hidden, generator=g)).to(weight_dtype or dtype).to(DEVICE)
    return x, res, w


def check(
    tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool, weight_dtype: torch.dtype | None = None,
    block_n: int | None = None,
) -> None:
    x, res, w = make(tokens, hidden, dtype, with_residual, weight_dtype)
    x_before = x.clone()
    out, new_res = fused_add_rmsnorm(x, res, w, EPS, block_n)
    ref, ref_res = fused_add_rmsnorm_ref(x, res, w, EPS)
    assert out.dtype == ref.dtype and out.shape == (tokens, hidden)
    assert torch.equal(x, x_before)  # inputs untouched
    if res is None:
        assert new_res is x  # no copy, like the torch code
    else:
        assert torch.equal(new_res, ref_res)  # the add is one exact rounding on both sides
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if dtype != torch.float32:  # the same roundings: nearly every element is bit-identical
        assert (out != ref).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 576), (33, 1000), (7, 4096)])
def test_matches_reference(tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool) -> None:
    check(tokens, hidden, dtype, with_residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no_res", "res"])
def test_many_rows(with_residual: bool) -> None:
    """One program per row; fp32 only on CPU (the interpreter is slow; the GPU tests cover all)."""
    check(256, 64, torch.float32, with_residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_res", "res"])
def test_two_pass_path(dtype: torch.dtype, with_residual: bool) -> None:
    """Rows wider than the tile loop over it twice (the path for hidden > 8192)."""
    check(5, 1000, dtype, with_residual, block_n=256)
    check(3, 576, dtype, with_residual, block_n=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_promotes_like_torch(dtype: torch.dtype) -> None:
    check(7, 576, dtype, True, weight_dtype=torch.float32)


def test_row_strided_input() -> None:
    """x and residual may be column slices of wider tensors (last stride 1)."""
    big_x, big_r, w = make(9, 300, torch.float32, True)
    x, res = big_x[:, 20:220], big_r[:, 50:250]  # [9, 200] each
    out, new_res = fused_add_rmsnorm(x, res, w[:200], EPS)
    ref, ref_res = fused_add_rmsnorm_ref(x, res, w[:200], EPS)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_res, ref_res)


def test_empty_batch() -> None:
    x, res, w = make(0, 64, torch.float32, True)
    out, new_res = fused_add_rmsnorm(x, res, w, EPS)
    assert out.shape == (0, 64) and new_res.shape == (0, 64)


def test_rejects_bad_arguments() -> None:
    x, res, w = make(4, 64, torch.float32, True)
    assert res is not None
    bad = [
        (x[0], None, w),  # 1-D x
        (x, res[:3], w),  # residual rows
        (x, res.half(), w),  # residual dtype
        (x, None, w[:32]),  # weight length
        (x.int(), None, w),  # dtype
        (x, None, w.to("meta")),  # device
        (x.t(), None, torch.ones(4, device=DEVICE)),  # last stride
        (x, None, w.int()),  # weight dtype
    ]
    for args in bad:
        with pytest.raises(ValueError):
            fused_add_rmsnorm(*args, EPS)
    with pytest.raises(ValueError):
        fused_add_rmsnorm(x, res, w, EPS, block_n=100)


def test_cpu_layer_keeps_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the layer never calls the kernel (its torch code is compared with transformers)."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("kernel called on CPU")

    monkeypatch.setattr(rmsnorm_kernels, "fused_add_rmsnorm", boom)
    layer = RMSNorm(64, EPS)
    x, res, _ = make(3, 64, torch.float32, True)
    out, new_res = layer(x.cpu(), res.cpu() if res is not None else None)
    assert out.shape == (3, 64) and new_res.shape == (3, 64)


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, and the layer's kernel path against its torch code.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("tokens", [1, 7, 33, 256, 4096])
@pytest.mark.parametrize("hidden", [64, 576, 1000, 4096, 8192, 16384])
def test_gpu_matches_reference(tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool) -> None:
    check(tokens, hidden, dtype, with_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_layer_uses_kernel(dtype: torch.dtype) -> None:
    layer = RMSNorm(4096, EPS).to(DEVICE)
    x, res, w = make(33, 4096, dtype, True)
    layer.weight.data.copy_(w.float())
    layer.to(dtype)
    out, new_res = layer(x.view(3, 11, 4096), res.view(3, 11, 4096) if res is not None else None)
    ref, ref_res = fused_add_rmsnorm_ref(x, res, layer.weight, EPS)
    assert out.shape == (3, 11, 4096) and new_res.shape == (3, 11, 4096)
    torch.testing.assert_close(out.view(33, 4096).float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(new_res.view(33, 4096), ref_res)
    out2, new_res2 = layer(x)
    assert new_res2 is x
