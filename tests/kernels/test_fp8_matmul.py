"""FP8 W8A8 kernels vs their torch references: per-token quantization (the same fp8 bytes and
scales), the small-M matmul over a grid of shapes / configs / dtypes (CPU: Triton interpreter,
small shapes; GPU-marked: Llama-2-7B shapes, the `fp8_linear` dispatch, CUDA-graph capture),
and argument errors."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels import fp8_matmul as f8
from turbollm.kernels.fp8_matmul import (
    Fp8SmallMConfig,
    fp8_linear_ref,
    fp8_linear_small_m,
    quantize_fp8_per_token,
    quantize_fp8_per_token_ref,
)
from turbollm.quant import grids

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn
# ||out - ref|| / ||ref||. Kernel and reference multiply the same e4m3 values with fp32
# accumulation and round once, so only summation order and the output rounding differ
# (bf16 ~2^-9, fp16 ~2^-12 relative). On the GPU, Hopper's FP8 tensor cores keep fewer
# accumulator bits than fp32 between promotions, so fp32 outputs get a looser bound there.
TOL = {torch.float32: 5e-3 if CUDA else 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3 if CUDA else 2e-3}


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal e4m3 values (+0 and -0 count as equal: the interpreter's e4m3 rounding emulation
    returns +0 for tiny negatives, the GPU's cast -0)."""
    return a.dtype == b.dtype == FP8 and torch.equal(a.float(), b.float())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (the per-token scales must differ), one outlier column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]  # [M, K]
    x[:, k // 3] *= 20.0  # an outlier channel, as in real activations
    return x.to(dtype).to(DEVICE)


def make_w(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wq, ws = grids.quantize_fp8(torch.randn(n, k, generator=g) * 0.02)  # [N, K] e4m3, [N] fp32
    return wq.to(DEVICE), ws.to(DEVICE)


def make_bias(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------------------
# Per-token quantization


@pytest.mark.parametrize("m,k", [(1, 16), (1, 640), (3, 200), (5, 1000), (2, 4096 + 48)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_reference_bytes(m: int, k: int, dtype: torch.dtype) -> None:
    x = make_x(m, k, dtype, seed=m * 7 + k)
    xq, s = quantize_fp8_per_token(x)
    xq_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert xq.dtype == FP8 and xq.shape == (m, k) and xq.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (m, 1)
    assert torch.equal(s, s_ref)
    assert same_fp8(xq, xq_ref)
    # Each row's largest |x| lands on +-448 and the row dequantizes to within e4m3's 2^-4.
    assert torch.equal(xq.float().abs().amax(1), torch.full((m,), 448.0, device=x.device))
    assert rel_err(xq.float() * s, x.float()) < 0.04


def test_quantize_zero_row_and_strided_rows() -> None:
    base = make_x(4, 256, torch.bfloat16)
    base[1] = 0.0
    x = base[:, :128]  # row stride 256
    xq, s = quantize_fp8_per_token(x)
    xq_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert s[1, 0] == f8.FP8_SCALE_MIN and not xq[1].float().any()
    assert torch.equal(s, s_ref) and same_fp8(xq, xq_ref)


def test_grids_uses_the_kernel_numerics() -> None:
    x = make_x(3, 64, torch.float32)
    a, sa = grids.quantize_fp8_per_token(x)
    b, sb = quantize_fp8_per_token_ref(x)
    assert torch.equal(sa, sb) and same_fp8(a, b)


# --------------------------------------------------------------------------------------------
# Small-M matmul (interpreter-sized configs on CPU)

_CFGS = [
    Fp8SmallMConfig(block_m=16, block_n=16, block_k=64, split_k=1, num_stages=1),
    Fp8SmallMConfig(block_m=16, block_n=32, block_k=32, split_k=3, num_stages=1),
    Fp8SmallMConfig(block_m=32, block_n=16, block_k=64, split_k=2, num_stages=1),
]


@pytest.mark.parametrize("m,n,k", [(1, 48, 200), (3, 40, 256), (16, 32, 128), (17, 24, 96)])
@pytest.mark.parametrize("cfg", _CFGS, ids=["split1", "split3", "bm32-split2"])
def test_small_m_matches_reference(m: int, n: int, k: int, cfg: Fp8SmallMConfig) -> None:
    x = make_x(m, k, torch.bfloat16, seed=m + n + k)
    wq, ws = make_w(n, k)
    bias = make_bias(n, torch.bfloat16)
    out = fp8_linear_small_m(x, wq, ws, bias, config=cfg)
    ref = fp8_linear_ref(x, wq, ws, bias)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, ref) < TOL[x.dtype]
    # Per row, too: a wrong per-token scale would hide behind the largest row in the norm.
    row_err = (out.float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1)
    assert float(row_err.max()) < TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_dtypes_default_config(dtype: torch.dtype, bias: bool) -> None:
    m, n, k = 2, 40, 160
    x = make_x(m, k, dtype)
    wq, ws = make_w(n, k)
    b = make_bias(n, dtype) if bias else None
    out = fp8_linear_small_m(x, wq, ws, b)
    assert out.dtype == dtype
    assert rel_err(out, fp8_linear_ref(x, wq, ws, b)) < TOL[dtype]


def test_reference_is_w8a8() -> None:
    """The reference is the dequantized product of the quantized activation and weights, and
    it differs from the unquantized product by FP8's error (not zero, not large)."""
    x = make_x(4, 128, torch.float32)
    wq, ws = make_w(24, 128)
    xq, xs = quantize_fp8_per_token_ref(x)
    ref = fp8_linear_ref(x, wq, ws)
    assert rel_err(ref, (xq.float() * xs) @ (wq.float() * ws[:, None]).t()) < 1e-6
    exact = x @ (wq.float() * ws[:, None]).t()
    assert 1e-4 < rel_err(ref, exact) < 0.05


def test_small_m_rejects_bad_arguments() -> None:
    x = make_x(1, 64, torch.bfloat16)
    wq, ws = make_w(16, 64)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear_small_m(x, wq.float(), ws)
    with pytest.raises(ValueError, match=r"wq must be a contiguous float8_e4m3fn \[N, 64\]"):
        fp8_linear_small_m(x, make_w(16, 32)[0], ws)
    with pytest.raises(ValueError, match="w_scale must be a contiguous float32"):
        fp8_linear_small_m(x, wq, ws.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be"):
        fp8_linear_small_m(x, wq, ws, torch.zeros(8, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="x dtype"):
        quantize_fp8_per_token(x.to(torch.int32))
    with pytest.raises(ValueError, match="block_m, block_n >= 16"):
        fp8_linear_small_m(x, wq, ws, config=Fp8SmallMConfig(block_m=8))


def test_empty_batch() -> None:
    wq, ws = make_w(16, 64)
    out = fp8_linear_small_m(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), wq, ws)
    assert out.shape == (0, 16)


# --------------------------------------------------------------------------------------------
# GPU: Llama-2-7B shapes through the dispatch of fp8_linear, both paths, graph capture

_LLAMA = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (N, K): qkv, o, gate_up, down


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", _LLAMA, ids=["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 64, 256, 4096])
def test_gpu_fp8_linear_real_shapes(m: int, n: int, k: int) -> None:
    x = make_x(m, k, torch.bfloat16, seed=m)
    wq, ws = make_w(n, k)
    xq, s = quantize_fp8_per_token(x)
    xq_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert torch.equal(s, s_ref) and same_fp8(xq, xq_ref)
    assert rel_err(f8.fp8_linear(x, wq, ws), fp8_linear_ref(x, wq, ws)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_gpu_small_m_bands_match_scaled_mm(m: int) -> None:
    """Every band of the small-M kernel against the reference (fp32 output: accumulation only)
    and against the _scaled_mm path (bf16: the two GPU paths agree up to rounding)."""
    n, k = 4096, 11008
    wq, ws = make_w(n, k)
    for max_m, cfg, _ in f8.SMALL_M_CONFIGS:
        x = make_x(m, k, torch.float32, seed=max_m)
        assert rel_err(fp8_linear_small_m(x, wq, ws, config=cfg), fp8_linear_ref(x, wq, ws)) < TOL[torch.float32]
        xb = x.to(torch.bfloat16)
        xq, xs = quantize_fp8_per_token(xb)
        big = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
        assert rel_err(fp8_linear_small_m(xb, wq, ws, config=cfg), big) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_cuda_graph_capture() -> None:
    n, k = 4096, 4096
    wq, ws = make_w(n, k)
    for m in (1, 8, 64, 300):
        x = make_x(m, k, torch.bfloat16, seed=m)
        f8.fp8_linear(x, wq, ws)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f8.fp8_linear(x, wq, ws)
        x.copy_(make_x(m, k, torch.bfloat16, seed=m + 100))  # new values, same buffer
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, fp8_linear_ref(x, wq, ws)) < TOL[torch.bfloat16]
