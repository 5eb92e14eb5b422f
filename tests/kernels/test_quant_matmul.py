"""Weight-only int8 / int4 matmul kernels vs their torch references (CPU: Triton interpreter,
small shapes; GPU-marked tests: Llama shapes in bf16, CUDA-graph capture), int4 packing,
configuration choice and argument errors."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels import quant_matmul_config as qcfg
from turbollm.kernels.quant_matmul import (
    QuantMatmulConfig,
    int4_linear_ref,
    int4_weight_only_linear,
    int8_linear_ref,
    int8_weight_only_linear,
    pack_int4,
    pick_config,
    unpack_int4,
    zeros_are_integers,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# ||out - ref|| / ||ref||. The references dequantize and multiply in fp32 and round once. fp32:
# only summation order differs. bf16/fp16: the output rounding (~2^-9 / 2^-12 relative) plus,
# on the tensor-core path, the int4 weights rounded to the activation dtype before the dot.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)  # [M, K]


def make_int8(n: int, k: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)  # [N, K]
    s = torch.rand(n, generator=g) * 0.02 + 0.005  # [N]
    return q.to(DEVICE), s.to(dtype).to(DEVICE)


def make_int4(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 2,
              fractional: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed codes, scales and zeros; `fractional`: zeros anywhere in [-3, 18) (a
    free-offset grid), else integers 0..15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)  # [N, K]
    s = torch.rand(n, k // group, generator=g) * 0.02 + 0.005  # [N, K / G]
    z = torch.randint(0, 16, (n, k // group), generator=g).float()  # [N, K / G]
    if fractional:
        z = torch.rand(n, k // group, generator=g) * 21 - 3
    return pack_int4(q).to(DEVICE), s.to(dtype).to(DEVICE), z.to(dtype).to(DEVICE)


def make_bias(n: int, dtype: torch.dtype, on: bool) -> torch.Tensor | None:
    return torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE) if on else None


def check_int8(m: int, n: int, k: int, dtype: torch.dtype, bias: bool,
               config: QuantMatmulConfig | None = None) -> None:
    x = make_x(m, k, dtype)
    q, s = make_int8(n, k, dtype)
    b = make_bias(n, dtype, bias)
    out = int8_weight_only_linear(x, q, s, b, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, int8_linear_ref(x, q, s, b)) < TOL[dtype]


def check_int4(m: int, n: int, k: int, group: int, dtype: torch.dtype, bias: bool,
               config: QuantMatmulConfig | None = None, fractional: bool = False, integer_zeros: bool = False) -> None:
    x = make_x(m, k, dtype)
    p, s, z = make_int4(n, k, group, dtype, fractional=fractional)
    assert zeros_are_integers(z) != fractional
    b = make_bias(n, dtype, bias)
    out = int4_weight_only_linear(x, p, s, z, group, b, config=config, integer_zeros=integer_zeros)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, int4_linear_ref(x, p, s, z, group, b)) < TOL[dtype]


# Interpreter grid: N and K odd multiples of the group size; M covers both default paths
# (1, 3: GEMV; 17, 64: tensor-core tiles). bf16 runs with the interpreter work-arounds.
MS = [1, 3, 17, 64]
GROUPS = [(32, True), (64, False), (128, True)]  # (G, with bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group,bias", GROUPS)
@pytest.mark.parametrize("m", MS)
def test_int4_matches_reference(m: int, group: int, bias: bool, dtype: torch.dtype) -> None:
    check_int4(m, 3 * group if group < 128 else group, 5 * group, group, dtype, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", MS)
def test_int8_matches_reference(m: int, bias: bool, dtype: torch.dtype) -> None:
    check_int8(m, 3 * 32, 7 * 64, dtype, bias)


def test_fp16() -> None:
    check_int4(5, 96, 320, 32, torch.float16, True)
    check_int8(5, 96, 320, torch.float16, True)


# Each path and dequantization variant forced at sizes the defaults would not give it, with
# and without split-K (3 splits of 5 steps: uneven), ragged N (not a multiple of the block),
# M over several row blocks.
FORCED = [
    QuantMatmulConfig("gemv", 1, 64, 64, dequant="cvt"),
    QuantMatmulConfig("gemv", 8, 32, 64, split_k=3, split_x=True, prefetch=True),
    QuantMatmulConfig("gemv", 4, 16, 128, dequant="magic", prefetch=True),
    QuantMatmulConfig("dot", 16, 32, 32, dequant="cvt"),
    QuantMatmulConfig("dot", 32, 16, 32, split_k=3, group_m=2, split_x=True),
    QuantMatmulConfig("dot", 16, 16, 32, split_k=2, swap_ab=True),
    QuantMatmulConfig("dot", 16, 32, 32, split_x=True, swap_ab=True),
    QuantMatmulConfig("dequant", 1, 16, 64),
]


def _cfg_id(c: QuantMatmulConfig) -> str:
    flags = [f for f in ("split_x", "prefetch", "swap_ab") if getattr(c, f)]
    return "-".join([c.path, f"bm{c.block_m}", f"s{c.split_k}", c.dequant, *flags])


@pytest.mark.parametrize("config", FORCED, ids=_cfg_id)
@pytest.mark.parametrize("m", [2, 9])
def test_forced_configs(m: int, config: QuantMatmulConfig) -> None:
    check_int4(m, 72, 160, 32, torch.float32, True, config=config)
    check_int8(m, 72, 160, torch.float32, True, config=config)


@pytest.mark.parametrize("integer_zeros", [False, True])
@pytest.mark.parametrize("split_x,swap_ab", [(False, False), (True, True)])
def test_fp16_activation_dtype_dequant(split_x: bool, swap_ab: bool, integer_zeros: bool) -> None:
    """fp16 takes the "magic_act" bit trick in fp16 arithmetic (bf16 does too, on the GPU);
    with integer_zeros it skips the correction for fractional zeros."""
    cfg = QuantMatmulConfig("dot", 16, 32, 32, dequant="magic_act", split_x=split_x, swap_ab=swap_ab)
    check_int4(9, 96, 320, 32, torch.float16, True, config=cfg, integer_zeros=integer_zeros)


def test_zeros_are_integers() -> None:
    assert zeros_are_integers(torch.tensor([[0.0, 15.0], [3.0, 7.0]]))
    assert not zeros_are_integers(torch.tensor([[0.0, 7.5]]))
    assert not zeros_are_integers(torch.tensor([[16.0, 1.0]]))  # past the 4-bit range
    assert not zeros_are_integers(torch.tensor([[-1.0, 1.0]]))


FRACTIONAL = [
    (torch.float16, QuantMatmulConfig("dot", 16, 32, 32, dequant="magic_act", split_x=True, swap_ab=True)),
    (torch.float16, QuantMatmulConfig("dot", 16, 32, 32, dequant="magic_act")),
    (torch.float32, QuantMatmulConfig("dot", 16, 32, 32, dequant="cvt")),
    (torch.float32, QuantMatmulConfig("gemv", 4, 16, 128, dequant="magic", prefetch=True)),
    (torch.float16, QuantMatmulConfig("dequant", 1, 16, 64)),
]


@pytest.mark.parametrize("dtype,config", FRACTIONAL, ids=lambda v: str(v) if isinstance(v, torch.dtype) else _cfg_id(v))
def test_fractional_zeros(dtype: torch.dtype, config: QuantMatmulConfig) -> None:
    """Free-offset grids (zeros not integers, some outside 0..15) on every dequantization
    route; "magic_act" splits z into its clamped integer part and the rest."""
    check_int4(9, 96, 320, 32, dtype, True, config=config, fractional=True)


def test_bf16_swap_ab() -> None:
    cfg = QuantMatmulConfig("dot", 16, 32, 64, split_x=True, swap_ab=True)
    check_int4(5, 96, 320, 64, torch.bfloat16, True, config=cfg)
    check_int8(5, 96, 320, torch.bfloat16, True, config=cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequant_path(dtype: torch.dtype) -> None:
    """W_hat written by the Triton pass, then a dense matmul."""
    cfg = QuantMatmulConfig("dequant", 1, 16, 64)
    check_int4(5, 48, 320, 64, dtype, True, config=cfg)
    check_int8(5, 48, 320, dtype, True, config=cfg)


def test_row_strided_input() -> None:
    big = make_x(3, 400, torch.float32)  # [3, 400]
    x = big[:, 80:400]  # [3, 320], row stride 400
    p, s, z = make_int4(64, 320, 64, torch.float32)
    torch.testing.assert_close(int4_weight_only_linear(x, p, s, z, 64), int4_linear_ref(x, p, s, z, 64))
    q, sc = make_int8(64, 320, torch.float32)
    torch.testing.assert_close(int8_weight_only_linear(x, q, sc), int8_linear_ref(x, q, sc))


def test_empty_batch() -> None:
    p, s, z = make_int4(64, 128, 32, torch.float32)
    assert int4_weight_only_linear(make_x(0, 128, torch.float32), p, s, z, 32).shape == (0, 64)
    q, sc = make_int8(64, 128, torch.float32)
    assert int8_weight_only_linear(make_x(0, 128, torch.float32), q, sc).shape == (0, 64)


def test_pack_unpack_round_trip() -> None:
    q = torch.randint(0, 16, (7, 38), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (7, 19) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # even column -> low nibble
    assert torch.equal(pack_int4(q.to(torch.int32)), p)  # any integer dtype in range packs


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[3, 16]]))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="odd"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype"):
        pack_int4(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.int8))


def test_int4_rejects_bad_arguments() -> None:
    x = make_x(2, 256, torch.float32)
    p, s, z = make_int4(64, 256, 64, torch.float32)
    bad_calls = {
        "group_size": lambda: int4_weight_only_linear(x, p, s, z, 48),
        "does not divide": lambda: int4_weight_only_linear(make_x(2, 96, torch.float32), p[:, :48],
                                                           s[:, :1], z[:, :1], 64),
        "qweight shape": lambda: int4_weight_only_linear(x, p[:, :100], s, z, 64),
        "qweight dtype": lambda: int4_weight_only_linear(x, p.to(torch.int8), s, z, 64),
        "qweight must be contiguous": lambda: int4_weight_only_linear(x, p.t().contiguous().t(), s, z, 64),
        "scales shape": lambda: int4_weight_only_linear(x, p, s[:, :2], z, 64),
        "zeros dtype": lambda: int4_weight_only_linear(x, p, s, z.to(torch.int32), 64),
        "bias shape": lambda: int4_weight_only_linear(x, p, s, z, 64, torch.ones(63, device=DEVICE)),
        "x shape": lambda: int4_weight_only_linear(x[0], p, s, z, 64),
        "x dtype": lambda: int4_weight_only_linear(x.double(), p, s, z, 64),
        "x needs a contiguous": lambda: int4_weight_only_linear(make_x(256, 2, torch.float32).t(), p, s, z, 64),
    }
    for match, call in bad_calls.items():
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="divide group_size"):
        int4_weight_only_linear(x, p, s, z, 64, config=QuantMatmulConfig("dot", 16, 16, 128))


def test_int8_rejects_bad_arguments() -> None:
    x = make_x(2, 128, torch.float32)
    q, s = make_int8(32, 128, torch.float32)
    for match, call in {
        "qweight shape": lambda: int8_weight_only_linear(x, q[:, :64], s),
        "qweight dtype": lambda: int8_weight_only_linear(x, q.float(), s),
        "scales shape": lambda: int8_weight_only_linear(x, q, s[:31]),
        "bias dtype": lambda: int8_weight_only_linear(x, q, s, torch.ones(32, dtype=torch.int64, device=DEVICE)),
        "power of two": lambda: int8_weight_only_linear(x, q, s, config=QuantMatmulConfig("gemv", 1, 24, 64)),
        "path": lambda: int8_weight_only_linear(x, q, s, config=QuantMatmulConfig("tiles", 16, 16, 16)),
        ">= 16": lambda: int8_weight_only_linear(x, q, s, config=QuantMatmulConfig("dot", 8, 16, 16)),
    }.items():
        with pytest.raises(ValueError, match=match):
            call()
    # The references share the checks.
    with pytest.raises(ValueError, match="scales shape"):
        int8_linear_ref(x, q, s[:31])
    with pytest.raises(ValueError, match="group_size"):
        int4_linear_ref(x, *make_int4(32, 128, 32, torch.float32)[:1], torch.ones(32, 4), torch.ones(32, 4), 96)


def test_gpu_heuristic_picks_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """GEMV for M = 1, tensor-core tiles (split-K while the tiles alone leave SMs idle) up to a
    few hundred rows, dequantize + dense matmul beyond; every default is a valid config."""
    monkeypatch.setattr(qcfg, "_num_sms", lambda index: 132)
    dev = torch.device("cuda", 0)
    for kind, group in (("int8", None), ("int4", 128), ("int4", 32)):
        assert pick_config(kind, 1, 4096, 4096, group, dev).path == "gemv"
        small = pick_config(kind, 16, 4096, 4096, group, dev)
        assert small.path == "dot" and small.split_k > 1
        assert pick_config(kind, 128, 4096, 4096, group, dev).path == "dot"
        assert pick_config(kind, 4096, 4096, 4096, group, dev).path == "dequant"
        for m in (1, 2, 16, 17, 64, 65, 255, 256, 511, 512, 4096):
            for n, k in ((4096, 4096), (22016, 4096), (576, 1536)):
                cfg = pick_config(kind, m, n, k, group, dev)
                qcfg.check_config(cfg, k, group)
                assert cfg.split_k == 1 or k // (cfg.split_k * cfg.block_k) >= 1
    with pytest.raises(ValueError, match="kind"):
        pick_config("int3", 1, 64, 64, None, dev)


# ------------------------------------------------------------------------------------------
# GPU: Llama-2-7B shapes in bf16, the default configs and CUDA-graph capture.

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_real_shapes(m: int, n: int, k: int) -> None:
    check_int4(m, n, k, 128, torch.bfloat16, True)
    check_int4(m, n, k, 128, torch.bfloat16, False, integer_zeros=True)
    check_int8(m, n, k, torch.bfloat16, m == 16)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64])
def test_gpu_other_groups_and_dtypes(group: int) -> None:
    for m in (1, 5, 64):
        check_int4(m, 4096, 4096, group, torch.bfloat16, False)
        check_int4(m, 4096, 4096, group, torch.bfloat16, True, integer_zeros=True)
        check_int4(m, 1024, 512, group, torch.float16, True)
        check_int4(m, 1024, 512, group, torch.float32, True)
    check_int8(3, 1024, 512, torch.float32, True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_gpu_fractional_zeros_default_configs(m: int) -> None:
    check_int4(m, 4096, 4096, 128, torch.bfloat16, True, fractional=True)
    check_int4(m, 1024, 512, 64, torch.float16, False, fractional=True)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture() -> None:
    """Default launches (GEMV, split-K tiles, dequantize + cuBLAS) replay correctly on new
    inputs from a graph."""
    for m in (1, 16, 256, 512):
        x = make_x(m, 4096, torch.bfloat16)
        p, s, z = make_int4(4096, 4096, 128, torch.bfloat16)
        q, sc = make_int8(4096, 4096, torch.bfloat16)
        b = make_bias(4096, torch.bfloat16, True)
        torch.cuda.synchronize()
        int4_weight_only_linear(x, p, s, z, 128, b)  # compile outside the capture
        int8_weight_only_linear(x, q, sc, b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out4 = int4_weight_only_linear(x, p, s, z, 128, b)
            out8 = int8_weight_only_linear(x, q, sc, b)
        x.copy_(make_x(m, 4096, torch.bfloat16, seed=9))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out4, int4_linear_ref(x, p, s, z, 128, b)) < TOL[torch.bfloat16]
        assert rel_err(out8, int8_linear_ref(x, q, sc, b)) < TOL[torch.bfloat16]


def test_default_int8_config_fits_narrow_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small model's K (64, 48, 40) gets a dot tile dividing it, or the dequant path (an
    H100 run once picked block_k 128 for K = 64)."""
    from turbollm.kernels import quant_matmul_config as qc

    monkeypatch.setattr(qc, "_interpreting", lambda device: False)
    monkeypatch.setattr(qc, "_num_sms", lambda index: 132)
    for m in (2, 16, 64, 200):
        for k in (64, 48, 40, 4096):
            cfg = qc.pick_config("int8", m, 96, k, None, torch.device("cuda", 0))
            qc.check_config(cfg, k, None)  # raises if the tile does not divide K
            assert cfg.path == "dequant" or k % cfg.block_k == 0
