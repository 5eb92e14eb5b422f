"""gemv vs its fp32 reference (CPU: Triton interpreter, small shapes; GPU: real shapes)."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels.gemv import (
    QuantWeight,
    gemv,
    gemv_ref,
    gemv_rmsnorm,
    gemv_rmsnorm_ref,
    gemv_silu_mul,
    gemv_silu_mul_ref,
)
from turbollm.kernels.quant_matmul import int4_linear_ref, int8_linear_ref, pack_int4

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


def _int8_weight(n: int, k: int, g: torch.Generator) -> QuantWeight:
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return QuantWeight(q.to(DEVICE), (torch.rand(n, generator=g) / 50).to(DEVICE))


def _int4_weight(n: int, k: int, group: int, g: torch.Generator) -> QuantWeight:
    q = torch.randint(0, 16, (n, k), generator=g)
    s = torch.rand(n, k // group, generator=g) / 10
    z = torch.randint(0, 16, (n, k // group), generator=g).float() + 0.25  # zeros need not be integers
    return QuantWeight(pack_int4(q).to(DEVICE), s.to(DEVICE), z.to(DEVICE), group)


QUANT_CASES = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
QUANT_CONFIGS = [None, (8, 32, 2, 4, 1, 1), (16, 128, 1, 4, 2, 3), (4, 64, 3, 2, 1, 0)]  # 3: packed (GPU)


def _quant_weight(kind: str, group: int, n: int, k: int, g: torch.Generator) -> QuantWeight:
    return _int8_weight(n, k, g) if kind == "int8" else _int4_weight(n, k, group, g)


@pytest.mark.parametrize("kind,group", QUANT_CASES)
@pytest.mark.parametrize("config", QUANT_CONFIGS)
def test_quantized_weights_match_reference(kind: str, group: int, config: tuple[int, ...] | None) -> None:
    """int8 / int4 weights with every prologue, default and forced tilings (splits of K,
    tiles narrower than a group, groups straddling splits)."""
    g = torch.Generator().manual_seed(group + len(config or ()))
    n, k = 37, 384
    w = _quant_weight(kind, group, n, k, g)
    x, r = (torch.randn(1, k, generator=g).to(DEVICE) for _ in range(2))
    nw = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE)
    tol = {"atol": 2e-3, "rtol": 1e-4}
    torch.testing.assert_close(gemv(x, w, b, config=config), gemv_ref(x, w, b), **tol)
    out, new_r = gemv_rmsnorm(x, r, nw, 1e-6, w, config=config)
    ref, ref_r = gemv_rmsnorm_ref(x, r, nw, 1e-6, w)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(new_r, ref_r, atol=0, rtol=0)
    gu = torch.randn(1, 2 * k, generator=g).to(DEVICE)
    torch.testing.assert_close(gemv_silu_mul(gu, w, b, config=config), gemv_silu_mul_ref(gu, w, b), **tol)


@pytest.mark.parametrize("kind,group", QUANT_CASES)
def test_quantized_bf16_matches_quant_matmul_reference(kind: str, group: int) -> None:
    """bf16 activations: the same answer as kernels/quant_matmul.py's references."""
    g = torch.Generator().manual_seed(7 + group)
    n, k = 24, 256
    w = _quant_weight(kind, group, n, k, g)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    if kind == "int8":
        ref = int8_linear_ref(x, w.qweight, w.scales)
    else:
        ref = int4_linear_ref(x, w.qweight, w.scales, w.zeros, group)
    torch.testing.assert_close(gemv(x, w).float(), ref.float(), **_tol(torch.bfloat16))


def test_bad_quantized_weights() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64).to(DEVICE)
    w8 = _int8_weight(8, 64, g)
    with pytest.raises(ValueError, match="qweight shape"):
        gemv(torch.randn(1, 32).to(DEVICE), w8)
    with pytest.raises(ValueError, match="scales shape"):
        gemv(x, QuantWeight(w8.qweight, w8.scales[:4]))
    w4 = _int4_weight(8, 64, 32, g)
    with pytest.raises(ValueError, match="group_size"):
        gemv(x, QuantWeight(w4.qweight, w4.scales, w4.zeros, 48))
    with pytest.raises(ValueError, match="zeros shape"):
        gemv(x, QuantWeight(w4.qweight, w4.scales, w4.zeros[:, :1], 32))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 128), ("int4", 32)])
def test_gpu_quantized_real_shapes(n: int, k: int, kind: str, group: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = _quant_weight(kind, group, n, k, g)
    w = QuantWeight(w.qweight, (w.scales / k**0.5).bfloat16(),
                    None if w.zeros is None else w.zeros.bfloat16(), group)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    nw = (torch.rand(k, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    out, _ = gemv_rmsnorm(x, None, nw, 1e-5, w)
    ref, _ = gemv_rmsnorm_ref(x, None, nw, 1e-5, w)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(torch.bfloat16))


@pytest.mark.parametrize("early,trigger_first", [(1, False), (2, False), (2, True), (0, True)])
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
def test_early_tile_and_trigger_change_no_bit(
    monkeypatch: pytest.MonkeyPatch, early: int, trigger_first: bool, kind: str
) -> None:
    """Loading the first weight tile ahead (before the RMSNorm pre-pass, or before the PDL
    wait) and letting the next kernel launch first only move loads: the same sums in the same
    order, so every prologue's output is bit-identical to the in-loop default's."""
    from turbollm.kernels import gemv as gemv_module

    g = torch.Generator().manual_seed(early + 3 * trigger_first)
    n, k = 37, 384
    w = torch.randn(n, k, generator=g).to(DEVICE) if kind == "dense" else _quant_weight(kind, 64, n, k, g)
    x, r = (torch.randn(1, k, generator=g).to(DEVICE) for _ in range(2))
    nw = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    gu = torch.randn(1, 2 * k, generator=g).to(DEVICE)
    config = (8, 128, 2, 4, 1)  # two K splits: each split's first tile is loaded ahead

    def run() -> list[torch.Tensor]:
        return [gemv(x, w, config=config), *gemv_rmsnorm(x, r, nw, 1e-6, w, config=config),
                gemv_silu_mul(gu, w, config=config)]

    def place(early: int, trigger_first: bool) -> None:
        monkeypatch.setattr(gemv_module, "_EARLY_TILE", {f: (early,) * 3 for f in gemv_module._EARLY_TILE})
        monkeypatch.setattr(gemv_module, "_TRIGGER_FIRST", {f: trigger_first for f in gemv_module._TRIGGER_FIRST})

    place(0, False)
    base = run()
    place(early, trigger_first)
    for got, want in zip(run(), base, strict=True):
        assert torch.equal(got, want)
